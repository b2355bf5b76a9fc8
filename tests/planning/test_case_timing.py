"""The final evaluation in the time budget: one median case predicted as evaluate.py predicts it, each part
timed (a real subprocess on phantoms), and the plan's cost model with its timings faked."""
import numpy as np
import pytest

from segpipe.planning import rules
from segpipe.planning.plan import Hardware
from segpipe.planning.planner import make_plan

from .test_precision_plan import precision_timer
from .test_rules import GIB, fingerprint


def test_windows_and_the_rest_of_a_case_by_hand():
    # 10 cases × (27 windows × 0.1 s + 3 s besides) = 57 s: over a 50-s budget with 2 passes, fits with 1
    overlap, mirror, cost = rules.plan_inference(median_shape=[80] * 3, patch=[40] * 3, num_cases=10,
                                                 window_seconds=0.1, budget_seconds=60, mirror_axes=[0],
                                                 case_overhead_seconds=3.0)
    assert mirror.value == [] and cost == pytest.approx(57) and "3.0 s besides the windows" in mirror.reason
    # without the rest of each case the same budget would have allowed mirroring (54 s): the overrun of issue 25
    _, mirror, cost = rules.plan_inference(median_shape=[80] * 3, patch=[40] * 3, num_cases=10, window_seconds=0.1,
                                           budget_seconds=60, mirror_axes=[0])
    assert mirror.value == [0] and cost == pytest.approx(54)


def test_the_plan_costs_the_final_evaluation_from_a_timed_case():
    timer, _ = precision_timer()
    seen = []

    def case_timer(keys):
        seen.append(keys)
        return {"predict_seconds": 12.0, "write_seconds": 3.0, "network_seconds": 5.0, "windows": 50,
                "preprocess_seconds": 4.0, "loop_step_seconds": 0.5}

    fp = fingerprint([[1.0, 1.0, 1.0]] * 20, [[64, 64, 64]] * 20)
    hardware = Hardware("cpu", 8 * GIB, precisions=("float32", "mixed_bfloat16"), precision_reason="faked")
    plan = make_plan(fp, hardware=hardware, time_budget_minutes=30, step_timer=timer, case_timer=case_timer)
    (keys,) = seen  # timed once, with the planned network, precision and normalisation
    assert keys["data.patch_size"] == plan.config["data.patch_size"] and keys["train.precision"] == "mixed_bfloat16"
    assert keys["data.normalization"] == plan.config["data.normalization"]
    final = plan.predicted["final_evaluation"]
    assert final["window_seconds"] == pytest.approx(0.1) and final["other_seconds_per_case"] == pytest.approx(10.0)
    assert plan.predicted["final_evaluation_seconds"] == pytest.approx(
        final["cases"] * (final["windows_per_case"] * 0.1 + 10.0))
    assert plan.measured["final_evaluation_case"]["write_seconds"] == 3.0
    # the schedule is costed with the loop's measured step (× 1.1), not the bare step's model
    assert plan.predicted["loop_step_seconds"] == pytest.approx(0.55)
    assert "loop_step_seconds_bare_model" in plan.predicted
    assert keys["data.foreground_fraction"] == plan.config["data.foreground_fraction"] and "loss" in keys


def test_a_median_case_is_predicted_and_each_part_timed(tmp_path):
    from segpipe.cli.plan import median_case, median_case_timer
    from segpipe.config import Config
    from segpipe.data.fingerprint import compute_fingerprint
    from segpipe.data.phantoms import PhantomSettings, write_phantom_dataset
    from segpipe.data.pipeline import open_dataset

    root = write_phantom_dataset(tmp_path / "ds",
                                 PhantomSettings(num_cases=3, shape=(24, 24, 16), spacing_mm=(1.0, 1.0, 2.0),
                                                                  seed=1))
    base = Config.from_dict({"data": {"root": str(root), "phantoms": None}})
    dataset = open_dataset(base.data)
    fp = compute_fingerprint(dataset)
    case_id = median_case(fp)
    sizes = sorted(int(np.prod(c["shape"])) for c in fp["cases"].values())
    assert int(np.prod(fp["cases"][case_id]["shape"])) == sizes[1]
    keys = {"data.target_spacing_mm": [1.0, 1.0, 1.0], "data.patch_size": [16, 16, 16], "data.batch_size": 2,
            "data.normalization": "zscore", "data.foreground_fraction": 0.33, "data.augment.mirror.axes": [0],
            "model.name": "unet3d", "model.depth": 2, "model.base_filters": 4,
            "model.init": "he_normal", "train.precision": "float32", "_in_channels": 1,
            "_num_classes": len(dataset.labels)}
    timed = median_case_timer(base, dataset, fp)(keys)
    assert timed["case_id"] == case_id and timed["mirror_axes"] == [] and timed["overlap"] == 0.5
    assert timed["original_shape"] == list(fp["cases"][case_id]["shape"])
    # resampled from 2 mm to 1 mm along z, then windows of 16³ at overlap 0.5 (step 8) over the padded image
    assert timed["preprocessed_shape"][2] > timed["original_shape"][2]
    expected_windows = rules.sliding_windows(timed["preprocessed_shape"], [16, 16, 16], 0.5)
    assert timed["windows"] == expected_windows
    assert 0 < timed["network_seconds"] <= timed["predict_seconds"]
    assert timed["preprocess_seconds"] > 0 and timed["write_seconds"] > 0
    # the loop's step: the planned batch from the loader (sampling, augmentation) into a compiled step
    assert timed["loop_batch_size"] == 2 and timed["loop_steps_timed"] == 3 and 0 < timed["loop_step_seconds"] < 60


def test_the_budget_report_puts_each_measured_part_beside_its_prediction(tmp_path, capsys):
    from segpipe.cli.train import _report_budget
    from segpipe.io import read_json, write_json, write_text
    from segpipe.planning.output import budget_report
    from segpipe.runs.rundir import RunDir

    plan = {"config": {"train.epochs": 4, "train.steps_per_epoch": 10},
            "predicted": {"loop_step_seconds": 2.0, "validation_seconds": 5.0, "final_evaluation_seconds": 90.0},
            "choices": {"precision": {"value": "mixed_bfloat16", "reason": "..."}}}
    report = budget_report(plan, epoch_seconds=[24.0, 26.0, 30.0], final_evaluation_seconds=120.0,
                           command_seconds=250.0, budget_minutes=4.0)
    parts = report["parts"]
    assert parts["epoch_seconds"] == {"predicted": 25.0, "measured": 26.0}  # 10 × 2 s + 5 s; the median
    assert parts["training_seconds"] == {"predicted": 100.0, "measured": 80.0}
    assert parts["epochs"] == {"predicted": 4, "measured": 3}
    assert parts["final_evaluation_seconds"] == {"predicted": 90.0, "measured": 120.0}
    assert report["within_budget"] is False and report["precision"] == "mixed_bfloat16"  # 250 s > 240 s

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    write_text(run.epoch_times_csv, "epoch,seconds\n1,24\n2,26\n3,30\n")
    write_json(tmp_path / "plan.json", plan)
    _report_budget(run, tmp_path / "plan.json", 5.0, final_seconds=60.0, command_seconds=200.0)
    saved = read_json(run.budget_json)
    assert saved["within_budget"] is True and saved["parts"]["training_seconds"]["measured"] == 80.0
    assert "Time budget: 3.3 (planned 5.0) min in all; training 1.3 (planned 1.7), final evaluation 1.0 (planned 1.5)" \
        in capsys.readouterr().out

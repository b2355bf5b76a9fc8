"""Every shipped loss config trains the tiny U-Net; bad loss options fail before training."""
from pathlib import Path

import numpy as np
import pytest

import train
from segpipe.config import ConfigError, load_config
from segpipe.data.layouts import load_dataset
from segpipe.data.preprocess import preprocess_case
from segpipe.data.sampling import ArrayCase, PatchSampler
from segpipe.losses import CompoundLoss, deep_supervision_targets
from segpipe.training.train import build_loss, build_model, compile_model

LOSS_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "losses").glob("*.yaml"))


@pytest.fixture(scope="module")
def fixed_batch(phantom_root):
    dataset = load_dataset(phantom_root)
    cases = [preprocess_case(case) for case in dataset.cases[:3]]  # z-scored, as the loader sees them
    cases = [ArrayCase.from_arrays(c.image, c.label) for c in cases]
    sampler = PatchSampler(cases, (16, 16, 16), batch_size=2, foreground_fraction=1.0, seed=0)
    pairs = [sampler(i) for i in range(2)]
    images = np.stack([p[0] for p in pairs])
    labels = np.eye(dataset.num_classes, dtype=np.float32)[np.stack([p[1] for p in pairs])]
    return dataset, images, labels


def test_every_loss_of_the_issue_has_a_config():
    names = {p.stem for p in LOSS_CONFIGS}
    assert {"dice", "generalized_dice", "tversky", "iou", "dice_ce", "focal_tversky", "ce"} <= names


@pytest.mark.parametrize("path", LOSS_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("output, deep_supervision", [("softmax", False), ("softmax", True), ("logits", False)],
                         ids=["plain", "deep_supervision", "logits"])
def test_loss_config_trains_and_loss_decreases(path, deep_supervision, output, fixed_batch, tiny_overrides):
    dataset, images, labels = fixed_batch
    overrides = [*tiny_overrides, "train.learning_rate=0.01", "train.lr_schedule=constant",
                 f"model.deep_supervision={str(deep_supervision).lower()}", f"model.output={output}",
                 *(["model.depth=3"] if deep_supervision else [])]
    config = load_config(path, overrides)
    model = build_model(config, 1, dataset.num_classes)
    compile_model(model, config, dataset.class_names)
    # The plain head trains in graph mode, as training runs: every shipped loss traced with the U-Net.
    # The deep-supervision and logits variants change the head and the targets, not how a loss
    # traces (graph mode of those: the mirrored driver below, test_losses.py's fit and XLA tests),
    # so they run eagerly: a new train step's tracing is most of such a test (2-2.4x measured).
    model.run_eagerly = deep_supervision or output == "logits"
    if deep_supervision:  # one target per output, as the loader gives them
        assert len(model.outputs) == 2 and model.loss == [model.loss[0]] * 2
        labels = tuple(np.asarray(t) for t in deep_supervision_targets(labels, 2))
    assert all(term.options["from_logits"] == (output == "logits") for term in _terms(build_loss(config, 3)))
    losses = [float(np.asarray(model.train_on_batch(images, labels, return_dict=True)["loss"])) for _ in range(8)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


def _terms(loss):
    return [term for _, term in loss.terms] if isinstance(loss, CompoundLoss) else [loss]


@pytest.mark.parametrize("output, loss, message", [
    ("softmax", "{name: dice, from_logits: true}",
     "Expected from_logits: false .* model.output: softmax. Received: loss.from_logits=True"),
    ("logits", "{terms: [{name: dice}, {name: ce, from_logits: false}]}",
     "Expected from_logits: true .* model.output: logits. Received: loss.from_logits=False"),
])
def test_from_logits_against_model_output_is_refused(output, loss, message, tiny_overrides):
    config = load_config(None, [*tiny_overrides, f"model.output={output}", f"loss={loss}"])
    with pytest.raises(ConfigError, match=message):
        build_loss(config, 3)


def test_bad_loss_option_fails_before_any_run_is_written(tiny_overrides, tmp_path, capsys):
    code = train.main(["--set", *tiny_overrides, "name=bad", "loss={name: dice, class_weights: [1, 2]}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "for loss 'dice': 3 (num_classes=3" in err and "Received: loss.class_weights=[1.0, 2.0]." in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_unknown_loss_name_lists_valid_names(tiny_overrides, tmp_path, capsys):
    assert train.main(["--set", *tiny_overrides, "name=bad2", "loss.name=tverksy"]) == 1
    err = capsys.readouterr().err
    assert "tversky" in err and "dice" in err


# ---------------------------------------------------------------- model.fit under MirroredStrategy

FIT_CASES = ["dice", "dice_ce", "tversky", "ce", "batch_dice", "generalized_dice_batch", "deep_supervision",
             "batch_dice_weighted", "dice_ce_weighted"]


@pytest.fixture(scope="module")
def mirrored_fit_driver(tmp_path_factory):
    """One subprocess (two logical CPUs must be set before TensorFlow starts) running every case:
    ``(process, log)``; killed when the module is done."""
    from process_helpers import REPO, kill, start

    log = tmp_path_factory.mktemp("mirrored_fit") / "driver.log"
    proc = start([str(REPO / "tests" / "mirrored_fit_driver.py"), *FIT_CASES, "scalar_call_dice"], log)
    try:
        yield proc, log
    finally:
        kill(proc)


@pytest.fixture(scope="module", autouse=True)
def _mirrored_fit_driver_starts_with_the_module(request):
    """Start the driver (minutes of single-threaded tracing) with the module's first test when any
    of its tests is selected, so it runs beside the in-process trainings instead of after them."""
    if any("mirrored_fit_results" in getattr(item, "fixturenames", ()) and item.module is request.module
           for item in request.session.items):
        request.getfixturevalue("mirrored_fit_driver")


@pytest.fixture(scope="module")
def mirrored_fit_results(mirrored_fit_driver):
    """The driver's results by case (it runs them all; a JSON line each)."""
    import json

    proc, log = mirrored_fit_driver
    assert proc.wait(timeout=480) == 0, log.read_text()[-3000:]
    lines = [line[len("RESULT "):] for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    return {r["case"]: r for r in map(json.loads, lines)}


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_under_mirrored_strategy_trains_like_one_process(case, mirrored_fit_results):
    """One step of model.fit of the U-Net (SGD, momentum; instance norm, so the split batch cannot
    matter) on 2 logical CPUs under MirroredStrategy gives the one-process weights and loss."""
    result = mirrored_fit_results[case]
    assert result["replicas"] == 2
    assert result["max_weight_change"] > 1e-3  # the step moved the weights (100x the tolerance)
    assert result["max_weight_diff"] < 1e-5, result
    np.testing.assert_allclose(result["loss_mirrored"], result["loss_one_process"], rtol=1e-6)


def test_a_scalar_call_is_what_broke_fit_under_mirrored_strategy(mirrored_fit_results):
    """The control: the same Dice with a scalar ``call`` (the old contract) logs twice the loss
    and takes a different step under two replicas."""
    result = mirrored_fit_results["scalar_call_dice"]
    np.testing.assert_allclose(result["loss_mirrored"][0], 2 * result["loss_one_process"][0], rtol=1e-5)
    assert result["max_weight_diff"] > 1e-3


def test_fit_under_multi_worker_strategy_still_fails_which_is_why_the_loop_stays(tmp_path):
    """The measured reason segpipe.training.loop exists (its docstring): Keras 3.15's fit under
    MultiWorkerMirroredStrategy fails before the first step, with Keras's own loss too. If this
    starts passing, compare fit with one process (tests/multiworker_fit_driver.py) and retire the loop."""
    from process_helpers import REPO, free_port, running, start, tf_config

    driver = str(REPO / "tests" / "multiworker_fit_driver.py")
    ports = [free_port(), free_port()]
    procs = [start([driver, "keras_cce", str(tmp_path / f"w{i}.npz")], tmp_path / f"w{i}.log",
                   TF_CONFIG=tf_config(ports, i)) for i in range(2)]
    with running(*procs):
        codes = [proc.wait(timeout=300) for proc in procs]
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert codes == [1, 1], "\n\n".join(log[-2000:] for log in logs)
    assert all("PerReplica" in log and "to a Tensor" in log for log in logs)

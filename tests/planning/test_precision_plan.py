"""train.precision in the plan: which precisions a machine supports, and the choice by timed steps (faked)."""
import subprocess

import pytest

from segpipe.planning import rules
from segpipe.planning.hardware import cpu_flags, gpu_compute_capability, supported_precisions
from segpipe.planning.plan import Hardware
from segpipe.planning.planner import make_plan

from .test_rules import GIB, fingerprint, flop_timer

SPEED = {"float32": 1.0, "mixed_bfloat16": 0.6, "mixed_float16": 0.8}  # step time relative to float32


def precision_timer(speed=SPEED):
    """The FLOP-proportional fake timer, scaled per ``train.precision``; records the precisions timed."""
    flops, _ = flop_timer()
    seen = []

    def timer(keys):
        precision = keys.get("train.precision", "float32")
        seen.append(precision)
        timed = flops(keys)
        return {**timed, "step_seconds": timed["step_seconds"] * speed[precision],
                "window_seconds": timed["window_seconds"] * speed[precision]}

    return timer, seen


def test_the_choice_by_hand():
    choice = rules.plan_precision({"float32": 4.2, "mixed_bfloat16": 2.7},
                                  supported_reason="bf16: the CPU has avx512_bf16")
    assert choice.value == "mixed_bfloat16"
    assert ("1.56× faster" in choice.reason and "float32 4.20 s" in choice.reason
            and "mixed_bfloat16 2.70 s" in choice.reason)
    # under 5 % faster: float32's exact arithmetic wins; slower: float32
    assert rules.plan_precision({"float32": 1.0, "mixed_bfloat16": 0.96}, supported_reason="").value == "float32"
    assert rules.plan_precision({"float32": 1.0, "mixed_bfloat16": 0.94}, supported_reason="").value == "mixed_bfloat16"
    assert rules.plan_precision({"float32": 1.0, "mixed_bfloat16": 1.5}, supported_reason="").value == "float32"
    # the fastest of three
    three = {"float32": 1.0, "mixed_bfloat16": 0.5, "mixed_float16": 0.4}
    assert rules.plan_precision(three, supported_reason="").value == "mixed_float16"
    with pytest.raises(ValueError, match="float32 step time"):
        rules.plan_precision({"mixed_bfloat16": 1.0}, supported_reason="")


@pytest.mark.parametrize("device, flags, capability, expected", [
    ("cpu", {"avx2", "avx512f"}, None, ("float32",)),
    ("cpu", {"avx512_bf16"}, None, ("float32", "mixed_bfloat16")),
    ("cpu", {"amx_bf16", "amx_tile"}, None, ("float32", "mixed_bfloat16")),
    ("gpu", None, 6.1, ("float32",)),
    ("gpu", None, 7.0, ("float32", "mixed_float16")),
    ("gpu", None, 8.6, ("float32", "mixed_bfloat16", "mixed_float16")),
])
def test_supported_precisions(device, flags, capability, expected):
    precisions, reason = supported_precisions(device, flags=flags, compute_capability=capability)
    assert precisions == expected and reason


def test_cpu_flags_and_compute_capability_are_read(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"} and cpu_flags(tmp_path / "none") == set()

    def smi(args, **kwargs):
        assert "--query-gpu=index,compute_cap" in args
        return subprocess.CompletedProcess(args, 0, stdout="0, 8.9\n1, 7.5\n", stderr="")

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_compute_capability(smi) == 7.5  # the weakest GPU decides
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert gpu_compute_capability(smi) == 8.9


def _plan(precisions, speed=SPEED, **kwargs):
    timer, seen = precision_timer(speed)
    hardware = Hardware("cpu", 8 * GIB, precisions=precisions, precision_reason="faked")
    fp = fingerprint([[1.0, 1.0, 1.0]] * 20, [[64, 64, 64]] * 20)
    return make_plan(fp, hardware=hardware, time_budget_minutes=30, step_timer=timer, **kwargs), seen


def test_auto_times_each_supported_precision_and_fits_the_schedule_to_the_fastest():
    plan, seen = _plan(("float32", "mixed_bfloat16"))
    assert seen[-1] == "mixed_bfloat16" and set(seen[:-1]) == {"float32"}  # fitted in float32, then bf16 timed
    assert plan.choices["precision"].value == "mixed_bfloat16" and plan.config["train.precision"] == "mixed_bfloat16"
    timings = plan.measured["precision"]
    assert timings["mixed_bfloat16"]["step_seconds"] == pytest.approx(0.6 * timings["float32"]["step_seconds"])
    # the schedule is costed with the chosen precision's step; the final evaluation with float32's windows
    assert plan.predicted["loop_step_seconds"] == pytest.approx(timings["mixed_bfloat16"]["step_seconds"] * 1.1 + 0.15)
    assert plan.measured["step_seconds"] == timings["mixed_bfloat16"]["step_seconds"]
    assert plan.measured["window_seconds"] == timings["float32"]["window_seconds"]
    # both times in the table, with the reason
    row = next(line for line in plan.table().splitlines() if line.startswith("precision"))
    assert "1.67× faster" in row and "float32" in row and "faked" in row
    memory = plan.predicted["memory_bytes_by_precision"]
    assert memory["mixed_bfloat16"] < memory["float32"]

    # the same plan with a bf16 slower than float32 (an emulating CPU): float32, and a shorter schedule
    slow, _ = _plan(("float32", "mixed_bfloat16"), speed={**SPEED, "mixed_bfloat16": 1.3})
    assert slow.choices["precision"].value == "float32" and slow.config["train.precision"] == "float32"
    steps = lambda p: p.config["train.epochs"] * p.config["train.steps_per_epoch"]  # noqa: E731
    assert steps(plan) > steps(slow)


def test_a_machine_without_mixed_units_times_float32_only():
    plan, seen = _plan(("float32",))
    assert set(seen) == {"float32"} and plan.choices["precision"].value == "float32"
    assert "the only precision timed" in plan.choices["precision"].reason


def test_a_given_precision_is_timed_alone():
    plan, seen = _plan(("float32", "mixed_bfloat16"), precision="mixed_float16")
    assert set(seen) == {"mixed_float16"}
    assert plan.choices["precision"].value == "mixed_float16" and plan.config["train.precision"] == "mixed_float16"


def test_without_a_budget_auto_is_float32_and_not_written():
    fp = fingerprint([[1.0, 1.0, 1.0]] * 20, [[64, 64, 64]] * 20)
    plan = make_plan(fp, hardware=Hardware("cpu", 8 * GIB, precisions=("float32", "mixed_bfloat16")))
    assert plan.choices["precision"].value == "float32" and "no time budget" in plan.choices["precision"].reason
    assert "train.precision" not in plan.config

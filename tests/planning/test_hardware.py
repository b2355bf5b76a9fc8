"""The machine a plan is made for: the GPU memory budget from nvidia-smi (faked here)."""
import subprocess

import pytest

from segpipe.planning import hardware
from segpipe.planning.hardware import GIB, gpu_budget, nvidia_memory_bytes


def fake_smi(stdout: str, returncode: int = 0):
    def run(args, **kwargs):
        assert args[0] == "nvidia-smi" and "--query-gpu=index,memory.total" in args
        return subprocess.CompletedProcess(args, returncode, stdout=stdout, stderr="")
    return run


def test_the_smallest_visible_gpu_counts(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvidia_memory_bytes(fake_smi("0, 24576\n1, 6144\n")) == 6144 * 2**20
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert nvidia_memory_bytes(fake_smi("0, 24576\n1, 6144\n")) == 24576 * 2**20


@pytest.mark.parametrize("stdout, code", [("", 0), ("No devices were found\n", 0), ("0, 8192\n", 9)])
def test_unreadable_output_is_unknown(stdout, code, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvidia_memory_bytes(fake_smi(stdout, code)) is None


def test_a_missing_nvidia_smi_is_unknown(monkeypatch):
    def run(args, **kwargs):
        raise FileNotFoundError("nvidia-smi")
    assert nvidia_memory_bytes(run) is None


def test_budget_is_8_gib_or_85_percent_of_a_smaller_gpu():
    assert gpu_budget(None)[0] == 8 * GIB
    assert gpu_budget(24 * GIB)[0] == 8 * GIB
    budget, why = gpu_budget(6 * GIB)
    assert budget == int(6 * GIB * 0.85) and "85 %" in why and "6.0 GiB" in why


def test_detect_hardware_on_a_small_gpu(monkeypatch):
    monkeypatch.setattr(hardware, "nvidia_memory_bytes", lambda: 4 * GIB)
    plan_hw = hardware.detect_hardware(device="gpu")
    assert plan_hw.memory_bytes == int(4 * GIB * 0.85) and "4.0 GiB" in plan_hw.description
    assert hardware.detect_hardware(device="gpu", memory_gib=2).memory_bytes == 2 * GIB  # given wins

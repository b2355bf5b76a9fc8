"""The machine a plan is made for: CPU or GPU, and the memory a training step may use."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from segpipe.planning.plan import Hardware

GIB = 2**30
CPU_MAX_BUDGET = 8 * GIB  # nnU-Net's default target; a CPU step that large would take minutes anyway
GPU_DEFAULT_BUDGET = 8 * GIB  # nnU-Net's default GPU memory target
# of a smaller device's memory: the CUDA context, cuDNN workspaces and fragmentation take the rest
GPU_USABLE_SHARE = 0.85


def available_ram_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo, else the physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def nvidia_gpus() -> int:
    """NVIDIA GPUs the driver lists (``/proc/driver/nvidia/gpus``), limited by ``CUDA_VISIBLE_DEVICES``.

    Read without TensorFlow: a multi-worker run must create its strategy before TensorFlow does
    anything else, and planning must not be what starts it.
    """
    folder = Path("/proc/driver/nvidia/gpus")
    found = len(list(folder.iterdir())) if folder.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        found = min(found, len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"]))
    return found


def nvidia_memory_bytes(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int | None:
    """The smallest total memory of the visible NVIDIA GPUs, from ``nvidia-smi``; None if it cannot tell.

    ``nvidia-smi`` lists every GPU; ``CUDA_VISIBLE_DEVICES`` (indices) limits the ones counted.
    Read without TensorFlow, like :func:`nvidia_gpus`.
    """
    if run is subprocess.run and shutil.which("nvidia-smi") is None:
        return None
    try:
        result = run(["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                     capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    sizes = {}
    for line in result.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            sizes[parts[0]] = int(parts[1]) * 2**20  # MiB
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        sizes = {k: v for k, v in sizes.items() if k in {i.strip() for i in visible.split(",")}}
    return min(sizes.values()) if sizes else None


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU units that run bfloat16 arithmetic natively


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def gpu_compute_capability(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> float | None:
    """The lowest compute capability of the visible NVIDIA GPUs (``nvidia-smi``), e.g. 8.0; None if unknown."""
    if run is subprocess.run and shutil.which("nvidia-smi") is None:
        return None
    try:
        result = run(["nvidia-smi", "--query-gpu=index,compute_cap", "--format=csv,noheader"],
                     capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    caps = {}
    for line in result.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            caps[parts[0]] = float(parts[1])
        except (IndexError, ValueError):
            continue
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        caps = {k: v for k, v in caps.items() if k in {i.strip() for i in visible.split(",")}}
    return min(caps.values()) if caps else None


def supported_precisions(device: str, *, flags: set[str] | None = None,
                         compute_capability: float | None = None) -> tuple[tuple[str, ...], str]:
    """The ``train.precision`` values worth timing on this device, and why.

    A CPU: bfloat16 only with native bfloat16 units (``avx512_bf16`` or ``amx_bf16``: otherwise it is
    emulated and slower than float32); float16 never (no CPU runs float16 convolutions natively).
    A GPU: bfloat16 from compute capability 8.0 (Ampere), float16 from 7.0 (Volta tensor cores).

    Parameters
    ----------
    device : "cpu" or "gpu".
    flags : the CPU's flags (default: :func:`cpu_flags`).
    compute_capability : the GPU's (default: :func:`gpu_compute_capability`).

    Returns
    -------
    (precisions, reason) : float32 first.

    Examples
    --------
    >>> supported_precisions("cpu", flags={"avx2", "avx512_bf16"})[0]
    ('float32', 'mixed_bfloat16')
    >>> supported_precisions("gpu", compute_capability=7.5)[0]
    ('float32', 'mixed_float16')
    """
    if device == "cpu":
        flags = cpu_flags() if flags is None else flags
        found = [f for f in BF16_CPU_FLAGS if f in flags]
        if found:
            return ("float32", "mixed_bfloat16"), f"bf16: the CPU has {' and '.join(found)}; no CPU float16 units"
        return ("float32",), "the CPU has no bfloat16 units (avx512_bf16, amx_bf16) nor float16 ones"
    capability = gpu_compute_capability() if compute_capability is None else compute_capability
    if capability is None:
        return ("float32",), "the GPU's compute capability was not read (nvidia-smi)"
    precisions = (["float32"] + (["mixed_bfloat16"] if capability >= 8.0 else [])
                  + (["mixed_float16"] if capability >= 7.0 else []))
    return tuple(precisions), f"GPU compute capability {capability:g} (bf16 from 8.0, fp16 from 7.0)"


def gpu_budget(device_bytes: int | None) -> tuple[int, str]:
    """nnU-Net's 8 GiB target, or less on a GPU too small for it (85 % of its memory)."""
    if device_bytes is None:
        return GPU_DEFAULT_BUDGET, "8 GiB (nnU-Net's default target; device memory not read)"
    usable = int(device_bytes * GPU_USABLE_SHARE)
    if usable < GPU_DEFAULT_BUDGET:
        return usable, f"85 % of the GPU's {device_bytes / GIB:.1f} GiB, below nnU-Net's 8 GiB target"
    return GPU_DEFAULT_BUDGET, f"8 GiB (nnU-Net's default target; the GPU has {device_bytes / GIB:.1f} GiB)"


def detect_hardware(*, memory_gib: float | None = None, device: str | None = None) -> Hardware:
    """This machine: a GPU if the NVIDIA driver lists one (budget: :func:`gpu_budget`), else the CPU with
    half the available RAM (at most 8 GiB).

    ``memory_gib`` overrides the budget, ``device`` ("cpu"/"gpu") the detection.
    """
    if device is None:
        device = "gpu" if nvidia_gpus() else "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if memory_gib is not None:
        budget = int(memory_gib * GIB)
        how = f"{memory_gib:g} GiB given"
    elif device == "gpu":
        budget, how = gpu_budget(nvidia_memory_bytes())
    else:
        free = available_ram_bytes()
        budget = int(min(CPU_MAX_BUDGET, free / 2))
        how = f"half of {free / GIB:.1f} GiB available RAM, at most 8 GiB"
    precisions, why = supported_precisions(device)
    return Hardware(device=device, memory_bytes=budget, cores=cores,
                    description=f"{device.upper()}, {cores} cores, budget {budget / GIB:.1f} GiB ({how})",
                    precisions=precisions, precision_reason=why)

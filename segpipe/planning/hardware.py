"""The machine a plan is made for: CPU or GPU, and the memory a training step may use."""
from __future__ import annotations

import os
from pathlib import Path

from segpipe.planning.planner import Hardware

GIB = 2**30
CPU_MAX_BUDGET = 8 * GIB  # nnU-Net's default target; a CPU step that large would take minutes anyway
GPU_DEFAULT_BUDGET = 8 * GIB  # nnU-Net's default GPU memory target when the device size is unknown


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


def detect_hardware(*, memory_gib: float | None = None, device: str | None = None) -> Hardware:
    """This machine: a GPU if the NVIDIA driver lists one, else the CPU with half the available RAM (at most 8 GiB).

    ``memory_gib`` overrides the budget, ``device`` ("cpu"/"gpu") the detection.
    """
    if device is None:
        device = "gpu" if nvidia_gpus() else "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if memory_gib is not None:
        budget = int(memory_gib * GIB)
        how = f"{memory_gib:g} GiB given"
    elif device == "gpu":
        budget, how = GPU_DEFAULT_BUDGET, "8 GiB (nnU-Net's default target)"
    else:
        free = available_ram_bytes()
        budget = int(min(CPU_MAX_BUDGET, free / 2))
        how = f"half of {free / GIB:.1f} GiB available RAM, at most 8 GiB"
    return Hardware(device=device, memory_bytes=budget, cores=cores,
                    description=f"{device.upper()}, {cores} cores, budget {budget / GIB:.1f} GiB ({how})")

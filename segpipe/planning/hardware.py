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


def detect_hardware(*, memory_gib: float | None = None, device: str | None = None) -> Hardware:
    """This machine: a GPU if TensorFlow sees one, else the CPU with half the available RAM (at most 8 GiB).

    ``memory_gib`` overrides the budget, ``device`` ("cpu"/"gpu") the detection.
    """
    if device is None:
        # TensorFlow only here: planning without a time budget never needs it
        import tensorflow as tf

        device = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
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

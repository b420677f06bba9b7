"""What machine this is, in one place: the CPU's name, core count, architecture and GPU, as manifests and bench
results record them. Torch-free."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform.processor() elsewhere, which on Linux is only the
    architecture)."""
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    from .cuda_info import gpu

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "arch": platform.machine(), "gpu": gpu()}

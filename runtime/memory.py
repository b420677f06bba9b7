"""Peak memory over a window, sampled by a thread so it can go down between windows: host RSS and GPU memory.

A process's high-water mark (ru_maxrss, VmHWM) only ever rises, so it cannot tell one stage from the next; PeakRss
samples /proc/self/statm every few milliseconds instead (Linux only; elsewhere it reports None). PeakDevice samples
NVML's used memory of GPU 0 the same way (the whole device's, so run nothing else on it; None without NVML).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from .cuda_info import device_memory_used


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory a new allocation can still get: MemAvailable plus free swap (Linux; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, ValueError, KeyError, IndexError):
        return None


class PeakSampler:
    """with PeakSampler(read) as m: ...; m.peak -> the largest `read()` sampled inside the block (bytes), or None."""

    def __init__(self, read: Callable[[], int | None], interval_s: float = 0.005):
        self.read = read
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            v = self.read()
            if v is not None:
                self.peak = max(self.peak or 0, v)
            time.sleep(self.interval_s)

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else self.peak / 2**20

    def __enter__(self):
        self.peak = self.read()
        self._thread = None
        if self.peak is not None:  # nothing to sample here (no /proc, no NVML): no thread
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        v = self.read()
        if v is not None:
            self.peak = max(self.peak or 0, v)


class PeakRss(PeakSampler):
    """Peak resident set size of this process."""

    def __init__(self, interval_s: float = 0.005):
        super().__init__(rss_bytes, interval_s)


class PeakDevice(PeakSampler):
    """Peak used memory of GPU 0 (all processes on it; runtime/cuda_info.py), or None without a GPU."""

    def __init__(self, interval_s: float = 0.005):
        super().__init__(device_memory_used, interval_s)

"""Peak host memory (RSS) over a window, sampled by a thread so it can go down between windows.

A process's high-water mark (ru_maxrss, VmHWM) only ever rises, so it cannot tell one stage from the next; this
samples /proc/self/statm every few milliseconds instead. Linux only; elsewhere it reports None.
"""

from __future__ import annotations

import os
import threading
import time


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class PeakRss:
    """with PeakRss() as m: ...; m.peak -> bytes (max sampled RSS inside the block), or None."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            v = rss_bytes()
            if v is not None:
                self.peak = max(self.peak or 0, v)
            time.sleep(self.interval_s)

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else self.peak / 2**20

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        v = rss_bytes()
        if v is not None:
            self.peak = max(self.peak or 0, v)

"""Ctrl-C (and SIGTERM) that cannot be lost: a handler that remembers the interrupt as well as raising it.

SIGTERM (a service manager stopping the run, `kill`) is raised as KeyboardInterrupt too, so every `finally` runs:
staging folders and temporary files are removed, nothing is renamed into place. `interrupted_by()` says which
signal it was, for the exit code (128 + the signal's number).

CPython raises KeyboardInterrupt wherever the main thread happens to be; when that is a callback whose exceptions
are ignored (importlib's module-lock weakref callback, a __del__), the interrupt is printed as "Exception ignored" and
the program goes on. A build that goes on would then rename its result into place although the user asked it to
stop. Builds call `raise_if_interrupted()` before they commit anything, so a swallowed Ctrl-C still stops them.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_interrupted = threading.Event()
_signal = [signal.SIGINT]  # the last one received


def _on_signal(signum, frame):
    _signal[0] = signum
    _interrupted.set()
    raise KeyboardInterrupt


def interrupted_by() -> int:
    return int(_signal[0])


@contextlib.contextmanager
def remembered_interrupts():
    """Install the remembering SIGINT/SIGTERM handler for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()
    _signal[0] = signal.SIGINT
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived since the handler was installed, even one that was swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt

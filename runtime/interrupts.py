"""Ctrl-C that cannot be lost: a SIGINT handler that remembers the interrupt as well as raising it.

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


def _on_sigint(signum, frame):
    _interrupted.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def remembered_interrupts():
    """Install the remembering SIGINT handler for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived since the handler was installed, even one that was swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt

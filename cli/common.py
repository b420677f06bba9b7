"""What every CLI shares: SoraError and OSError (disk full, read-only, busy, ...) -> one line on stderr and exit 2;
Ctrl-C -> exit 130, SIGTERM -> 143 (after every cleanup ran); warnings as lines."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from ..runtime.errors import SoraError
from ..runtime.interrupts import interrupted_by, remembered_interrupts


def cli_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger = logging.getLogger("soraedge")
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        try:
            with remembered_interrupts():
                return fn(*args, **kwargs)
        except SoraError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # what the file system says no with, after every temporary file was removed
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where} (nothing was written)", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory (nothing was written); try --low-memory or a smaller size", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            # Exit here, not through sys.exit: when the interrupt passed through exec'd code (torch's generated
            # graph code during export), CPython 3.11 under `python -m` records it as unhandled and, after
            # finalizing, kills the process with SIGINT (status -2) although it was caught here. Everything has
            # unwound by now (staging directories removed, writers closed); only the stdio buffers are left.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + interrupted_by())
        finally:
            logger.removeHandler(handler)

    return wrapper

"""What every CLI shares: SoraError -> one line on stderr and exit 2; Ctrl-C -> exit 130; warnings as lines."""

from __future__ import annotations

import functools
import logging
import sys

import click

from ..runtime.errors import SoraError


def cli_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger = logging.getLogger("soraedge")
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        try:
            return fn(*args, **kwargs)
        except SoraError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        finally:
            logger.removeHandler(handler)

    return wrapper

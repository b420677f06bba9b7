"""What the CLIs share: `cli_errors` (SoraError and OSError (disk full, read-only, busy, ...) -> one line on stderr
and exit 2; Ctrl-C -> exit 130, SIGTERM -> 143 (after every cleanup ran); warnings as lines), the --trt-* options of
sora-export and sora-build (`trt_options`), the line a build prints (`written`), and --help in sections
(`sectioned`)."""

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


def choice(*values) -> click.Choice:
    """A click choice among names of runtime/choices.py (as their text: click would offer an enum's member names)."""
    return click.Choice([str(v) for v in values])


def trt_options(fn):
    """The --trt-* options of a native TensorRT build (--backend tensorrt), handed to the command as one `trt`
    (target/trt_target.TrtOptions)."""
    options = [
        click.option("--trt-attention", type=click.Choice(["native", "plugin", "int8"]), default="native",
                     show_default=True, help="--backend tensorrt: native leaves attention to TensorRT's fusion; "
                     "plugin / int8 replace every DiT attention with this project's Triton flash / INT8 attention "
                     "plugin (TensorRT >= 10.9; an fp16 DiT)."),
        click.option("--trt-workspace-mb", type=int, help="--backend tensorrt: builder workspace limit."),
        click.option("--trt-tactic-memory-mb", type=int, help="--backend tensorrt: tactic memory limit (Jetson "
                     "builds that run out of unified memory)."),
        click.option("--trt-opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
                     help="--backend tensorrt: builder optimization level."),
        click.option("--trt-version-compatible", is_flag=True, help="--backend tensorrt: plans that later TensorRT "
                     "versions of the same major version also run."),
        click.option("--trt-hardware-compatible", is_flag=True,
                     help="--backend tensorrt: plans that run on any Ampere or newer GPU."),
        click.option("--trt-refittable", is_flag=True, help="--backend tensorrt: a DiT plan that takes new weights "
                     "at load, so sora-run --lora applies LoRAs without a rebuild (TensorRT's refitter)."),
    ]

    @functools.wraps(fn)
    def wrapper(*args, trt_attention, trt_workspace_mb, trt_tactic_memory_mb, trt_opt_level, trt_version_compatible,
                trt_hardware_compatible, trt_refittable, **kwargs):
        from ..target.trt_build import BuildSettings
        from ..target.trt_target import TrtOptions

        trt = TrtOptions(trt_attention, BuildSettings(trt_workspace_mb, trt_tactic_memory_mb, trt_opt_level,
                                                      trt_version_compatible, trt_hardware_compatible,
                                                      trt_refittable))
        return fn(*args, trt=trt, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def written(report) -> None:
    """The line a build prints when it wrote something (a reused build prints its own)."""
    if not report.reused:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
        click.echo(f"engines written to {report.out} ({stages})")


def sectioned(sections: dict[str, str]):
    """A click Command class whose --help lists options in sections ({option name: section title}; the rest under
    "Options", which comes first), so the few options that matter are seen before the many that tune."""

    class SectionedCommand(click.Command):
        def format_options(self, ctx, formatter):
            groups: dict[str, list] = {"Options": []}
            for param in self.get_params(ctx):
                record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
                if record:
                    groups.setdefault(sections.get(param.name, "Options"), []).append(record)
            for title, rows in groups.items():
                with formatter.section(title):
                    formatter.write_dl(rows)

    return SectionedCommand

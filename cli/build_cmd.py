"""sora-build ONNX_DIR -o ENGINE_DIR --backend B: the runtime target of an exported directory, built on the machine
that will run it (target/build.py). The second half of the two-step path: `sora-export MODEL -o ONNX_DIR
--onnx-only` on a workstation, then this on the device. No torch and no checkpoint are needed.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.choices import AUTO, BACKENDS, EXECUTIONS
from ..target.choose import BF16_MIN_SPEEDUP
from .common import choice, cli_errors, trt_options, written


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Engine directory to write (may be SOURCE itself: rebuilt in place, replaced when done).")
@click.option("--backend", type=choice(AUTO, *BACKENDS),
              default="auto", show_default=True,
              help="Runtime target. CPU: auto times one DiT step on ort and openvino and keeps the fastest. GPU, "
                   "built for this machine's GPU and recorded in the manifest: ort-cuda, ort-trt, tensorrt.")
@click.option("--precision", type=choice(AUTO, *EXECUTIONS), default="auto", show_default=True,
              help="Execution precision (the graphs keep the precision they were exported with): auto runs fp32 "
                   f"graphs in bf16 where that is measured at least {BF16_MIN_SPEEDUP}x faster on this CPU and passes "
                   f"the quality gate.")
@click.option("--threads", type=int, help="Threads for backend timing and the gate (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing, different engine directory.")
@trt_options
@cli_errors
def main(source, out, backend, precision, threads, overwrite, trt):
    """Build OUT for a runtime target from SOURCE, an engine directory written by sora-export (typically with
    --onnx-only)."""
    from ..target.build import TargetConfig, build_from_engines

    written(build_from_engines(TargetConfig(source, out, backend, threads, overwrite, trt, precision),
                               log=click.echo))


if __name__ == "__main__":
    main()

"""sora-export MODEL -o DIR: a diffusers Wan2.1 directory (or `demo`) -> an engine directory for ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import click

from .common import cli_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Engine directory to write.")
@click.option("--frames", type=int, help="Default frame count (4k+1) recorded for sora-run.")
@click.option("--max-frames", type=int, default=81, show_default=True,
              help="Most frames (4k+1) the engines accept; the chunked VAE decodes any count up to it.")
@click.option("--height", type=int, help="Default height recorded for sora-run (multiple of 16).")
@click.option("--width", type=int, help="Default width recorded for sora-run (multiple of 16).")
@click.option("--attention", type=click.Choice(["onnx-attention", "decomposed"]), default="onnx-attention",
              show_default=True,
              help="onnx-attention: one ONNX Attention node (opset 23). decomposed: MatMul-Softmax-MatMul (opset 20),"
                   " for TensorRT < 10.14.")
@click.option("--max-sequence-length", default=512, show_default=True, type=click.IntRange(2, 4096))
@click.option("--overwrite", is_flag=True, help="Replace an existing, different engine directory.")
@click.option("--skip-parity", is_flag=True, help="Do not run the ONNX-vs-PyTorch check after export.")
@click.option("--backend", type=click.Choice(["auto", "ort", "openvino"]), default="auto", show_default=True,
              help="CPU backend sora-run uses by default; auto times one DiT step on each and keeps the fastest.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="CPU execution precision; bf16 runs on OpenVINO and must pass the quality gate.")
@click.option("--min-psnr", type=float, default=30.0, show_default=True,
              help="Quality gate for reduced precision: final-frame PSNR against fp32, in dB.")
@click.option("--threads", type=int, help="Threads for the backend timing and gate (default: all cores).")
@cli_errors
def main(model, out, frames, max_frames, height, width, attention, max_sequence_length, overwrite, skip_parity, backend,
         precision, min_psnr, threads):
    """Export MODEL (a diffusers-format Wan2.1-T2V directory, or the built-in `demo`) to OUT."""
    try:
        from ..export.build import ExportConfig, run_export
        from ..export.dit import AttentionForm
    except ImportError as e:
        from ..runtime.errors import SoraError

        raise SoraError(f"the export toolchain is not installed ({e.name}): pip install 'soraedge[export]'") from None
    cfg = ExportConfig(model=model, out=out, frames=frames, max_frames=max_frames, height=height, width=width,
                       attention=AttentionForm(attention), max_sequence_length=max_sequence_length,
                       overwrite=overwrite, check_parity=not skip_parity, backend=backend, precision=precision,
                       min_psnr=min_psnr, threads=threads)
    report = run_export(cfg, log=click.echo)
    if not report.reused:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items())
        click.echo(f"engines written to {report.out} ({stages})")


if __name__ == "__main__":
    main()

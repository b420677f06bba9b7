"""sora-bench MODEL: latency per stage and end to end, engines against the PyTorch reference, in one run."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .common import cli_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--engines", multiple=True, type=click.Path(path_type=Path),
              help="Engine directory to time (repeatable). Default: export MODEL into a temporary directory.")
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--frames", type=int)
@click.option("--steps", type=int)
@click.option("--guidance", type=float)
@click.option("--prompt", default="a red fox runs along the beach at sunset", show_default=True)
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--peers", default="ort-fp32,openvino-fp32,openvino-bf16,ort-cuda-fp32", show_default=True,
              help="Engine backends/precisions to time (those not available here are skipped; ort-cuda times a "
                   "build of the engines for this GPU).")
@click.option("--reference-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the PyTorch reference runs (cuda: beside the ort-cuda peer, on the same GPU).")
@click.option("--no-scaling", is_flag=True, help="Skip the latency-vs-tokens curves.")
@click.option("--compile", "compile_", is_flag=True, help="Also time torch.compile of the reference transformer.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
              help="Folder of the results: e2e_<scenario>_<machine>_<date>.json/.md/.png and an index.")
@cli_errors
def main(model, engines, height, width, frames, steps, guidance, prompt, threads, repeats, peers, reference_device,
         no_scaling, compile_, out):
    """Benchmark MODEL (a diffusers Wan2.1 directory or `demo`)."""
    from tqdm import tqdm

    from ..bench.e2e import BenchConfig, run_bench, write_results

    cfg = BenchConfig(model=model, engines=tuple(engines), height=height, width=width, frames=frames, steps=steps,
                      guidance=guidance, prompt=prompt, threads=threads, repeats=repeats,
                      peers=tuple(p for p in peers.split(",") if p), scaling=not no_scaling, compile=compile_,
                      reference_device=reference_device)
    with tqdm(desc="bench", unit="run", leave=False) as bar:
        result = run_bench(cfg, log=lambda s: bar.write(s), tick=bar.update)
    path = write_results(result, out)
    click.echo(f"results: {path.with_suffix('.*')}")


if __name__ == "__main__":
    main()

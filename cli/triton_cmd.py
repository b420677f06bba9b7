"""sora-triton: an engine directory -> a Triton Inference Server model repository (serve/repository.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import cli_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engines", type=click.Path(path_type=Path))
@click.option("-o", "--out", "repo", required=True, type=click.Path(path_type=Path), help="Model repository to write.")
@click.option("--prefix", default="soraedge", show_default=True,
              help="Name of the sampler model; engine models are named PREFIX_<engine>.")
@click.option("--instances", type=int, default=1, show_default=True, help="Instances of each model.")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the engine models' instances run.")
@click.option("--python-engines", is_flag=True,
              help="Serve the engines through the Python backend on ONNX Runtime, for servers built without "
                   "Triton's onnxruntime backend (e.g. the one in the nvidia-pytriton wheel).")
@click.option("--overwrite", is_flag=True, help="Replace an existing repository at --out.")
@cli_errors
def main(engines, repo, prefix, instances, kind, python_engines, overwrite):
    """Write a Triton model repository serving the engines in ENGINES and a sampler model that runs them."""
    from ..serve.repository import write_triton_repo

    models = write_triton_repo(engines, repo, prefix, instances, kind, python_engines, overwrite)
    click.echo(f"wrote {repo}: sampler model {prefix!r} over {', '.join(models.values())}")
    click.echo(f"start: tritonserver --model-repository {repo}   then: python -m soraedge.cli.triton_client "
               f"--model {prefix} --prompt '...' -o out.mp4")


if __name__ == "__main__":
    main()

"""A client of the Triton sampler model (sora-triton's repository): prompt in, video file out, over gRPC.

    python -m soraedge.cli.triton_client --url localhost:8001 --model soraedge --prompt "..." -o out.mp4
                                         [--steps N] [--guidance G] [--seed S] [--height H --width W --frames F]

`generate` is the library form (the test of a real server uses it). Needs `tritonclient[grpc]` (the `triton`
extra); the request's tensors are the ones serve/bls.py declares.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ..runtime.schedulers import KINDS as SCHEDULER_KINDS
from ..serve.bls import REQUEST_INPUTS
from .common import cli_errors


def generate(url: str, model: str, timeout_s: float = 600.0, **arguments) -> tuple[np.ndarray, dict]:
    """Send one request; returns (uint8 video [F, H, W, 3], stage timings). `arguments` are REQUEST_INPUTS in lower
    case (prompt=..., steps=...); None or absent ones take the engine directory's defaults."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from ..runtime.errors import SoraError

    inputs = []
    for name, triton_type, dtype, _ in REQUEST_INPUTS:
        value = arguments.get(name.lower())
        if value is None:
            continue
        array = np.array([value.encode() if dtype is np.object_ else value], dtype=dtype)
        tensor = grpc.InferInput(name, [1], triton_type.removeprefix("TYPE_").replace("STRING", "BYTES"))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = grpc.InferenceServerClient(url)
    try:
        result = client.infer(model, inputs, client_timeout=timeout_s)
    except InferenceServerException as e:
        raise SoraError(f"{model} at {url}: {e.message()}") from None
    finally:
        client.close()
    return result.as_numpy("VIDEO"), json.loads(result.as_numpy("TIMINGS")[0])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", default="localhost:8001", show_default=True, help="Triton's gRPC endpoint.")
@click.option("--model", default="soraedge", show_default=True, help="The sampler model's name.")
@click.option("--prompt", required=True)
@click.option("--negative-prompt")
@click.option("--steps", type=int)
@click.option("--guidance", type=float)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--frames", type=int)
@click.option("--guidance-2", type=float, help="Wan2.2 A14B: the low-noise expert's guidance scale.")
@click.option("--scheduler", type=click.Choice(list(SCHEDULER_KINDS)))
@click.option("--flow-shift", type=float)
@click.option("--fps", type=int, default=16, show_default=True)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output .mp4, .gif or .npy")
@cli_errors
def main(url, model, prompt, negative_prompt, steps, guidance, seed, height, width, frames, guidance_2, scheduler,
         flow_shift, fps, out):
    """Generate a video on a Triton server running a sora-triton repository."""
    from ..runtime.video import check_output_path, write_video

    out = check_output_path(out)
    video, timings = generate(url, model, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                              guidance=guidance, seed=seed, height=height, width=width, frames=frames,
                              guidance_2=guidance_2, scheduler=scheduler, flow_shift=flow_shift)
    write_video(out, video.astype(np.float32) / 255.0, fps)
    click.echo(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}); server time: "
               + " | ".join(f"{k} {v:.2f}s" for k, v in timings.items()))


if __name__ == "__main__":
    main()

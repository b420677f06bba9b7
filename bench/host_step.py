"""What the sampler does on the host between two DiT calls, at Wan2.1's real latent shapes: does it matter?

The sampler loop (runtime/sampler.py) keeps the latents on the host. Each step it builds the CFG batch, combines the
two guidance branches, and runs the scheduler's update (UniPC, Wan2.1's scheduler config) in numpy. A GPU backend
also copies the batch of latents to the device and the noise prediction back. This bench times the host part with a
denoiser that returns a fixed prediction, so everything but the DiT is measured. It also counts the bytes a GPU
backend moves per step (the text embeddings are uploaded once per generation, see backends/ort_io.py). Compare the
result with the DiT step time on the same machine to get the fraction.

    python -m soraedge.bench.host_step [--steps 20]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..runtime.machine import machine
from .harness import results_option, save

# (frames, height, width) -> latents [1, 16, (F-1)/4+1, H/8, W/8]; tokens after the 1x2x2 patch
SHAPES = {"480x832x81 (32760 tokens)": (81, 480, 832), "256x256x17 (1280 tokens)": (17, 256, 256)}


def _wan_scheduler(tmp: Path):
    from diffusers import UniPCMultistepScheduler

    from ..runtime.schedulers import load_scheduler

    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_config(tmp)
    return load_scheduler(tmp / "scheduler_config.json")


class FixedPrediction:
    """A denoiser whose output is a fixed array of the right shape: the DiT's cost taken out of the loop."""

    max_batch = 2

    def __init__(self, shape):
        self.out = {b: np.random.default_rng(0).standard_normal((b, *shape[1:]), dtype=np.float32) for b in (1, 2)}

    def __call__(self, latents, timestep, context):
        return self.out[latents.shape[0]]


def run(steps: int) -> dict:
    from ..runtime.sampler import sample

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        scheduler = _wan_scheduler(Path(tmp))
        for label, (f, h, w) in SHAPES.items():
            shape = (1, 16, (f - 1) // 4 + 1, h // 8, w // 8)  # [1, C, f, h, w]
            latents = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
            ctx = np.zeros((1, 512, 4096), np.float32)
            sample(FixedPrediction(shape), scheduler, latents, ctx, ctx, 5.0, 2)  # warm-up
            t0 = time.perf_counter()
            sample(FixedPrediction(shape), scheduler, latents, ctx, ctx, 5.0, steps)
            per_step = (time.perf_counter() - t0) / steps
            latent_bytes = int(np.prod(shape)) * 4
            rows[label] = {"latents": list(shape), "host_ms_per_step": per_step * 1000,
                           "to_device_bytes_per_step": 2 * latent_bytes + 8,  # CFG batch of latents + 2 timesteps
                           "to_host_bytes_per_step": 2 * latent_bytes,  # the noise prediction, both branches
                           "context_bytes_per_generation": 2 * 512 * 4096 * 4}
    return {"steps": steps, "scheduler": "UniPCMultistepScheduler (flow_prediction, flow_shift 3.0)",
            "guidance": 5.0, "machine": machine(), "rows": rows}


def to_markdown(r: dict) -> str:
    lines = [f"### Host work per sampler step (no DiT): {r['machine']['cpu']}, numpy; {r['scheduler']}, CFG "
             f"{r['guidance']}, {r['steps']} steps", "",
             "| shape | latents | host ms / step | to device / step | to host / step | text embeddings / generation |",
             "|---|---|---|---|---|---|"]
    for label, row in r["rows"].items():
        lines.append(f"| {label} | {row['latents']} | {row['host_ms_per_step']:.2f} | "
                     f"{row['to_device_bytes_per_step'] / 2**20:.2f} MiB | {row['to_host_bytes_per_step'] / 2**20:.2f} "
                     f"MiB | {row['context_bytes_per_generation'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--steps", type=int, default=20, show_default=True)
@results_option
def main(steps, results):
    r = run(steps)
    save("host_step", "wan2.1-latents", r, to_markdown(r), results)


if __name__ == "__main__":
    main()

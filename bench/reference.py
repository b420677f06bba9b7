"""The PyTorch reference, timed per stage without rewriting it: diffusers' WanPipeline with timing hooks.

The text encoder's, transformer's and VAE decoder's forward calls are wrapped so one ordinary `pipe(...)` call
yields per-stage times (diffusers runs the two CFG branches as two transformer calls; a step's time is their sum).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np


def sync() -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (nothing to wait for on the CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def stage_timers(pipe):
    """Yields a dict that fills with {'encode': [...], 'dit': [...], 'decode': [...]} call durations."""
    times: dict[str, list[float]] = {"encode": [], "dit": [], "decode": []}
    originals = []

    def wrap(obj, attr, key):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            times[key].append(time.perf_counter() - t0)
            return out

        originals.append((obj, attr, fn))
        setattr(obj, attr, timed)

    wrap(pipe.text_encoder, "forward", "encode")
    wrap(pipe.transformer, "forward", "dit")
    wrap(pipe.vae, "decode", "decode")
    try:
        yield times
    finally:
        for obj, attr, fn in originals:
            setattr(obj, attr, fn)


def run_reference(pipe, prompt: str, negative: str, height: int, width: int, frames: int, steps: int,
                  guidance: float, latents: np.ndarray) -> tuple[np.ndarray, dict, list[float]]:
    """One timed WanPipeline generation: frames [F, H, W, 3], stage seconds, per-step seconds."""
    import torch

    with stage_timers(pipe) as t:
        t0 = time.perf_counter()
        frames_out = pipe(prompt=prompt, negative_prompt=negative, height=height, width=width, num_frames=frames,
                          num_inference_steps=steps, guidance_scale=guidance, latents=torch.from_numpy(latents),
                          output_type="np").frames[0]
        total = time.perf_counter() - t0
    per_step_calls = 2 if guidance > 1.0 else 1
    steps_s = [sum(t["dit"][i:i + per_step_calls]) for i in range(0, len(t["dit"]), per_step_calls)]
    stages = {"encode": sum(t["encode"]), "denoise": sum(t["dit"]), "decode": sum(t["decode"]), "total": total}
    return frames_out, stages, steps_s

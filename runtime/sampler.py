"""The one sampling loop: classifier-free guidance, scheduler steps, progress. Every backend plugs in beneath it.

A Denoiser is any callable `(latents [B,C,F,H,W], timestep [B] float32, context [B,S,D]) -> noise_pred` with a
`max_batch` attribute; with guidance the conditional and unconditional branches run as one batch of 2 when the
engine takes it, else one after the other. Guidance follows WanPipeline: uncond + g * (cond - uncond), and the
negative branch is skipped entirely when there is none (guidance <= 1). `guidance` is one scale, or a function of
the step's timestep (Wan2.2's experts each have their own: runtime/experts.py).
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np


class Denoiser(Protocol):
    max_batch: int

    def __call__(self, latents: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray: ...


def _read_only(a: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return None
    view = a.view()
    view.flags.writeable = False
    return view


def sample(denoiser: Denoiser, scheduler, latents: np.ndarray, cond: np.ndarray, uncond: np.ndarray | None,
           guidance: float | Callable[[float], float], steps: int,
           on_step: Callable[[int, float], None] | None = None) -> np.ndarray:
    """Run `steps` denoising steps from `latents` [1, C, F, H, W]; returns the final latents."""
    scheduler.set_timesteps(steps)
    x = latents.astype(np.float32)
    both_ctx = np.concatenate([cond, uncond]) if uncond is not None and denoiser.max_batch >= 2 else None  # [2, S, D]
    # Read-only views, the same objects every step: a backend that keeps inputs on a device (backends/ort_io.py)
    # uploads them once per generation, not once per step.
    cond, uncond, both_ctx = (_read_only(c) for c in (cond, uncond, both_ctx))
    for i, t in enumerate(scheduler.timesteps):
        t0 = time.perf_counter()
        ts = np.full((1,), t, dtype=np.float32)
        g = np.float32(guidance(float(t)) if callable(guidance) else guidance)
        if uncond is None:
            pred = denoiser(x, ts, cond)
        elif denoiser.max_batch >= 2:
            both = denoiser(np.concatenate([x, x]), np.concatenate([ts, ts]), both_ctx)
            pred = both[1:] + g * (both[:1] - both[1:])
        else:
            c, u = denoiser(x, ts, cond), denoiser(x, ts, uncond)
            pred = u + g * (c - u)
        x = scheduler.step(pred, x)
        if on_step:
            on_step(i, time.perf_counter() - t0)
    return x

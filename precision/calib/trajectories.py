"""Calibration data: every DiT input of real generations with the fp32 engines, all timesteps, both CFG branches.

A DiT's activations change a lot with the timestep, so calibrating on one timestep (or on random inputs) is the
classic mistake. This runs the runtime's own pipeline (the one sampler loop, the checkpoint's scheduler) and
records what the denoiser is fed at each step: with guidance that is one batch of 2 (conditional and
unconditional), so both branches are in every sample. Wan2.2 A14B's experts are calibrated each on its own steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...runtime.choices import Backend, Execution
from ...runtime.experts import expert_at
from ...runtime.manifest import Manifest
from ...runtime.pipeline import Pipeline


def collect_dit_inputs(engine_dir: Path | Manifest, prompts: list[str], steps: int, height: int, width: int, frames: int,
                       threads: int | None = None, seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """{DiT engine: [{hidden_states [B,C,f,h,w], timestep [B], encoder_hidden_states [B,L,D]}]} over prompts x
    steps; with two experts (Wan2.2 A14B) each has the steps it runs."""
    pipe = Pipeline.load(engine_dir, threads=threads, verify=False, backend=Backend.ORT, precision=Execution.FP32)
    samples: dict[str, list[dict[str, np.ndarray]]] = {}

    def record(feeds, _):
        samples.setdefault(expert_at(float(feeds["timestep"][0]), pipe.boundary), []).append(feeds)

    for i, prompt in enumerate(prompts):
        pipe(prompt, height=height, width=width, frames=frames, steps=steps, seed=seed + i, output_type="latent",
             observe=record)
    return samples

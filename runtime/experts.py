"""Wan2.2 A14B's two experts behind the sampler's one Denoiser interface.

`WanPipeline` runs the high-noise expert (`transformer`) at every timestep t >= boundary_ratio x the scheduler's
num_train_timesteps, and the low-noise expert (`transformer_2`) below, each with its own guidance scale
(`guidance_2` defaults to `guidance`, and `guidance` alone decides whether the negative branch runs at all). The
switch is a Denoiser holding both: the sampler loop stays the one loop. Timesteps only decrease, so each expert is
opened when its first step comes and the high-noise one is let go at the switch; with `--low-memory` (engines not
kept by the pipeline) only one expert is resident at a time. Step caching gives each expert its own probe
(PROBES) and starts afresh at the switch: the other expert's last output is never reused.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .sampler import Denoiser

HIGH, LOW = "transformer", "transformer_2"  # the experts' engine names
PROBES = {HIGH: "dit_probe", LOW: "dit_probe_2"}  # each expert's step-cache probe (export/dit_probe.py)


def expert_at(t: float, boundary: float | None) -> str:
    """The expert WanPipeline runs at timestep `t` (the only one where there is no boundary)."""
    return HIGH if boundary is None or t >= boundary else LOW


class ExpertSwitch:
    """A Denoiser over two experts. `open_expert(name)` opens one (a Denoiser); `max_batch` is theirs (both take the
    same batch); `boundary`: the timestep below which the low-noise expert runs."""

    def __init__(self, open_expert: Callable[[str], Denoiser], max_batch: int, boundary: float, guidance: float,
                 guidance_2: float):
        self.open_expert = open_expert
        self.max_batch = max_batch
        self.boundary = boundary
        self.scales = {HIGH: guidance, LOW: guidance_2}
        self.current: tuple[str, Denoiser] | None = None
        self.ran: list[str] = []  # the expert of each call, in order

    def expert(self, t: float) -> str:
        return expert_at(t, self.boundary)

    def guidance(self, t: float) -> float:
        """The guidance scale of the step at timestep `t` (the sampler asks once per step)."""
        return self.scales[self.expert(t)]

    def __call__(self, latents: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
        name = self.expert(float(timestep[0]))
        if self.current is None or self.current[0] != name:
            self.current = None  # the other expert's last reference: released before this one opens
            self.current = (name, self.open_expert(name))
        self.ran.append(name)
        return self.current[1](latents, timestep, context)

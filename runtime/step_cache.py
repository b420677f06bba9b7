"""Step caching (TeaCache-style): skip a DiT evaluation when its input has barely changed since the last one.

`StepCache` is a Denoiser wrapping a Denoiser, so the one sampler loop does not change. Before each step it runs
the small probe engine (export/dit_probe.py: the first block's timestep-modulated input) and adds the relative L1
change of that input since the previous step to an accumulator. While the accumulator stays under `threshold`,
the DiT is skipped and its last output reused; once it crosses, the DiT runs and the accumulator resets. The first
step always runs. The state is kept per conditioning (keyed by a fingerprint of the text embeddings), so CFG run
as two calls (batch 1 engines) never hands the conditional output to the unconditional branch.

TeaCache fits a polynomial to map this distance to the output's change per model; none is fitted here (identity),
so the threshold is model-specific: bench/step_cache.py measures PSNR and DiT evaluations over thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Measured on the trained demo over thresholds (bench/results/step_cache_demo_*, docs/step-caching.md): 0.06
# keeps a margin over 30 dB worst-prompt PSNR there; the right threshold is model-specific.
DEFAULT_THRESHOLD = 0.06


@dataclass
class _Branch:
    probe: np.ndarray | None = None
    output: np.ndarray | None = None
    distance: float = 0.0


@dataclass
class StepCache:
    denoiser: object  # the Denoiser that runs the DiT
    probe: object  # engine: (hidden_states, timestep) -> modulated_input
    threshold: float
    evaluations: int = 0
    skipped: int = 0
    _branches: dict = field(default_factory=dict)

    @property
    def max_batch(self) -> int:
        return self.denoiser.max_batch

    def __call__(self, latents: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
        # latents [B, C, F, H, W], timestep [B], context [B, S, D]
        key = (context.shape, context[:, :4, :8].tobytes())
        state = self._branches.setdefault(key, _Branch())
        m = self.probe(hidden_states=latents, timestep=timestep)  # [B, N, D]
        if state.output is not None and state.probe is not None and state.probe.shape == m.shape:
            state.distance += float(np.abs(m - state.probe).mean() / (np.abs(state.probe).mean() + 1e-12))
            if state.distance < self.threshold:
                state.probe = m
                self.skipped += 1
                return state.output
        state.output = self.denoiser(latents, timestep, context)
        state.probe, state.distance = m, 0.0
        self.evaluations += 1
        return state.output

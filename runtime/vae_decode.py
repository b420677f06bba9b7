"""Chunked causal VAE decoding over the two exported decoder graphs (see export/vae.py).

Frame 0 goes through `first`, every later latent frame through `step` with the cache slots carried over, so any
frame count decodes with the same engines and memory stays flat as videos grow. `chunks` yields video as it is
decoded ([1, 3, T, H, W], T = 1 then the temporal factor), for writers that stream.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class ChunkedVaeDecoder:
    def __init__(self, first, step):
        self.first = first
        self.step = step
        self.cache_inputs = [t.name for t in step.spec.inputs[1:]]

    def chunks(self, z: np.ndarray) -> Iterator[np.ndarray]:
        """z: de-normalised latents [1, C, F, h, w] float32."""
        outputs = self.first.run(latents=np.ascontiguousarray(z[:, :, :1]))
        yield outputs[0]
        for i in range(1, z.shape[2]):
            feeds = dict(zip(self.cache_inputs, outputs[1:]))
            outputs = self.step.run(latents=np.ascontiguousarray(z[:, :, i:i + 1]), **feeds)
            yield outputs[0]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.concatenate(list(self.chunks(z)), axis=2)  # [1, 3, 1 + t*(F-1), H, W]

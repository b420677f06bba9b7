"""Chunked causal VAE decoding over the two exported decoder graphs (see export/vae.py), optionally tiled in space.

Frame 0 goes through `first`, every later latent frame through `step` with the cache slots carried over, so any
frame count decodes with the same engines and memory stays flat as videos grow. `chunks` yields video as it is
decoded ([1, 3, T, H, W] in [-1, 1], T = 1 then the temporal factor), for writers that stream.

With `tile` (pixels, e.g. 256), memory is bounded in space too: the latent is cut into overlapping tiles of
tile/8 latents every 3/4 tile, each tile keeps its own cache slots, and each frame's tiles are blended with
linear ramps over the overlap and cropped, exactly as diffusers' `AutoencoderKLWan.tiled_decode` does, but frame
by frame (diffusers decodes every frame of a tile before the next tile), so frames still stream. The graphs
return the decoder's output unclamped; clamping to [-1, 1] happens here, after blending, as in diffusers.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class ChunkedVaeDecoder:
    def __init__(self, first, step, tile: int | None = None, scale: int = 8):
        self.first = first
        self.step = step
        self.cache_inputs = [t.name for t in step.spec.inputs[1:]]
        self.tile, self.scale = tile, scale

    def _frames(self, z: np.ndarray) -> Iterator[np.ndarray]:
        """Unclamped decoded frames of z [1, C, F, h, w], one latent frame at a time, with one cache state."""
        outputs = self.first.run(latents=np.ascontiguousarray(z[:, :, :1]))
        yield outputs[0]
        for i in range(1, z.shape[2]):
            feeds = dict(zip(self.cache_inputs, outputs[1:]))
            outputs = self.step.run(latents=np.ascontiguousarray(z[:, :, i:i + 1]), **feeds)
            yield outputs[0]

    def chunks(self, z: np.ndarray) -> Iterator[np.ndarray]:
        """z: de-normalised latents [1, C, F, h, w] float32 -> [1, 3, T, H, W] chunks in [-1, 1]."""
        h, w = z.shape[3:]
        if not self.tile or (h <= self.tile // self.scale and w <= self.tile // self.scale):
            for video in self._frames(z):
                yield np.clip(video, -1.0, 1.0)
            return
        size, stride = self.tile // self.scale, self.tile * 3 // 4 // self.scale  # latents
        blend, out_stride = self.tile - self.tile * 3 // 4, self.tile * 3 // 4  # pixels
        grid = [[self._frames(z[:, :, :, i:i + size, j:j + size]) for j in range(0, w, stride)]
                for i in range(0, h, stride)]
        for _ in range(z.shape[2]):
            rows = [[next(t) for t in row] for row in grid]  # each [1, 3, T, th, tw], unclamped
            out_rows = []
            for i, row in enumerate(rows):
                for j, tile in enumerate(row):
                    if i > 0:
                        _blend(rows[i - 1][j], tile, blend, axis=3)
                    if j > 0:
                        _blend(row[j - 1], tile, blend, axis=4)
                out_rows.append(np.concatenate([t[:, :, :, :out_stride, :out_stride] for t in row], axis=4))
            video = np.concatenate(out_rows, axis=3)[:, :, :, :h * self.scale, :w * self.scale]
            yield np.clip(video, -1.0, 1.0)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return np.concatenate(list(self.chunks(z)), axis=2)  # [1, 3, 1 + t*(F-1), H, W]


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """In place, as diffusers' blend_v (axis 3) / blend_h (axis 4): the first `extent` rows/columns of b fade in
    from the last `extent` of a."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    ramp = (np.arange(extent, dtype=np.float32) / extent).reshape([-1 if d == axis else 1 for d in range(5)])
    a_tail = np.take(a, np.arange(a.shape[axis] - extent, a.shape[axis]), axis=axis)
    b_head = np.take(b, np.arange(extent), axis=axis)
    index = [slice(None)] * 5
    index[axis] = slice(0, extent)
    b[tuple(index)] = a_tail * (1 - ramp) + b_head * ramp

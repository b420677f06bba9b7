"""Attention references for the kernels' tests and benchmarks: exact softmax attention in float64 (or float32 on a GPU).

Not for speed. Inputs are [B, H, L, D] (any strides); the result is [B, H, L, D] in the reference dtype.
"""

from __future__ import annotations

import torch


def attention_reference(q, k, v, scale: float | None = None, dtype=torch.float64, query_chunk: int = 4096):
    """softmax(q k^T * scale) v, computed in `dtype`, `query_chunk` query rows at a time to bound memory."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = k.to(dtype), v.to(dtype)
    out = []
    for start in range(0, q.shape[2], query_chunk):
        q_chunk = q[:, :, start:start + query_chunk].to(dtype)  # [B, H, l, D]
        scores = (q_chunk @ k.transpose(-1, -2)) * scale  # [B, H, l, S]
        out.append(scores.softmax(dim=-1) @ v)
    return torch.cat(out, dim=2)


def accuracy(out, ref) -> dict:
    """Cosine similarity, relative L2 error and max abs error of `out` against `ref`, over the whole tensor."""
    a, b = out.double().flatten(), ref.double().flatten()
    return {
        "cosine": float(torch.dot(a, b) / (a.norm() * b.norm())),
        "rel_l2": float((a - b).norm() / b.norm()),
        "max_abs": float((a - b).abs().max()),
    }

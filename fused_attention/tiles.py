"""Tile configurations the attention kernels are autotuned over, per GPU and per (L, S, D).

On a GPU, Triton's autotuner times each config once per key and keeps the fastest. Under TRITON_INTERPRET=1 (the
CPU correctness tests) there is one small tile, so nothing is timed and the ragged-edge masks are exercised at
small sizes.
"""

from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attention_configs(int8: bool = False) -> list:
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    block_ms = (64, 128)
    block_ns = (64, 128) if int8 else (32, 64, 128)
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m in block_ms for n in block_ns for w in (4, 8) for s in (2, 3, 4)
        if not (m == 128 and n == 128 and w == 4)  # too many registers per thread at head dim 128
    ]

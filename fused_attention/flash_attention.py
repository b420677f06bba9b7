"""Flash attention forward in Triton: non-causal, no mask, fp16/bf16 inputs, fp32 accumulation, online softmax.

Layout. The kernel indexes q, k, v and the output as [B, H, L, D] through their strides, so the exported graphs'
[B, L, H, D] projections (a view `x.transpose(1, 2)`) go in without a copy, and the default output is laid out
[B, L, H, D] in memory, so `out.transpose(1, 2).flatten(2)` is the [B, L, H*D] the output projection reads.

Tiles. BLOCK_M query rows stay in registers while K/V stream through in BLOCK_N blocks; each K block's logits are
scaled into the exp2 domain (softmax scale * log2 e folded into one multiply), the running max and sum are rescaled,
and P (cast to the input dtype) meets V in a second tensor-core dot. Tile sizes are autotuned per GPU and per
(L, S, D); under TRITON_INTERPRET=1 (the CPU correctness tests) one small tile is used.

Bytes moved per (b, h): Q and O once (2 * L * D), K and V once per query block (2 * S * D * ceil(L / BLOCK_M)).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_core import LOG2_E, attention_rows
from .tiles import attention_configs


@triton.autotune(configs=attention_configs(), key=["L", "S", "HEAD_DIM"])
@triton.jit
def _flash_attention_fwd(
    Q, K, V, O, qk_scale,  # qk_scale = softmax scale * log2(e)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    attention_rows(Q, K, V, O, qk_scale, pid_bh // H, pid_bh % H, pid_m,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                   L, S, HEAD_DIM, BLOCK_M, BLOCK_N)


def check_inputs(q, k, v, dtypes) -> None:
    """One-line errors for what the kernels do not take."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention takes [B, H, L, D] tensors; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit one attention")
    if q.shape[3] not in (64, 128):
        raise ValueError(f"head dim {q.shape[3]} is not supported (64 or 128)")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"inputs are {q.dtype}/{k.dtype}/{v.dtype}; expected one of {dtypes} for all three")


def new_output(q):
    """An output laid out [B, L, H, D] in memory, returned as its [B, H, L, D] view."""
    b, h, length, d = q.shape
    return torch.empty(b, length, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def flash_attention(q, k, v, scale: float | None = None, out=None):
    """softmax(q k^T * scale) v for q [B, H, L, D], k/v [B, H, S, D] in fp16 or bf16 (any strides) -> [B, H, L, D]."""
    check_inputs(q, k, v, (torch.float16, torch.bfloat16))
    batch, heads, length, head_dim = q.shape
    out = new_output(q) if out is None else out
    qk_scale = (1.0 / math.sqrt(head_dim) if scale is None else scale) * LOG2_E

    def grid(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)

    _flash_attention_fwd[grid](
        q, k, v, out, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, length, k.shape[2],
        HEAD_DIM=head_dim,
    )
    return out

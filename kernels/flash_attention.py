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

from .tiles import attention_configs

LOG2_E = 1.4426950408889634


@triton.jit
def online_softmax_block(logits, col_ok, v, m_i, l_i, acc):
    """Fold one K/V block into the running (max, sum, output): logits [BLOCK_M, BLOCK_N] fp32 in the exp2 domain,
    col_ok [BLOCK_N] (False past the sequence end), v [BLOCK_N, D]. Shared by the fp16 and INT8 kernels."""
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


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
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    k_base = K + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd  # K^T tile [D, BLOCK_N]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd  # V tile [BLOCK_N, D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        k = tl.load(k_base + cols[None, :] * stride_kn, mask=col_ok[None, :], other=0.0)
        logits = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N] fp32, log2 domain
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=col_ok[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_block(logits, col_ok, v, m_i, l_i, acc)

    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


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

"""INT8 attention in Triton (SageAttention-style): INT8 Q·Kᵀ with fp32 scales, online softmax, fp16 P·V.

Why it is accurate enough: softmax is invariant to adding the same value to every logit of a row, and
q·(k - mean_k) differs from q·k by q·mean_k, the same for every key. Subtracting K's mean over the sequence removes
the large shared component of the keys (the channel outliers DiT keys carry), so the per-block INT8 grid spends
its 8 bits on what distinguishes keys. Q is quantized per block of Q_BLOCK rows, K per block of K_BLOCK rows, each
block with one symmetric scale (amax / 127); the softmax scale and log2(e) are folded into Q before quantizing.

Why it is faster: INT8 tensor-core dots run at twice the fp16 rate (sm_80 and newer, Jetson Orin's sm_87
included), and Q·Kᵀ is half of attention's arithmetic. The quantization passes read Q and K once each.

Layout as `flash_attention`: inputs [B, H, L, D] of any strides, output [B, H, L, D] laid out [B, L, H, D].
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_core import LOG2_E, online_softmax_block, quantize_block, softmax_state
from .flash_attention import check_inputs, new_output
from .tiles import attention_configs

Q_BLOCK = 64  # query rows per quantization scale
K_BLOCK = 64  # key rows per quantization scale


@triton.jit
def _quantize_blocks(
    X, MEAN, X8, SCALE, pre_scale,
    stride_xb, stride_xh, stride_xm, stride_xd,
    stride_mb, stride_mh, stride_md,
    H, L, n_blocks,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    """X [B, H, L, D] -> X8 [B, H, L, D] int8 (contiguous) and SCALE [B, H, n_blocks] fp32, one per BLOCK rows."""
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < L
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(MEAN + b * stride_mb + h * stride_mh + offs_d * stride_md)
        x = tl.where(row_ok[:, None], x - mean[None, :], 0.0)
    x8, scale = quantize_block(x * pre_scale)
    tl.store(X8 + pid_bh * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], x8, mask=row_ok[:, None])
    tl.store(SCALE + pid_bh * n_blocks + pid_blk, scale)


@triton.autotune(configs=attention_configs(int8=True), key=["L", "S", "HEAD_DIM"])
@triton.jit
def _int8_attention_fwd(
    Q8, K8, QS, KS, V, O,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, L, S, n_q_blocks, n_k_blocks,
    HEAD_DIM: tl.constexpr, Q_BLK: tl.constexpr, K_BLK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L

    q8 = tl.load(Q8 + pid_bh * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=row_ok[:, None], other=0)  # [BLOCK_M, D] int8
    q_scale = tl.load(QS + pid_bh * n_q_blocks + offs_m // Q_BLK, mask=row_ok, other=0.0)  # [BLOCK_M]
    k_base = K8 + pid_bh * S * HEAD_DIM + offs_d[:, None]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd

    m_i, l_i, acc = softmax_state(BLOCK_M, HEAD_DIM)
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        k8 = tl.load(k_base + cols[None, :] * HEAD_DIM, mask=col_ok[None, :], other=0)  # K^T tile [D, BLOCK_N]
        k_scale = tl.load(KS + pid_bh * n_k_blocks + cols // K_BLK, mask=col_ok, other=0.0)  # [BLOCK_N]
        logits = tl.dot(q8, k8).to(tl.float32) * q_scale[:, None] * k_scale[None, :]  # log2 domain
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=col_ok[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_block(logits, col_ok, v, m_i, l_i, acc)

    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])


def quantize_blocks(x, block: int, pre_scale: float = 1.0, mean=None):
    """x [B, H, L, D] (mean [B, H, D] fp32 subtracted first) -> (int8 [B, H, L, D] contiguous, scales [B, H, n])."""
    batch, heads, length, head_dim = x.shape
    n_blocks = triton.cdiv(length, block)
    x8 = torch.empty(batch, heads, length, head_dim, dtype=torch.int8, device=x.device)
    scales = torch.empty(batch, heads, n_blocks, dtype=torch.float32, device=x.device)
    mean_arg = x if mean is None else mean
    mean_strides = (0, 0, 0) if mean is None else mean.stride()
    _quantize_blocks[(n_blocks, batch * heads)](
        x, mean_arg, x8, scales, pre_scale,
        *x.stride(), *mean_strides,
        heads, length, n_blocks,
        HEAD_DIM=head_dim, BLOCK=block, HAS_MEAN=mean is not None,
    )
    return x8, scales


def int8_attention(q, k, v, scale: float | None = None, out=None, center_keys: bool = True):
    """softmax(q k^T * scale) v with INT8 Q·Kᵀ; q [B, H, L, D], k/v [B, H, S, D] fp16 or bf16 -> [B, H, L, D].

    `center_keys=False` skips the mean subtraction: only for measuring what it buys.
    """
    check_inputs(q, k, v, (torch.float16, torch.bfloat16))
    batch, heads, length, head_dim = q.shape
    keys = k.shape[2]
    qk_scale = (1.0 / math.sqrt(head_dim) if scale is None else scale) * LOG2_E
    k_mean = k.float().mean(dim=2) if center_keys else None  # [B, H, D]; softmax ignores the q·mean_k it removes
    q8, q_scales = quantize_blocks(q, Q_BLOCK, pre_scale=qk_scale)
    k8, k_scales = quantize_blocks(k, K_BLOCK, mean=k_mean)
    out = new_output(q) if out is None else out

    def grid(meta):
        return (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)

    _int8_attention_fwd[grid](
        q8, k8, q_scales, k_scales, v, out,
        *v.stride(), *out.stride(),
        heads, length, keys, q_scales.shape[2], k_scales.shape[2],
        HEAD_DIM=head_dim, Q_BLK=Q_BLOCK, K_BLK=K_BLOCK,
    )
    return out

"""The Triton pieces the attention kernels share, without torch: the online-softmax block, the row-block loop of flash
attention, and the kernel the TensorRT plugin launches (fused_attention/trt_plugin.py compiles it ahead of time on a
machine that has triton but not necessarily torch).

`flash_attention_blhd` follows the calling convention of TensorRT's ahead-of-time plugins: tensor inputs first, then
int32 scalars, then tensor outputs. q/k/v/o are contiguous [B, L, H, D] (k/v: [B, S, H, D]), which is the layout the
DiT's projections already have, so the plugin needs no transposes. The head dim and the softmax scale are
compile-time constants (the head dim is static in every DiT graph).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def softmax_state(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The running (max, sum, output) that `online_softmax_block` folds K/V blocks into, before the first block."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    return m_i, l_i, acc


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


@triton.jit
def quantize_block(x):
    """x fp32 (any 2-D tile) -> (int8 tile, its one symmetric scale amax / 127), rounding half away from zero."""
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0) / 127.0, 1e-30)
    scaled = x / scale
    return (scaled + tl.where(scaled >= 0, 0.5, -0.5)).to(tl.int8), scale


@triton.jit
def attention_rows(
    Q, K, V, O, qk_scale, b, h, pid_m,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    L, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows [pid_m * BLOCK_M, +BLOCK_M) of head h of batch b: softmax(q k^T * scale) v, K/V streamed in BLOCK_N
    blocks. qk_scale = softmax scale * log2(e)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    k_base = K + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd  # K^T tile [D, BLOCK_N]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :] * stride_vd  # V tile [BLOCK_N, D]

    m_i, l_i, acc = softmax_state(BLOCK_M, HEAD_DIM)
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


@triton.jit
def flash_attention_blhd(
    Q, K, V, L, S, H, O,
    HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The plugin's kernel: grid (cdiv(L, BLOCK_M), B * H); contiguous [B, L|S, H, D] tensors."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # offsets in int64: B * L * H * D passes 2^31 at 480p
    h = pid_bh % H
    row = H * HEAD_DIM  # one token's stride
    attention_rows(Q, K, V, O, QK_SCALE, b, h, pid_m,
                   L * row, HEAD_DIM, row, 1,
                   S * row, HEAD_DIM, row, 1,
                   S * row, HEAD_DIM, row, 1,
                   L * row, HEAD_DIM, row, 1,
                   L, S, HEAD_DIM, BLOCK_M, BLOCK_N)


@triton.jit
def int8_attention_blhd(
    Q, K, V, L, S, H, O,
    HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The INT8 plugin's kernel: int8_attention.py's method (keys centred on their mean, INT8 Q·Kᵀ with one
    symmetric scale per block, fp16/bf16 P·V) in one kernel, as an ahead-of-time plugin launches one. Each program
    computes its head's key mean (one extra read of K) and quantizes its Q block once and each K block as it
    streams; the extra quantization work is 1/BLOCK_M of the Q·Kᵀ dot's. Same calling convention and grid as
    `flash_attention_blhd`."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    row = H * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    k_head = K + b * S * row + h * HEAD_DIM
    v_head = V + b * S * row + h * HEAD_DIM

    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_head + cols[:, None] * row + offs_d[None, :], mask=(cols < S)[:, None], other=0.0)
        k_sum += tl.sum(k.to(tl.float32), 0)
    k_mean = k_sum / S  # [D]: softmax ignores the q·mean_k it removes

    q = tl.load(Q + b * L * row + h * HEAD_DIM + offs_m[:, None] * row + offs_d[None, :], mask=row_ok[:, None],
                other=0.0).to(tl.float32) * QK_SCALE  # [BLOCK_M, D], log2 domain
    q8, q_scale = quantize_block(q)

    m_i, l_i, acc = softmax_state(BLOCK_M, HEAD_DIM)
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        kt = tl.load(k_head + offs_d[:, None] + cols[None, :] * row, mask=col_ok[None, :], other=0.0)  # [D, N]
        kt = tl.where(col_ok[None, :], kt.to(tl.float32) - k_mean[:, None], 0.0)
        k8, k_scale = quantize_block(kt)
        logits = tl.dot(q8, k8).to(tl.float32) * (q_scale * k_scale)
        v = tl.load(v_head + cols[:, None] * row + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_block(logits, col_ok, v, m_i, l_i, acc)

    out = acc / l_i[:, None]
    tl.store(O + b * L * row + h * HEAD_DIM + offs_m[:, None] * row + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])

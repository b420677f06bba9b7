"""FLOP count of one Wan DiT call from its config and shape: the linear layers and the attention products.

Counts multiply-adds as 2 FLOPs; ignores norms, activations, RoPE and the timestep MLP (well under 1% at 1K tokens).
"""

from __future__ import annotations


def wan_dit_flops(cfg: dict, batch: int, tokens: int, text_len: int) -> dict[str, float]:
    """Per DiT call with `batch` sequences of `tokens` video tokens and `text_len` text tokens."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, layers, n, s = cfg["ffn_dim"], cfg["num_layers"], tokens, text_len
    patch = cfg["patch_size"][0] * cfg["patch_size"][1] * cfg["patch_size"][2]
    per_block_linear = (
        2 * n * d * d * 4  # self-attention q, k, v, out
        + 2 * n * d * d * 2 + 2 * s * d * d * 2  # cross-attention q, out (video) and k, v (text)
        + 2 * n * d * f * 2  # feed-forward up and down
    )
    per_block_attention = 2 * n * n * d * 2 + 2 * n * s * d * 2  # QK^T and PV, self and cross
    embed = 2 * s * cfg["text_dim"] * d + 2 * s * d * d + 2 * n * d * cfg["in_channels"] * patch * 2
    linear = batch * (layers * per_block_linear + embed)
    attention = batch * layers * per_block_attention
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}

"""The Wan DiT (WanTransformer3DModel) for export: its EngineSpec, the traced wrapper, the export-time attention.

Two export-time substitutions, both proven equal to diffusers by the parity check after export:
- rotary embedding: diffusers rotates interleaved channel pairs (2i, 2i+1) and writes `out[..., 0::2] = ...`, which
  exports as ScatterND chains (and as a stack/unbind, interleaving one float at a time, runs on OpenVINO's reference
  Concat/Split: 13% of a CPU step). Here the query and key projections' output channels (weights, biases, RMSNorm
  gains) are permuted within each head to the half-split layout (pair i at channels i and D/2 + i), which leaves
  every q.k product unchanged, and the rotation is the rotate-half form `x * cos + cat(-x2, x1) * sin` that
  OpenVINO fuses into its RoPE kernel, with the cos/sin tables precomputed in float32.
- attention form: `AttentionForm.ONNX` emits one ONNX `Attention` node per attention (opset 23; ONNX Runtime runs
  it, TensorRT parses it from 10.14); `AttentionForm.DECOMPOSED` writes MatMul-Softmax-MatMul (opset 20) for
  TensorRT < 10.14, which fuses that pattern itself.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from ..runtime import lora
from ..runtime.errors import SoraError
from ..runtime.spec import Dim, EngineSpec, RunSettings, TensorSpec
from .streaming import BlocksStreamed, is_weightless, load_model


class AttentionForm(str, enum.Enum):
    ONNX = "onnx-attention"
    DECOMPOSED = "decomposed"

    @property
    def opset(self) -> int:
        return 23 if self is AttentionForm.ONNX else 20


def dit_spec(tcfg: dict, text_len: int, lat_frames: Dim, lat_h: Dim, lat_w: Dim, max_batch: int = 2,
             name: str = "transformer") -> EngineSpec:
    """hidden_states [b, C, f, h, w] latents, timestep [b] float32, encoder_hidden_states [b, S, text_dim]; `name`:
    the expert's folder for Wan2.2's second one."""
    c_in, c_out = tcfg["in_channels"], tcfg.get("out_channels") or tcfg["in_channels"]
    return EngineSpec(
        name=name,
        inputs=(
            TensorSpec("hidden_states", "float32", ("b", c_in, "f", "h", "w")),
            TensorSpec("timestep", "float32", ("b",)),
            TensorSpec("encoder_hidden_states", "float32", ("b", text_len, tcfg["text_dim"])),
        ),
        outputs=(TensorSpec("noise_pred", "float32", ("b", c_out, "f", "h", "w")),),
        dims=(Dim("b", 1, max_batch, max_batch), lat_frames, lat_h, lat_w),
        run=RunSettings(static_shapes=1, cuda_graph=True),  # one shape for every step of a generation
    )


class RotaryTables(torch.nn.Module):
    """Replaces diffusers' WanRotaryPosEmbed: returns (cos, sin) [1, L, 1, head_dim] float32 in the half-split
    layout (pair i's angle at channels i and head_dim/2 + i)."""

    def __init__(self, rope):
        super().__init__()
        self.patch_size = rope.patch_size
        self.split = [rope.t_dim // 2, rope.h_dim // 2, rope.w_dim // 2]
        # diffusers' tables repeat each frequency twice (repeat_interleave_real); keep one of each pair.
        self.register_buffer("cos", rope.freqs_cos[:, 0::2].float().clone(), persistent=False)  # [max_len, D/2]
        self.register_buffer("sin", rope.freqs_sin[:, 1::2].float().clone(), persistent=False)

    def _grid(self, table, f, h, w):
        tf, th, tw = table.split(self.split, dim=1)
        grid = torch.cat([
            tf[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            th[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            tw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1)
        return grid.reshape(1, f * h * w, 1, -1)

    def forward(self, hidden_states):  # [B, C, F, H, W]
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        f, h, w = frames // p_t, height // p_h, width // p_w
        cos, sin = self._grid(self.cos, f, h, w), self._grid(self.sin, f, h, w)  # [1, L, 1, D/2]
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # [1, L, 1, D]


def half_split_order(heads: int, head_dim: int) -> torch.Tensor:
    """runtime/lora.py's channel order (the runtime puts a LoRA's rows in it too), as a tensor."""
    return torch.from_numpy(lora.half_split_order(heads, head_dim))


def half_split_orders(attn) -> dict[torch.nn.Parameter, torch.Tensor]:
    """{parameter: row order} that puts a self-attention's query and key output channels (Linear rows, biases,
    RMSNorm gains) in the half-split layout. q.k within a head is a sum over channels, so the scores are unchanged;
    an RMSNorm across heads (or within one) takes a mean of squares, which a permutation leaves alone."""
    head_dim = attn.inner_dim // attn.heads
    order = half_split_order(attn.heads, head_dim)
    gain_order = {order.numel(): order, head_dim: half_split_order(1, head_dim)}  # norm across heads / per head
    orders = {}
    for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
        orders[proj.weight] = order
        if proj.bias is not None:
            orders[proj.bias] = order
        weight = getattr(norm, "weight", None)
        if weight is not None:
            if weight.numel() not in gain_order:
                raise SoraError(f"unsupported query/key norm over {weight.numel()} channels (expected "
                                f"{order.numel()} across heads or {head_dim} per head)")
            orders[weight] = gain_order[weight.numel()]
    return orders


def reorder_rows(orders: dict[torch.nn.Parameter, torch.Tensor]) -> None:
    """Apply {parameter: row order} to parameters that hold their weights, in place."""
    with torch.no_grad():
        for param, order in orders.items():
            param.copy_(param[order])


def _rotate(x, cos, sin):  # x [B, L, H, D] half-split, cos/sin [1, L, 1, D]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([x2 * -1.0, x1], dim=-1) * sin  # the pattern OpenVINO's RoPE fusion matches


class ExportAttnProcessor:
    """WanAttnProcessor for text-to-video (no image branch), with the rotary rewrite and a chosen attention form."""

    def __init__(self, form: AttentionForm):
        self.form = form

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, H, D]
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        if self.form is AttentionForm.ONNX:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B, H, L, S]
            out = scores.softmax(dim=-1) @ v
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)  # [B, L, H*D]
        return attn.to_out[1](attn.to_out[0](out))


class DiTForExport(torch.nn.Module):
    """(hidden_states, timestep, encoder_hidden_states) -> noise_pred, with the export-time substitutions applied."""

    def __init__(self, transformer, form: AttentionForm):
        super().__init__()
        transformer.rope = RotaryTables(transformer.rope)
        orders = {}
        for block in transformer.blocks:
            orders.update(half_split_orders(block.attn1))  # the only attention that takes the rotary embedding
            block.attn1.set_processor(ExportAttnProcessor(form))
            block.attn2.set_processor(ExportAttnProcessor(form))
        if is_weightless(transformer):
            transformer.row_orders = orders  # applied as the weights stream into the ONNX (export/streaming.py)
        else:
            reorder_rows(orders)
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        return self.transformer(hidden_states, timestep, encoder_hidden_states, return_dict=False)[0]


class DiTReference(torch.nn.Module):
    """diffusers' own WanTransformer3DModel, unmodified, with the exported signature: the parity reference."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        return self.model(hidden_states, timestep, encoder_hidden_states, return_dict=False)[0]


def streamed_reference_dit(root, weights, expert: str = "transformer") -> torch.nn.Module:
    """diffusers' DiT at full size with each block's weights read from `weights` (CheckpointTensors) as the block
    runs: the reference of a DiT that does not fit in memory beside its ONNX graph."""
    reference = load_reference_dit(root, False, expert)
    return BlocksStreamed(reference, weights, reference.model.blocks)


def load_dit(root, form: AttentionForm, weights=True, expert: str = "transformer", **overrides) -> DiTForExport:
    """The DiT `expert` (its folder) to export: weightless (export streams the weights) or with them (True, or the
    CheckpointTensors to read them from); `overrides` change its config."""
    return DiTForExport(load_reference_dit(root, weights, expert, **overrides).model, form).eval()


def load_reference_dit(root, weights=True, expert: str = "transformer", **overrides) -> DiTReference:
    from diffusers import WanTransformer3DModel

    return DiTReference(load_model(WanTransformer3DModel, root / expert, weights, **overrides)).eval()

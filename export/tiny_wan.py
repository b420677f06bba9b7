"""Build a small, deterministic Wan2.1-architecture pipeline directory offline (no download).

Used by the tests and the benchmarks (the built-in `demo` is a trained model, see demo/):
`WanPipeline.save_pretrained` of randomly initialised
(fixed seed) components plus a word-level tokenizer built from a fixed word list. The result is a faithful small
instance of the architecture: the same classes, configs and files as Wan2.1-T2V-1.3B-Diffusers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The T5 convention the real umT5 tokenizer follows: pad 0, eos 1, unk 2.
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


@dataclass(frozen=True)
class TinyWanConfig:
    """Sizes of every component. `TINY_CONFIGS` names the ones tests and benches use."""

    layers: int = 2
    heads: int = 2
    head_dim: int = 12
    ffn_dim: int = 32
    patch: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 4
    latent_channels: int = 16
    vae_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    vae_res_blocks: int = 1
    scheduler: str = "unipc"  # "unipc" | "euler"
    flow_shift: float = 3.0
    seed: int = 0
    init_scale: float = 1.0  # multiplies the DiT's random weights
    boundary_ratio: float | None = None  # Wan2.2 A14B: a second (low-noise) expert below this share of the timesteps
    # Wan2.2 TI2V-5B: per-token timesteps (WanPipeline's expand_timesteps) and the Wan2.2 VAE (residual blocks, this
    # pixel patch, 8 x patch spatial compression; its decoder `vae_decoder_dim` wide)
    expand_timesteps: bool = False
    vae_patch: int | None = None
    vae_decoder_dim: int | None = None

    @property
    def vae_scale_spatial(self) -> int:
        """The VAE's spatial compression: 2 per downsampling stage, times the pixel patch."""
        return 2 ** (len(self.vae_dim_mult) - 1) * (self.vae_patch or 1)


# The real transformer configurations (config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers), built
# with random weights by the slow tests and the export-memory bench.
REAL_DIT_CONFIGS = {
    "wan2.1-1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "wan2.1-14b": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                       cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    # Wan2.2 TI2V-5B's (3072 wide = 24 heads x 128, ffn 14336, 30 layers, 48 latent channels)
    "wan2.2-ti2v-5b": dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                           out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
                           cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
# The real VAE configurations (AutoencoderKLWan's arguments; its latent statistics are left at the defaults for
# Wan2.1 and set to zero mean, unit std for Wan2.2's 48 channels: random weights either way). Wan2.2's: residual
# blocks, a 2x2 pixel patch, 16x spatial compression, a decoder 256 wide (Wan2.2-TI2V-5B-Diffusers' vae/config.json).
REAL_VAE_CONFIGS = {
    "wan2.1": {},
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
                   scale_factor_temporal=4, latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
}
# The real text encoder (text_encoder/config.json of Wan2.1-T2V-*-Diffusers: google/umt5-xxl's encoder), for the
# real-size text-encoder bench.
REAL_TEXT_ENCODER_CONFIGS = {
    "umt5-xxl": dict(model_type="umt5", vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                     num_decoder_layers=24, num_heads=64, relative_attention_num_buckets=32,
                     relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
                     is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False, scalable_attention=True),
}

TINY_CONFIGS = {
    # Two configurations that differ in every dimension (layers, heads, head dim, patch, text dim, latent
    # channels, VAE width) and in the scheduler.
    "tiny-a": TinyWanConfig(),
    "tiny-b": TinyWanConfig(layers=3, heads=3, head_dim=8, ffn_dim=48, patch=(1, 1, 1), text_dim=24,
                            text_layers=1, text_heads=2, latent_channels=4, vae_dim=4, scheduler="euler",
                            flow_shift=5.0, seed=1),
    # Hidden size 384 (6 heads x 64), 6 layers, Wan's FFN ratio: a whole pipeline that runs end to end in minutes
    # (bench/e2e.py, bench/precision.py), with a small text encoder; and the same DiT shape with the text width the
    # real DiT takes (4096), the DiT-step scenarios' model (bench/harness.py).
    "bench-384": TinyWanConfig(layers=6, heads=6, head_dim=64, ffn_dim=2240, text_dim=64, text_layers=2,
                               text_heads=4, vae_dim=16, seed=384),
    "wan-384x6": TinyWanConfig(layers=6, heads=6, head_dim=64, ffn_dim=2240, text_dim=4096, text_layers=1,
                               text_heads=8, vae_dim=16, seed=0),
    # Wan2.1-T2V-1.3B's layer shape, 4 of its 30 layers, with a small VAE: reduced precision at the real width in a
    # bench that runs end to end in minutes (bench/precision.py --model), and the DiT-step scenarios at that width.
    "wan21-1.3b-4layers": TinyWanConfig(layers=4, heads=12, head_dim=128, ffn_dim=8960, text_dim=4096,
                                        text_layers=1, text_heads=8, vae_dim=16, seed=1304),
    # Wan2.1-T2V-1.3B's transformer (30 x 12 heads x 128, ffn 8960) and VAE (base 96, [1, 2, 4, 4], 2 res blocks)
    # shapes with random weights, and a 1-layer UMT5 text encoder of the width the DiT expects (4096): memory
    # measurements at real scale without umT5-XXL's 23 GB (bench/low_memory.py), the GPU verification's DiT.
    # Wan2.2 A14B's layout (two experts, the high-noise one above the boundary): tiny-a and tiny-b with a low-noise
    # expert added (their other components are theirs, byte for byte, so their traced graphs are shared).
    "tiny-a14b-a": TinyWanConfig(boundary_ratio=0.875),
    "tiny-a14b-b": TinyWanConfig(layers=3, heads=3, head_dim=8, ffn_dim=48, patch=(1, 1, 1), text_dim=24,
                                 text_layers=1, text_heads=2, latent_channels=4, vae_dim=4, scheduler="euler",
                                 flow_shift=5.0, seed=1, boundary_ratio=0.5),
    # Wan2.2 TI2V-5B's layout (per-token timesteps, the Wan2.2 VAE): two configurations that differ in every
    # dimension the layout leaves free (the DiT's spatial patch is 2x2 in both: WanPipeline's per-token timesteps
    # assume it) and in scheduler.
    # tiny-ti2v-a is tiny-a with the Wan2.2 VAE (its DiT and text encoder are tiny-a's, byte for byte, so their
    # traced graphs are shared).
    "tiny-ti2v-a": TinyWanConfig(expand_timesteps=True, vae_patch=2, vae_decoder_dim=12),
    "tiny-ti2v-b": TinyWanConfig(layers=3, heads=3, head_dim=8, ffn_dim=48, text_dim=24, text_layers=1,
                                 text_heads=2, latent_channels=6, vae_dim=4, vae_res_blocks=2, scheduler="euler",
                                 flow_shift=5.0, seed=6, init_scale=2.0, expand_timesteps=True, vae_patch=2),
    # Wan2.2 TI2V-5B's layer shape (24 heads x 128 = 3072 wide, ffn 14336, 48 latent channels), 2 of its 30 layers,
    # a small Wan2.2 VAE and a 1-layer UMT5 of width 4096: the DiT-step scenario at that width (bench/harness.py;
    # 4 layers: the bench's eight engines and two PyTorch models, open at once, need more than 24 GB).
    "wan22-ti2v-5b-2layers": TinyWanConfig(layers=2, heads=24, head_dim=128, ffn_dim=14336, text_dim=4096,
                                           text_layers=1, text_heads=8, latent_channels=48, vae_dim=16, seed=505,
                                           expand_timesteps=True, vae_patch=2),
    # Wan2.2 A14B's expert shape (40 heads x 128 = 5120 wide, ffn 13824), 2 of its 40 layers per expert, the Wan2.1
    # VAE and a 1-layer UMT5 of width 4096: `--low-memory` with two experts at their real width (bench/low_memory.py).
    "wan22-a14b-2layers": TinyWanConfig(layers=2, heads=40, head_dim=128, ffn_dim=13824, text_dim=4096, text_layers=1,
                                        text_heads=8, vae_dim=96, vae_dim_mult=(1, 2, 4, 4), vae_res_blocks=2,
                                        seed=14, boundary_ratio=0.875),
    "wan21-1.3b-shapes": TinyWanConfig(layers=30, heads=12, head_dim=128, ffn_dim=8960, text_dim=4096, text_layers=1,
                                       text_heads=8, vae_dim=96, vae_dim_mult=(1, 2, 4, 4), vae_res_blocks=2,
                                       seed=13),
}


def _tokenizer_json(path: Path) -> int:
    """Write a word-level T5-style tokenizer (lower-cased, EOS appended). Returns the vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = (Path(__file__).with_name("demo_words.txt")).read_text().split()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return len(vocab)


def dit_config(cfg: TinyWanConfig) -> dict:
    """The WanTransformer3DModel configuration of `cfg`."""
    return dict(patch_size=cfg.patch, num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.latent_channels, out_channels=cfg.latent_channels, text_dim=cfg.text_dim,
                freq_dim=256, ffn_dim=cfg.ffn_dim, num_layers=cfg.layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def build_transformer(cfg: TinyWanConfig, expert: int = 0):
    """The transformer of `cfg` with its random weights: torch's generator seeded with `cfg.seed` (+ 1000 per expert
    after the first), then scaled by `cfg.init_scale`. The pipeline build_tiny_wan writes and the benches' scenarios
    hold the same weights."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(cfg.seed + 1000 * expert)
    transformer = WanTransformer3DModel(**dit_config(cfg))
    if cfg.init_scale != 1.0:
        with torch.no_grad():
            for p in transformer.parameters():
                p.mul_(cfg.init_scale)
    return transformer


def build_tiny_wan(out_dir: str | Path, cfg: TinyWanConfig | str = "tiny-a") -> Path:
    """Write a WanPipeline directory (model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    cfg = TINY_CONFIGS[cfg] if isinstance(cfg, str) else cfg
    out_dir = Path(out_dir)
    tok_file = out_dir / "_tokenizer_build" / "tokenizer.json"
    vocab_size = _tokenizer_json(tok_file)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)

    transformer = build_transformer(cfg)  # seeds torch's generator; the text encoder's weights follow from it
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=cfg.text_dim, d_kv=cfg.text_dim // cfg.text_heads, d_ff=2 * cfg.text_dim,
        num_layers=cfg.text_layers, num_heads=cfg.text_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
    ))
    # Latent statistics: the real model ships measured ones; use fixed non-trivial values so the
    # de-normalisation is exercised.
    g = torch.Generator().manual_seed(cfg.seed)
    wan22_vae = {} if cfg.vae_patch is None else dict(
        is_residual=True, patch_size=cfg.vae_patch, in_channels=3 * cfg.vae_patch ** 2,
        out_channels=3 * cfg.vae_patch ** 2, decoder_base_dim=cfg.vae_decoder_dim,
        scale_factor_spatial=cfg.vae_scale_spatial)
    vae = AutoencoderKLWan(
        base_dim=cfg.vae_dim, z_dim=cfg.latent_channels, dim_mult=list(cfg.vae_dim_mult),
        num_res_blocks=cfg.vae_res_blocks,
        temperal_downsample=[False, True, True],
        latents_mean=(torch.randn(cfg.latent_channels, generator=g) * 0.5).tolist(),
        latents_std=(torch.rand(cfg.latent_channels, generator=g) * 2 + 0.5).tolist(),
        **wan22_vae,
    )
    if cfg.scheduler == "unipc":
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=cfg.flow_shift, num_train_timesteps=1000)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)
    experts = {} if cfg.boundary_ratio is None else {"transformer_2": build_transformer(cfg, expert=1),
                                                      "boundary_ratio": cfg.boundary_ratio}
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler, expand_timesteps=cfg.expand_timesteps, **experts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "tiny_wan_config.json").write_text(__import__("json").dumps(asdict(cfg)))
    import shutil

    shutil.rmtree(tok_file.parent)
    return out_dir

"""Each exported ONNX component against its PyTorch module, on shapes different from the export sample
(so the dynamic axes are shown to work), through the runtime's own engine wrapper."""

import numpy as np
import pytest
import torch

from conftest import TEST_SIZE

from soraedge.runtime.backends.ort import OrtEngine
from soraedge.runtime.manifest import load_manifest

ATOL = {"text_encoder": 1e-4, "transformer": 1e-4, "vae": 1e-4}


def _engine(eng_dir, name):
    m = load_manifest(eng_dir)
    return OrtEngine(m.engine_path(name), m.spec(name)), m


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_transformer_dynamic_shapes(name, tiny_model, tiny_engines):
    from diffusers import WanTransformer3DModel

    engine, m = _engine(tiny_engines(name), "transformer")
    ref = WanTransformer3DModel.from_pretrained(tiny_model(name) / "transformer").eval()
    p = m.config["patch_size"]
    for sizes in ({"b": 1, "f": 4, "h": 5 * p[1], "w": 2 * p[2]}, {"b": 2, "f": 3, "h": 3 * p[1], "w": 7 * p[2]}):
        feeds = engine.spec.sample_inputs(seed=3, **sizes)
        feeds["timestep"] = np.array([999.0, 500.5][: sizes["b"]], np.float32)
        got = engine(**feeds)
        with torch.no_grad():
            want = ref(torch.from_numpy(feeds["hidden_states"]), torch.from_numpy(feeds["timestep"]),
                       torch.from_numpy(feeds["encoder_hidden_states"]), return_dict=False)[0].numpy()
        assert np.abs(got - want).max() < ATOL["transformer"], sizes


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_text_encoder_dynamic_shapes(name, tiny_model, tiny_engines):
    from transformers import UMT5EncoderModel

    engine, _ = _engine(tiny_engines(name), "text_encoder")
    ref = UMT5EncoderModel.from_pretrained(tiny_model(name) / "text_encoder").eval()
    rng = np.random.default_rng(0)
    for b, s in ((1, 512), (2, 37)):
        ids = rng.integers(3, 50, size=(b, s)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[:, s // 2:] = 0
        got = engine(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        assert np.abs(got - want.numpy()).max() < ATOL["text_encoder"], (b, s)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_chunked_vae_decoder_matches_whole_clip_decode(name, tiny_model, tiny_engines):
    """The runtime's chunked decoder (first + step engines) against AutoencoderKLWan.decode: frame counts and
    sizes other than the export sample, including more frames than the engines' default."""
    from diffusers import AutoencoderKLWan

    from soraedge.runtime.vae_decode import ChunkedVaeDecoder

    m = load_manifest(tiny_engines(name))
    decoder = ChunkedVaeDecoder(*(_engine(tiny_engines(name), m.config["vae"][k])[0] for k in ("first", "step")))
    ref = AutoencoderKLWan.from_pretrained(tiny_model(name) / "vae").eval()
    rng = np.random.default_rng(1)
    for frames, h, w in ((1, 5, 3), (2, 2, 7), (6, 4, 4)):
        z = rng.standard_normal((1, m.config["latent_channels"], frames, h, w), dtype=np.float32)
        got = decoder(z)
        with torch.no_grad():
            want = ref.decode(torch.from_numpy(z), return_dict=False)[0].numpy()
        assert got.shape == want.shape == (1, 3, 4 * (frames - 1) + 1, 8 * h, 8 * w)
        assert np.abs(got - want).max() < ATOL["vae"], (frames, h, w)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_tiled_vae_decoder_matches_diffusers_tiled_decode(name, tiny_model, tiny_engines):
    """Spatial tiling, frame by frame and streamed, against AutoencoderKLWan's own tiled decode (same tiles,
    overlap and blending): the latent spans 2 x 3 tiles, edge tiles smaller than the rest."""
    from diffusers import AutoencoderKLWan

    from soraedge.runtime.vae_decode import ChunkedVaeDecoder

    m = load_manifest(tiny_engines(name))
    tile = 64  # pixels: tiles of 8 latents every 6
    decoder = ChunkedVaeDecoder(*(_engine(tiny_engines(name), m.config["vae"][k])[0] for k in ("first", "step")),
                                tile=tile)
    ref = AutoencoderKLWan.from_pretrained(tiny_model(name) / "vae").eval()
    ref.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_sample_stride_height=48,
                      tile_sample_stride_width=48)
    z = np.random.default_rng(2).standard_normal((1, m.config["latent_channels"], 3, 10, 13), dtype=np.float32)
    got = decoder(z)
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z), return_dict=False)[0].numpy()
    assert got.shape == want.shape == (1, 3, 9, 80, 104)
    assert np.abs(got - want).max() < ATOL["vae"]
    untiled = ChunkedVaeDecoder(decoder.first, decoder.step)(z)
    assert np.abs(untiled - got).max() > ATOL["vae"]  # tiling does change the seams: the check above can fail


def test_manifest_records_parity_and_versions(tiny_engines):
    m = load_manifest(tiny_engines("tiny-a"))
    for name, entry in m.data["engines"].items():
        assert entry["parity"]["max_rel"] < 1e-4, name
    assert m.data["engines"]["vae_decoder_step"]["decode_parity"]["max_rel"] < 1e-4
    assert {"onnx", "onnxruntime", "torch", "diffusers", "soraedge"} <= set(m.data["versions"])
    assert m.precision == {"transformer": "fp32", "text_encoder": "fp32", "vae": "fp32"}


def test_no_scatternd_and_attention_form(tiny_engines):
    import onnx

    m = load_manifest(tiny_engines("tiny-a"))
    ops = {n.op_type for n in onnx.load(str(m.engine_path("transformer")), load_external_data=False).graph.node}
    assert "ScatterND" not in ops
    assert "Attention" in ops


def test_decomposed_attention_variant(tiny_model, tmp_path):
    """--attention decomposed: opset 20, MatMul-Softmax-MatMul instead of Attention, same numbers as diffusers."""
    import onnx
    from diffusers import WanTransformer3DModel

    from soraedge.export.checkpoint import read_checkpoint
    from soraedge.export.dit import AttentionForm, DiTReference, dit_spec, load_dit
    from soraedge.export.onnx_export import export_onnx, parity_check
    from soraedge.runtime.spec import Dim

    ck = read_checkpoint(tiny_model("tiny-a"))
    spec = dit_spec(ck.transformer_config, 16, Dim("f", 1, 2, 8), Dim("h", 2, 4, 32, 2), Dim("w", 2, 4, 32, 2))
    form = AttentionForm.DECOMPOSED
    export_onnx(load_dit(ck.root, form), spec, tmp_path / "dit.onnx", form.opset, {"b": 2, "f": 2, "h": 4, "w": 6})
    model = onnx.load(str(tmp_path / "dit.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "Attention" not in ops and "Softmax" in ops and "ScatterND" not in ops
    assert {o.domain: o.version for o in model.opset_import}[""] == 20
    reference = DiTReference(WanTransformer3DModel.from_pretrained(ck.root / "transformer").eval())
    parity = parity_check(reference, spec, tmp_path / "dit.onnx", [{"b": 1, "f": 3, "h": 6, "w": 8}])
    assert parity["max_abs"] < 1e-4


def _interleaved_rotate(x, cos, sin):  # diffusers' Wan form: x [B, L, H, D], pairs (2i, 2i+1); cos/sin [L, D/2]
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


@pytest.mark.parametrize("norm_width", ["across heads", "per head"])
def test_half_split_permutation_keeps_every_score(norm_width):
    """The half-split row orders + the rotate-half form give the same q.k scores as the checkpoint's interleaved rotary, with
    the query/key RMSNorm across heads (Wan's) or within each head (applied after the head split)."""
    from types import SimpleNamespace

    from soraedge.export.dit import _rotate, half_split_orders, reorder_rows

    torch.manual_seed(0)
    heads, head_dim, length = 3, 8, 5
    width = heads * head_dim
    norm_size = width if norm_width == "across heads" else head_dim
    attn = SimpleNamespace(heads=heads, inner_dim=width, to_q=torch.nn.Linear(width, width),
                           to_k=torch.nn.Linear(width, width), norm_q=torch.nn.RMSNorm(norm_size),
                           norm_k=torch.nn.RMSNorm(norm_size))
    with torch.no_grad():
        for norm in (attn.norm_q, attn.norm_k):
            norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, length, width)  # [B, L, H*D]
    angles = torch.rand(length, head_dim // 2) * 6.0  # [L, D/2]
    cos, sin = angles.cos(), angles.sin()

    def project(proj, norm):  # [B, L, H, D]
        y = proj(x)
        return norm(y).unflatten(2, (heads, -1)) if norm_size == width else norm(y.unflatten(2, (heads, -1)))

    with torch.no_grad():
        q, k = (_interleaved_rotate(project(p, n), cos, sin) for p, n in ((attn.to_q, attn.norm_q),
                                                                          (attn.to_k, attn.norm_k)))
        before = torch.einsum("blhd,bshd->bhls", q, k)
        reorder_rows(half_split_orders(attn))
        table = (torch.cat([cos, cos], -1)[None, :, None], torch.cat([sin, sin], -1)[None, :, None])  # [1, L, 1, D]
        q, k = (_rotate(project(p, n), *table) for p, n in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)))
        after = torch.einsum("blhd,bshd->bhls", q, k)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_half_split_refuses_another_norm_width():
    from types import SimpleNamespace

    from soraedge.export.dit import half_split_orders
    from soraedge.runtime.errors import SoraError

    attn = SimpleNamespace(heads=2, inner_dim=8, to_q=torch.nn.Linear(8, 8), to_k=torch.nn.Linear(8, 8),
                           norm_q=torch.nn.RMSNorm(2), norm_k=torch.nn.RMSNorm(2))
    with pytest.raises(SoraError, match="unsupported query/key norm over 2 channels"):
        half_split_orders(attn)


def test_parity_gate_refuses_a_graph_that_differs_from_pytorch(tiny_model, tmp_path, monkeypatch):
    """A DiT whose PyTorch reference carries one perturbed weight (the graph streams the checkpoint's): the export
    fails at the parity gate, names the component and the measured error, and writes nothing."""
    from soraedge.export import build
    from soraedge.runtime.errors import SoraError

    real = build.load_reference_dit

    def perturbed(*args, **kwargs):
        reference = real(*args, **kwargs)
        with torch.no_grad():
            reference.model.proj_out.weight.add_(0.05)
        return reference

    monkeypatch.setattr(build, "load_reference_dit", perturbed)
    out = tmp_path / "e"
    size = TEST_SIZE["tiny-a"]
    with pytest.raises(SoraError, match=r"transformer: the ONNX graph differs from PyTorch by \S+ relative.*1e-03"):
        build.run_export(build.ExportConfig(model=str(tiny_model("tiny-a")), out=out, frames=size["frames"],
                                            height=size["height"], width=size["width"], precision="fp32"))
    assert not out.exists() and not list(tmp_path.glob(".e*"))
    build.check_parity("control", {"max_rel": 9e-4, "max_abs": 1.0})
    with pytest.raises(SoraError):
        build.check_parity("nan", {"max_rel": float("nan"), "max_abs": float("nan")})

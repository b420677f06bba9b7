"""LoRAs fused at export (`sora-export --lora FILE[:SCALE]`) against diffusers' `load_lora_weights` + `fuse_lora` on
WanPipeline, for the formats diffusers reads for Wan: its own/PEFT files (written by WanPipeline.save_lora_weights
from a PEFT adapter, with its adapter config in the metadata) and Wan's original layout (lora_down/lora_up with an
alpha, bias deltas). Random rank-4 LoRAs built here on the tiny pipeline; frames within 1e-3, latents 1e-4
relative, with a control (the scale changed). Bad input: keys that match nothing, a shape that disagrees, a pickled
file, a missing file: one line, nothing written.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import TEST_SIZE
from soraedge.export.build import ExportConfig, run_export
from soraedge.runtime.backends import openvino as ov_backend
from soraedge.runtime.backends.trt import refittable
from soraedge.runtime.errors import SoraError
from soraedge.runtime.lora import cached_weights, parse_lora
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline
from soraedge.runtime.user_cache import cache_home

PROMPT, NEGATIVE = "a red fox runs on the beach at sunset", "low quality, blurry"
SIZE = TEST_SIZE["tiny-a"]
FRAME_TOL, LATENT_RTOL = 1e-3, 1e-4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "time_proj"]


def _peft_lora(model_dir, out, seed: int):
    """A rank-4 PEFT adapter on the tiny DiT's attention, feed-forward and time projection, random A and B, saved by
    WanPipeline.save_lora_weights (diffusers' own format, the adapter config in the file's metadata)."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = WanTransformer3DModel.from_pretrained(model_dir / "transformer")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                  transformer_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def _wan_lora(model_dir, path, seed: int):
    """The same kind of LoRA in Wan's original layout: diffusion_model.blocks.N.self_attn.q.lora_down/lora_up with an
    alpha of 2 (scale alpha / rank), a bias delta on the cross-attention output and the feed-forward."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(model_dir / "transformer")
    g = torch.Generator().manual_seed(seed)
    state = {}
    names = {"self_attn.q": "attn1.to_q", "self_attn.o": "attn1.to_out.0", "cross_attn.k": "attn2.to_k",
             "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
    for i, block in enumerate(model.blocks):
        for wan, ours in names.items():
            out_f, in_f = block.get_submodule(ours).weight.shape
            key = f"diffusion_model.blocks.{i}.{wan}"
            state[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.2
            state[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.2
            state[f"{key}.alpha"] = torch.tensor(2.0)
            if wan in ("cross_attn.o", "ffn.2"):
                state[f"{key}.diff_b"] = torch.randn(out_f, generator=g) * 0.1
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    root = tiny_model("tiny-a")
    tmp = tmp_path_factory.mktemp("loras")
    return {"peft": _peft_lora(root, tmp / "peft", 1), "wan": _wan_lora(root, tmp / "wan.safetensors", 2)}


def _reference(root, files_scales, steps, guidance, noise):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, scale) in enumerate(files_scales):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, [s for _, s in files_scales])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE["height"], width=SIZE["width"],
              num_frames=SIZE["frames"], num_inference_steps=steps, guidance_scale=guidance)
    latents = pipe(**kw, latents=torch.from_numpy(noise), output_type="latent").frames.numpy()
    frames = pipe(**kw, latents=torch.from_numpy(noise), output_type="np").frames[0]
    return latents, frames


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def fused(loras, tiny_model, tmp_path_factory):
    """formats -> (the engines exported with those LoRAs fused, at 0.8 then 0.5, their (file, scale) list)."""
    cache = {}

    def get(formats):
        if formats not in cache:
            files_scales = [(loras[f], scale) for f, scale in zip(formats, (0.8, 0.5))]
            out = tmp_path_factory.mktemp("fused") / "e"
            run_export(ExportConfig(model=str(tiny_model("tiny-a")), out=out, **SIZE, max_sequence_length=512,
                                    precision="fp32", backend="ort",
                                    loras=tuple((str(p), s) for p, s in files_scales)))
            cache[formats] = out, files_scales
        return cache[formats]

    return get


@pytest.mark.parametrize("formats", [("peft",), ("wan", "peft")])  # Wan's layout is checked stacked on PEFT's
def test_loras_fused_at_export_match_diffusers_fuse_lora(formats, fused, tiny_model, tiny_engines):
    root = tiny_model("tiny-a")
    out, files_scales = fused(formats)
    m = load_manifest(out)
    assert [(entry["file"], entry["scale"]) for entry in m.data["loras"]] == [(p.name, s) for p, s in files_scales]
    ours = Pipeline.load(out)
    noise = np.random.default_rng(5).standard_normal(ours.latent_shape(**SIZE), dtype=np.float32)
    ref_lat, ref_frames = _reference(root, files_scales, 3, 5.0, noise)
    got = ours(PROMPT, NEGATIVE, SIZE["height"], SIZE["width"], SIZE["frames"], 3, 5.0, latents=noise)
    assert _rel(got.latents, ref_lat) < LATENT_RTOL, f"latents: {_rel(got.latents, ref_lat):.2e}"
    assert float(np.abs(got.frames - ref_frames).max()) < FRAME_TOL
    if formats == ("peft",):  # the control: the same LoRA at another scale is not what diffusers computed
        control = Pipeline.load(tiny_engines("tiny-a"), backend="ort",  # applied at load: no second export
                                loras=[(p, s + 0.1) for p, s in files_scales])
        latents = control(PROMPT, NEGATIVE, SIZE["height"], SIZE["width"], SIZE["frames"], 3, 5.0, latents=noise,
                          output_type="latent").latents
        assert _rel(latents, ref_lat) > LATENT_RTOL


def test_bad_loras_are_one_line_and_nothing_is_written(loras, tiny_model, tmp_path):
    root = tiny_model("tiny-a")

    def export(path):
        run_export(ExportConfig(model=str(root), out=tmp_path / "e", **SIZE, loras=((str(path), 1.0),)))

    unknown = tmp_path / "unknown.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(24, 4),
               "transformer.blocks.9.attn1.nowhere.lora_A.weight": torch.zeros(4, 24),
               "transformer.blocks.9.attn1.nowhere.lora_B.weight": torch.zeros(24, 4)}, unknown)
    with pytest.raises(SoraError, match=r"1 layer\(s\) match nothing in this DiT: blocks.9.attn1.nowhere"):
        export(unknown)
    shape = tmp_path / "shape.safetensors"
    save_file({"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 7),
               "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(24, 4)}, shape)
    with pytest.raises(SoraError, match=r"blocks.0.attn1.to_q is \[24, 7\], the DiT's is \[24, 24\]"):
        export(shape)
    rank = tmp_path / "rank.safetensors"
    save_file({"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24),
               "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(24, 3)}, rank)
    with pytest.raises(SoraError, match="disagree in rank"):
        export(rank)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 24)}, foreign)
    with pytest.raises(SoraError, match="is not a LoRA tensor of a known format"):
        export(foreign)
    pickled = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(SoraError, match="a pickled LoRA .* is never unpickled"):
        export(pickled)
    with pytest.raises(SoraError, match="no such LoRA file"):
        export(tmp_path / "missing.safetensors")
    assert not (tmp_path / "e").exists()


def test_lora_arguments():
    assert parse_lora("a/b.safetensors") == (parse_lora("a/b.safetensors:1")[0], 1.0)
    assert parse_lora("style.safetensors:0.75")[1] == 0.75
    assert parse_lora("c:/x/y.safetensors:-.5")[1] == -0.5
    assert parse_lora("dir:with:colons.safetensors")[1] == 1.0
    with pytest.raises(SoraError, match="not a finite number"):
        parse_lora("x.safetensors:1e999")


def test_loras_applied_at_load_compute_what_the_export_with_them_fused_computes(loras, fused, tiny_engines):
    """Two LoRAs applied to the base engines at load (no re-export) against the export with both fused (Wan's
    layout at 0.8, then PEFT's at 0.5): frames
    within 1e-4 on ONNX Runtime; at scale 0 the base engines' output, bit for bit; a LoRA left out is seen."""
    base = tiny_engines("tiny-a")
    noise = np.random.default_rng(9).standard_normal(Pipeline.load(base).latent_shape(**SIZE), dtype=np.float32)

    def run(engines, with_loras=()):
        pipe = Pipeline.load(engines, backend="ort", loras=with_loras)
        return pipe(PROMPT, NEGATIVE, SIZE["height"], SIZE["width"], SIZE["frames"], 3, 5.0, latents=noise)

    stacked, files_scales = fused(("wan", "peft"))
    exported = run(stacked)
    applied = run(base, tuple(files_scales))
    assert float(np.abs(applied.frames - exported.frames).max()) < 1e-4
    assert _rel(applied.latents, exported.latents) < 1e-5
    assert np.array_equal(run(base, ((loras["peft"], 0.0),)).latents, run(base).latents)
    assert _rel(run(base, files_scales[:1]).latents, exported.latents) > 1e-3  # the control: one LoRA missing


def test_fused_weights_are_cached_by_content(loras, tiny_engines, tmp_path):
    """The weights with the LoRAs added are written to this user's cache, named by the DiT's content and the LoRAs'
    content and scales; a second load maps them and generates the same latents. An entry that is not what was
    written (cut short, an index that is not one) is computed afresh; without a cache (None), each time."""
    base = tiny_engines("tiny-a")
    with_loras = ((loras["wan"], 0.3),)  # a scale no other test uses: this test's own entry
    noise = np.random.default_rng(2).standard_normal(Pipeline.load(base).latent_shape(**SIZE), dtype=np.float32)

    def run():
        return Pipeline.load(base, backend="ort", loras=with_loras)(
            PROMPT, NEGATIVE, SIZE["height"], SIZE["width"], SIZE["frames"], 2, 5.0, latents=noise,
            output_type="latent").latents

    first = run()
    digest = Pipeline.load(base, loras=with_loras).lora_set.digest()
    [entry] = (cache_home() / "compiled" / "lora").glob(f"transformer-*-{digest}-fp32")
    mapped = cached_weights(entry, lambda: pytest.fail("computed again"))
    assert mapped and all(isinstance(v, np.memmap) for v in mapped.values())
    assert np.array_equal(run(), first)

    calls = []

    def compute():
        calls.append(1)
        return {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}

    folder = tmp_path / "entry"
    assert not isinstance(cached_weights(folder, compute)["w"], np.memmap) and len(calls) == 1  # written
    assert isinstance(cached_weights(folder, compute)["w"], np.memmap) and len(calls) == 1  # read back
    with open(folder / "weights.bin", "r+b") as f:
        f.truncate(8)
    assert np.array_equal(cached_weights(folder, compute)["w"], compute()["w"]) and len(calls) == 3
    (folder / "index.json").write_text("{not json")
    assert not isinstance(cached_weights(folder, compute)["w"], np.memmap) and len(calls) == 4
    assert not isinstance(cached_weights(None, compute)["w"], np.memmap) and len(calls) == 5


@pytest.mark.skipif(not ov_backend.available(), reason="OpenVINO is not installed")
def test_loras_applied_at_load_on_openvino(fused, tiny_engines):
    """OpenVINO compiles the base DiT with the LoRAs' weights in place of its constants: what ONNX Runtime computes
    with the LoRAs fused at export (within OpenVINO's own fp32 difference from it). The compiled model is cached
    by the engine's content and the LoRAs' content and scales: a second load with the same LoRAs reads it."""
    stacked, files_scales = fused(("wan", "peft"))
    noise = np.random.default_rng(4).standard_normal(Pipeline.load(stacked).latent_shape(**SIZE), dtype=np.float32)

    def run(engines, backend, with_loras=()):
        return Pipeline.load(engines, backend=backend, loras=with_loras)(
            PROMPT, NEGATIVE, SIZE["height"], SIZE["width"], SIZE["frames"], 3, 5.0, latents=noise,
            output_type="latent").latents

    exported = run(stacked, "ort")
    compiled = cache_home() / "compiled" / "openvino"
    before = set(compiled.glob("transformer-*")) if compiled.is_dir() else set()
    assert _rel(run(tiny_engines("tiny-a"), "openvino", tuple(files_scales)), exported) < 1e-4
    with_loras = set(compiled.glob("transformer-*-lora*")) - before  # keyed by the LoRAs' content and scales
    assert len(with_loras) == 1 and len(blobs := list(next(iter(with_loras)).iterdir())) == 1
    again = run(tiny_engines("tiny-a"), "openvino", tuple(files_scales))  # the compiled model, from the cache
    assert set(compiled.glob("transformer-*-lora*")) - before == with_loras
    assert list(next(iter(with_loras)).iterdir()) == blobs and _rel(again, exported) < 1e-4
    rescaled = (files_scales[0], (files_scales[1][0], 0.25))
    assert _rel(run(tiny_engines("tiny-a"), "openvino", rescaled), exported) > 1e-3  # another scale: another entry
    assert len(set(compiled.glob("transformer-*-lora*")) - before) == 2
    assert _rel(run(tiny_engines("tiny-a"), "openvino"), exported) > 1e-3


def test_loras_at_load_refuse_what_they_cannot_change(loras, tiny_engines, engine_copy):
    with pytest.raises(SoraError, match="LoRAs are applied to built engines on ort, openvino, tensorrt, not ort-cuda"):
        Pipeline.load(tiny_engines("tiny-a"), backend="ort-cuda", loras=((loras["peft"], 1.0),))
    with pytest.raises(SoraError, match="its TensorRT DiT plan was built without --trt-refittable"):
        Pipeline.load(tiny_engines("tiny-a"), backend="tensorrt", loras=((loras["peft"], 1.0),))
    manifest = json.loads((engine_copy / "manifest.json").read_text())  # a plan recorded as built refittable
    manifest["engines"]["transformer"]["trt_build"] = {"builder": {"builder_flags": ["REFIT"]}}
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    assert refittable(load_manifest(engine_copy, verify=False))
    with pytest.raises(SoraError, match="this LoRA is for another model"):
        Pipeline.load(tiny_engines("tiny-b"), backend="ort", loras=((loras["peft"], 1.0),))

"""Streaming export (export/streaming.py): each component traced weightless, its weights written from the checkpoint
one tensor at a time, against the export of the same component loaded with its weights: the same graph, outputs
within 1e-6, for checkpoints stored in fp32, bf16 and fp16 and in shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fails_one_line

from soraedge.export.checkpoint import read_checkpoint
from soraedge.export.dit import AttentionForm, dit_spec, load_dit
from soraedge.export.onnx_export import export_onnx
from soraedge.export.streaming import CheckpointTensors, blocks_streamed, is_weightless, load_model
from soraedge.export.text_encoder import load_text_encoder, text_encoder_spec
from soraedge.export.vae import load_vae_decoders, vae_specs
from soraedge.runtime.errors import SoraError
from soraedge.runtime.spec import Dim

STREAM_MAX_ABS = 1e-6


def restore(src: Path, dst: Path, component: str, dtype: torch.dtype, shards: int = 1) -> Path:
    """A copy of the pipeline directory `src` whose `component` weights are stored as `dtype`, in `shards` files
    with a `*.safetensors.index.json` when more than one."""
    shutil.copytree(src, dst)
    folder = dst / component
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    for f in folder.glob("*.index.json"):
        f.unlink()
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    names = sorted(state)
    if shards == 1:
        save_file(state, folder / "diffusion_pytorch_model.safetensors" if component != "text_encoder"
                  else folder / "model.safetensors")
        return dst
    stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in part}, folder / file)
        weight_map.update({k: file for k in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _run(path: Path, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _same_graph(a: Path, b: Path) -> None:
    ga, gb = (onnx.load(str(p), load_external_data=False).graph for p in (a, b))
    assert [n.op_type for n in ga.node] == [n.op_type for n in gb.node]
    assert sorted(tuple(i.dims) for i in ga.initializer) == sorted(tuple(i.dims) for i in gb.initializer)


def _both(module_of, spec, tmp: Path, sizes: dict, checkpoint: CheckpointTensors, probe: dict) -> float:
    """Export the component with its weights and weightless (streamed); the largest difference of their outputs
    at a probe size other than the export sample's."""
    loaded, streamed = module_of(True), module_of(False)
    assert is_weightless(streamed) and not is_weightless(loaded)
    export_onnx(loaded, spec, tmp / "loaded.onnx", 23, sizes)
    export_onnx(streamed, spec, tmp / "streamed.onnx", 23, sizes, checkpoint)
    _same_graph(tmp / "loaded.onnx", tmp / "streamed.onnx")
    feeds = spec.sample_inputs(seed=7, **probe)
    return float(np.abs(_run(tmp / "loaded.onnx", feeds) - _run(tmp / "streamed.onnx", feeds)).max())


@pytest.mark.parametrize("dtype, shards", [(torch.bfloat16, 1), (torch.float16, 3)])  # fp32: every other export
def test_streamed_dit_equals_the_loaded_export(tiny_model, tmp_path, dtype, shards):
    root = restore(tiny_model("tiny-a"), tmp_path / "model", "transformer", dtype, shards)
    cfg = read_checkpoint(root).transformer_config
    spec = dit_spec(cfg, 16, Dim("f", 1, 2, 3), Dim("h", 2, 4, 8, 2), Dim("w", 2, 4, 8, 2))
    err = _both(lambda w: load_dit(root, AttentionForm.ONNX, w), spec, tmp_path, {"b": 2, "f": 2, "h": 4, "w": 6},
                CheckpointTensors(root / "transformer"), {"b": 1, "f": 3, "h": 6, "w": 4})
    assert err <= STREAM_MAX_ABS


def test_streamed_text_encoder_and_vae_equal_the_loaded_export(tiny_model, tmp_path):
    root = restore(tiny_model("tiny-b"), tmp_path / "model", "text_encoder", torch.bfloat16, 2)
    ck = read_checkpoint(root)
    te_spec = text_encoder_spec(load_text_encoder(root, ck.text_encoder_class, False).encoder.config.hidden_size, 16)
    err = _both(lambda w: load_text_encoder(root, ck.text_encoder_class, w), te_spec, tmp_path,
                {"b": 2, "s": 8}, CheckpointTensors(root / "text_encoder"), {"b": 1, "s": 16})
    assert err <= STREAM_MAX_ABS
    first, _, slots, _ = load_vae_decoders(root, weights=False)
    first_loaded, *_ = load_vae_decoders(root)
    spec = vae_specs(ck.latent_channels, ck.vae_scale_spatial, ck.vae_scale_temporal, slots, Dim("h", 1, 4, 8),
                     Dim("w", 1, 6, 8))[0]
    err = _both(lambda w: first_loaded if w else first, spec, tmp_path, {"h": 4, "w": 6},
                CheckpointTensors(root / "vae"), {"h": 3, "w": 5})
    assert err <= STREAM_MAX_ABS


def test_the_control_a_changed_weight_is_seen(tiny_model, tmp_path):
    """The bound can fail: a checkpoint with one tensor changed streams into a graph whose outputs differ."""
    root = restore(tiny_model("tiny-a"), tmp_path / "model", "transformer", torch.float32)
    cfg = read_checkpoint(root).transformer_config
    spec = dit_spec(cfg, 16, Dim("f", 1, 2, 3), Dim("h", 2, 4, 8, 2), Dim("w", 2, 4, 8, 2))
    loaded = load_dit(root, AttentionForm.ONNX)
    file = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["proj_out.weight"] += 1e-3
    save_file(state, file)
    export_onnx(loaded, spec, tmp_path / "loaded.onnx", 23, {"b": 2, "f": 2, "h": 4, "w": 6})
    export_onnx(load_dit(root, AttentionForm.ONNX, False), spec, tmp_path / "streamed.onnx", 23,
                {"b": 2, "f": 2, "h": 4, "w": 6}, CheckpointTensors(root / "transformer"))
    feeds = spec.sample_inputs(seed=7, b=1, f=3, h=6, w=4)
    assert np.abs(_run(tmp_path / "loaded.onnx", feeds) - _run(tmp_path / "streamed.onnx", feeds)).max() > 1e-5


def test_weightless_and_loaded_models_are_float32_and_a_missing_tensor_is_one_line(tiny_model, tmp_path):
    """Built weightless, a model's parameters are fake (no storage) and float32; loaded, a bf16-stored checkpoint
    comes in as float32; a parameter the checkpoint lacks is named."""
    from diffusers import WanTransformer3DModel

    root = restore(tiny_model("tiny-a"), tmp_path / "model", "transformer", torch.bfloat16)
    model = load_model(WanTransformer3DModel, root / "transformer", weights=False)
    assert is_weightless(model) and all(p.dtype == torch.float32 for p in model.parameters())
    loaded = load_model(WanTransformer3DModel, root / "transformer")
    assert not is_weightless(loaded) and all(p.dtype == torch.float32 for p in loaded.parameters())
    file = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["proj_out.bias"]
    save_file(state, file)
    with pytest.raises(SoraError, match="no tensor for the model's parameter proj_out.bias"):
        load_model(WanTransformer3DModel, root / "transformer")


def test_a_shape_that_disagrees_with_the_config_is_one_line(tiny_model, tmp_path):
    root = restore(tiny_model("tiny-a"), tmp_path / "model", "transformer", torch.float32)
    file = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state["proj_out.weight"] = state["proj_out.weight"][:, :-1].contiguous()
    save_file(state, file)
    with pytest.raises(SoraError, match=r"diffusion_pytorch_model.safetensors: proj_out.weight is \[\d+, \d+\]"):
        load_dit(root, AttentionForm.ONNX)


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_a_shard_missing_from_its_index_is_one_line_and_nothing_is_written(tiny_model, tmp_path, component):
    from soraedge.cli.export_cmd import main as export_main

    root = restore(tiny_model("tiny-a"), tmp_path / "model", component, torch.bfloat16, shards=3)
    shard = sorted((root / component).glob("*-00002-of-00003.safetensors"))[0]
    shard.unlink()
    fails_one_line(export_main, [root, "-o", tmp_path / "e"], f"{shard} is missing", "lists it as a shard")
    assert not (tmp_path / "e").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("method", ["block by block", "copy", "control"])
def test_a_model_too_large_to_check_whole_is_checked_block_by_block_or_on_a_copy_with_fewer_layers(
        tiny_model, tmp_path, method):
    """Where one fp32 copy beside ONNX Runtime's does not fit, parity runs the whole graph against PyTorch run block
    by block from the checkpoint (where the graph's session runs here), else on a copy with the first layers of the
    same checkpoint, exported the same way; the manifest entry says which method checked it, and nothing of the
    copy stays behind. The control: a block-by-block reference reading a checkpoint with one block's weight
    changed fails the check."""
    from types import SimpleNamespace

    from soraedge.export import build
    from soraedge.export.dit import load_reference_dit, streamed_reference_dit

    root = tiny_model("tiny-a")
    cfg = read_checkpoint(root).transformer_config
    spec = dit_spec(cfg, 16, Dim("f", 1, 2, 3), Dim("h", 2, 4, 8, 2), Dim("w", 2, 4, 8, 2))
    fewer = {"num_layers": 1}
    reference = root
    if method == "control":
        reference = restore(root, tmp_path / "changed", "transformer", torch.float32)
        file = reference / "transformer" / "diffusion_pytorch_model.safetensors"
        state = load_file(file)
        state["blocks.1.ffn.net.2.weight"] = state["blocks.1.ffn.net.2.weight"] * 1.5
        save_file(state, file)

    class TooLarge(build.ParitySource):
        def whole_fits(self) -> bool:
            return False

    streamed = None if method == "copy" else (
        lambda: streamed_reference_dit(reference, CheckpointTensors(reference / "transformer")))
    parity = TooLarge(lambda: load_reference_dit(root), 0,
                      (lambda: load_dit(root, AttentionForm.ONNX, False, **fewer),
                       lambda: load_reference_dit(root, **fewer)), fewer, streamed)
    out = tmp_path / "engine"
    out.mkdir()
    report = SimpleNamespace(seconds={})

    def export():
        return build._export_component("transformer", load_dit(root, AttentionForm.ONNX, False), parity,
                                       CheckpointTensors(root / "transformer"), spec, out, 23,
                                       {"b": 2, "f": 2, "h": 4, "w": 6}, [{"b": 1, "f": 3, "h": 6, "w": 4}],
                                       build.ExportConfig(model=str(root), out=out), report, print,
                                       {"folders": {"transformer": str(tmp_path)}})  # a key of its own

    if method == "control":
        with pytest.raises(SoraError, match="transformer: the ONNX graph differs from PyTorch"):
            export()
        return
    entry = export()
    expect = "whole graph at full size, PyTorch run block by block" if streamed else "a copy with {'num_layers': 1}"
    assert entry["parity"]["method"].startswith(expect) and entry["parity"]["max_rel"] < 1e-5
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["transformer.onnx", "transformer.onnx.data"]


def test_a_model_run_block_by_block_equals_it_loaded_whole(tiny_model):
    """blocks_streamed: the weightless text encoder run with each block's weights read as the block runs computes
    exactly what the model loaded with its weights computes, and holds no block's weights afterwards."""
    from torch._subclasses.fake_tensor import is_fake

    root = tiny_model("tiny-b")
    whole = load_text_encoder(root, "UMT5EncoderModel")
    spec = text_encoder_spec(whole.encoder.config.d_model, 16)
    feeds = [torch.from_numpy(v) for v in spec.sample_inputs(seed=3, b=2, s=7).values()]
    streamed = load_text_encoder(root, "UMT5EncoderModel", weights=False)
    blocks = streamed.encoder.encoder.block
    with blocks_streamed(streamed, root / "text_encoder", blocks), torch.no_grad():
        got = streamed(*feeds)
        assert all(is_fake(p) for p in blocks.parameters())  # released after each block
    with torch.no_grad():
        assert torch.equal(got, whole(*feeds))
    assert all(is_fake(p) for p in streamed.parameters())


def test_fp16_written_as_the_weights_stream_equals_onnxruntimes_conversion_of_the_fp32_export(tiny_model, tmp_path):
    """A graph written in fp16 as its weights stream from a bf16 checkpoint in shards, and the file conversion that
    reads one weight at a time (precision/fp16.py), both compute exactly what onnxruntime's converter makes of the
    fp32 export loaded whole (the reference: the library's own conversion)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from soraedge.precision.convert import FP16_ISLANDS
    from soraedge.precision.fp16 import convert_fp16
    from soraedge.precision.graph_scopes import nodes_in_modules
    from soraedge.precision.tensor_files import load_model as load_onnx

    root = restore(tiny_model("tiny-a"), tmp_path / "model", "transformer", torch.bfloat16, 2)
    spec = dit_spec(read_checkpoint(root).transformer_config, 16, Dim("f", 1, 2, 3), Dim("h", 2, 4, 8, 2),
                    Dim("w", 2, 4, 8, 2))
    sample, weights = {"b": 2, "f": 2, "h": 4, "w": 6}, CheckpointTensors(root / "transformer")
    ops, modules = FP16_ISLANDS["transformer"]
    export_onnx(load_dit(root, AttentionForm.ONNX, False), spec, tmp_path / "fp32.onnx", 23, sample, weights)
    summary = export_onnx(load_dit(root, AttentionForm.ONNX, False), spec, tmp_path / "direct.onnx", 23, sample,
                          weights, (ops, modules))
    assert summary["nodes_kept_fp32"] > 0
    convert_fp16(tmp_path / "fp32.onnx", tmp_path / "file.onnx", ops, modules)
    model = load_onnx(tmp_path / "fp32.onnx")
    keep = (*ops, *DEFAULT_OP_BLOCK_LIST)
    kept = set(nodes_in_modules(model, modules)) | {n.name for n in model.graph.node if n.op_type in keep}
    onnx.save_model(convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep),
                                             node_block_list=sorted(kept), disable_shape_infer=True),
                    str(tmp_path / "library.onnx"), save_as_external_data=True, location="library.onnx.data")
    feeds = spec.sample_inputs(seed=7, b=1, f=3, h=6, w=4)
    reference = _run(tmp_path / "library.onnx", feeds)
    for name in ("direct", "file"):
        graph = onnx.load(str(tmp_path / f"{name}.onnx"), load_external_data=False).graph
        types = {t.data_type for t in graph.initializer}
        assert onnx.TensorProto.FLOAT16 in types
        assert np.array_equal(_run(tmp_path / f"{name}.onnx", feeds), reference)
    assert not np.array_equal(_run(tmp_path / "fp32.onnx", feeds), reference)  # fp16 is seen: the control


def test_an_fp16_dit_whose_fp32_form_does_not_run_here_is_never_written_in_fp32(tiny_model, tmp_path, monkeypatch):
    """`--onnx-only --dit-precision fp16` on a machine whose memory the DiT's fp32 weights exceed (the available
    memory set just below them): the DiT is written in fp16 as its weights stream, checked against
    PyTorch at the fp16 bound, said in one line and in the manifest; no fp32 DiT is written, nor gated, and the engines
    generate. With the bound set below what fp16 reaches (the control), the parity gate refuses it."""
    from soraedge.export import build
    from soraedge.export.build import ExportConfig, run_export
    from soraedge.precision.convert import RUN_FRACTION
    from soraedge.runtime.manifest import load_manifest
    from soraedge.runtime.pipeline import Pipeline

    from conftest import TEST_SIZE

    model = tiny_model("tiny-a")
    params = build._check_sizes(read_checkpoint(model))
    available = int(4 * params["transformer"] / RUN_FRACTION) - 1
    monkeypatch.setattr(build, "available_bytes", lambda: available)
    written = []
    real_save = onnx.save_model
    monkeypatch.setattr(onnx, "save_model", lambda m, path, *a, **k: (written.append(
        (Path(path).name, {t.data_type for t in m.graph.initializer})), real_save(m, path, *a, **k))[1])
    logged = []
    cfg = ExportConfig(model=str(model), out=tmp_path / "e", **TEST_SIZE["tiny-a"], onnx_only=True,
                       component_precision=(("transformer", "fp16"),))
    run_export(cfg, log=logged.append)
    m = load_manifest(tmp_path / "e")
    assert m.precision["transformer"] == "fp16"
    assert "written as its weights stream" in m.data["precision_notes"]["transformer"]
    assert any(line.startswith("transformer: fp16, written as its weights stream") for line in logged)
    entry = m.data["engines"]["transformer"]
    assert entry["precision"] == "fp16" and entry["detail"]["written"].startswith("as the weights streamed")
    assert 1e-6 < entry["parity"]["max_rel"] <= build.PARITY_MAX_REL["fp16"]
    # the graph and its parity copy with fewer layers (the whole does not fit beside PyTorch's here), both in fp16
    # with their fp32 islands: no fp32 DiT was written
    dits = [types for name, types in written if name == "transformer.onnx"]
    assert len(dits) == 2 and all({onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT} <= types for types in dits)
    assert entry["parity"]["method"].startswith("a copy with")
    assert "quality_gate" not in m.runtime
    video = Pipeline.load(tmp_path / "e")("a red ball", steps=2, seed=0).frames
    assert np.isfinite(video).all()

    print("fp16 parity", entry["parity"])
    monkeypatch.setitem(build.PARITY_MAX_REL, "fp16", entry["parity"]["max_rel"] / 2)
    with pytest.raises(SoraError, match="above the fp16 tolerance"):
        build.check_parity("transformer", entry["parity"], "fp16")

"""Orchestrate an export: checkpoint -> ONNX models + tokenizer + scheduler config + manifest, atomically.

Everything is written into a temporary sibling directory and renamed into place at the end, so an interrupted or
failed export never leaves a half-written engine directory, and an existing one is never lost. An existing
directory built from the same content with the same options (the cache key) is reused; a different one is
refused unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import __version__
from ..precision.calib.config import CalibConfig
from ..runtime.choices import AUTO, GPU_BACKENDS, Backend, Execution, Graph
from ..runtime.errors import SoraError
from ..runtime.experts import PROBES
from ..runtime.gpu_target import target
from ..runtime.lora import LoraSet, read_lora
from ..runtime.manifest import Manifest, sha256_file, staged
from ..runtime.memory import available_bytes
from ..runtime.spec import Dim
from ..runtime.user_cache import check_settings
from ..runtime.validate import check_frames, check_size, check_threads, latent_grid
from .checkpoint import WanCheckpoint, read_checkpoint, read_json
from ..target.choose import build_runtime, check_request, cpu_only, graph_bytes, openvino_unsupported
from .dit import AttentionForm, dit_spec, load_dit, load_reference_dit, streamed_reference_dit
from .dit_probe import FirstBlockProbe, ProbeReference, probe_spec
from ..target.gated_choice import gate_target
from ..precision.convert import (FP16_ISLANDS, WEIGHT_BYTES, component_of, convert_engines, execution_of,
                                 fit_to_memory, plan_precision, runs_in, stream_fp16)
from ..target.staging import ExportReport, build_keys, check_destination, commit, up_to_date
from ..target.trt_target import TrtOptions
from .text_encoder import load_text_encoder, text_encoder_spec
from .vae import load_vae_decoders, vae_specs

# The parity gate, by the precision the graph is written in: fp32 graphs measure 1e-7 to 5e-6 relative against
# PyTorch (the tiny test models, the demo, the Wan2.1-1.3B transformer configuration), fp16 ones with their fp32
# islands 8e-4 (tiny-a's DiT); a wrong graph is off by far more than either.
PARITY_MAX_REL = {Graph.FP32: 1e-3, Graph.FP16: 2e-2}
MAX_SIDE = 1280  # largest height/width the engines accept (TensorRT profile max); ORT CPU itself has no limit


@dataclass(frozen=True)
class ExportConfig:
    model: str  # a diffusers directory, or "demo"
    out: Path
    frames: int | None = None  # default frame count for sora-run (4k+1); default: the model's
    max_frames: int = 81  # the most frames the DiT engine accepts (any 4k+1 up to it decodes: chunked VAE)
    height: int | None = None
    width: int | None = None
    attention: AttentionForm | None = None  # None: ONNX Attention, or what --backend tensorrt's version parses
    max_sequence_length: int | None = None  # text tokens; default: the model's (512 for Wan2.1, as WanPipeline)
    overwrite: bool = False
    check_parity: bool = True
    backend: str = "auto"  # "auto" (fastest CPU backend measured here) | "ort" | "openvino" | "ort-cuda" (this GPU)
    onnx_only: bool = False  # stop after the portable ONNX (and the quality gate on the CPU): build no target
    # Default precision of every component: auto (fp32 graphs, the execution precision left to the target build)
    # | fp32 | fp16 | int8 | int8-dynamic (graphs) | bf16 (fp32 graphs run in bf16 by OpenVINO).
    # precision/convert.py says what each component offers.
    precision: str = "auto"
    component_precision: tuple[tuple[str, str], ...] = ()  # per-component overrides: (("text_encoder", "int4"),)
    min_psnr: float | None = None  # the gate's threshold; default by what ships (30 dB 8-bit/bf16, 40 dB fp16)
    calib: CalibConfig = field(default_factory=CalibConfig)  # INT8 DiT calibration
    threads: int | None = None
    trt: TrtOptions = field(default_factory=TrtOptions)  # --backend tensorrt: attention mode, builder settings
    demo_weights: str | None = None  # model "demo" only: trained weights other than the shipped ones
    loras: tuple[tuple[str, float], ...] = ()  # (safetensors file, scale): fused into the DiT in order


def _checkpoint_digests(ck: WanCheckpoint) -> dict[str, str]:
    """Content hash of everything the export reads (configs, weights, tokenizer), per folder ("" for the files at the
    top): the whole is the engine directory's cache key, a component's own folder its traced graph's."""
    hashes: dict[str, hashlib._Hash] = {}
    for p in sorted(ck.root.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".model", ".txt"):
            rel = p.relative_to(ck.root)
            h = hashes.setdefault(rel.parts[0] if len(rel.parts) > 1 else "", hashlib.sha256())
            h.update(rel.as_posix().encode())
            h.update(sha256_file(p).encode())
    return {folder: h.hexdigest() for folder, h in hashes.items()}


def _whole_digest(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def _source_digest() -> str:
    """A digest of the code that writes an engine directory (every .py of these subpackages): part of the cache key,
    so a changed exporter rebuilds an export made by the old code at the same package version."""
    return _code_digest("export", "precision", "target", "runtime", "demo", "fused_attention")


def _trace_digest() -> str:
    """A digest of the code that traces a graph (export/ alone): part of a traced graph's key, so a change to the
    precision passes, the target build or the runtime reuses the graphs."""
    return _code_digest("export")


def _code_digest(*subpackages: str) -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in subpackages:
        for f in sorted((root / sub).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"soraedge": __version__, "soraedge_source": _source_digest(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _quiet():
    """The exporter prints progress bars and optimizer chatter; keep the CLI output to our own lines."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


@dataclass(frozen=True)
class ParitySource:
    """How a component's exported graph is checked against PyTorch: the whole graph against `reference()` where one
    fp32 copy of the model beside ONNX Runtime's fits in memory and within PARITY_WHOLE_MAX_BYTES; else the whole
    graph against `streamed()` (the model run block by block from the checkpoint, export/streaming.py's
    BlocksStreamed) where ONNX Runtime's session of the graph alone runs here within PARITY_FULL_SIZE_MAX_BYTES;
    else a copy with fewer layers (`reduced`: the weightless module and its reference, both built with
    `reduced_config` from the same checkpoint), exported the same way and checked whole. `params`: the component's
    parameter count."""

    reference: Callable[[], object]
    params: int
    reduced: tuple[Callable[[], object], Callable[[], object]] | None = None
    reduced_config: dict | None = None
    streamed: Callable[[], object] | None = None

    def whole_fits(self) -> bool:
        available = available_bytes()
        need = 2 * 4 * self.params  # the fp32 module or ONNX Runtime's copy (one at a time), and room to run
        return self.reduced is None or (need <= PARITY_WHOLE_MAX_BYTES and (available is None or need <= available))


def _export_component(name, module, parity: ParitySource, checkpoint, spec, tmp, opset, sample, probes, cfg, report,
                      log, trace: dict, precision: str = Graph.FP32):
    """Trace `module` into tmp/name.onnx (or reuse the graph an earlier export traced from the same content:
    export/trace_cache.py, keyed by `trace` and the component's own inputs), then check it against PyTorch. The
    graph is fp32, or written in fp16 as its weights stream (`precision`, precision/convert.py's stream_fp16)."""
    from . import trace_cache
    from .onnx_export import export_onnx, parity_check

    t0 = time.perf_counter()
    islands = FP16_ISLANDS[component_of(name)] if precision == Graph.FP16 else None
    key = trace_cache.trace_key(**{k: v for k, v in trace.items() if k != "folders"},
                                checkpoint=checkpoint.key(trace["folders"][checkpoint.folder.name]), component=name,
                                spec=spec.to_dict(), opset=opset, sample=sample, precision=precision)
    if trace_cache.reuse(key, tmp / f"{name}.onnx"):
        log(f"{name}: the graph traced from the same weights by an earlier export (cache {key[:12]})")
    else:
        log(f"exporting {name}{f' in {precision}' if islands else ''} ...")
        with _quiet():
            export_onnx(module, spec, tmp / f"{name}.onnx", opset, sample, checkpoint, islands)
        trace_cache.store(key, tmp / f"{name}.onnx")
    report.seconds[f"export_{name}"] = time.perf_counter() - t0
    entry = {"file": f"{name}.onnx", "spec": spec.to_dict(), "opset": opset}
    if islands:
        entry.update(precision=precision, detail={"keep_ops": list(islands[0]), "keep_modules": list(islands[1]),
                                                  "written": "as the weights streamed from the checkpoint"})
    if cfg.check_parity:
        t0 = time.perf_counter()
        if parity.whole_fits():
            entry["parity"] = {**parity_check(parity.reference, spec, tmp / f"{name}.onnx", probes),
                               "method": "whole graph"}
        elif parity.streamed is not None and _full_size_fits(tmp / f"{name}.onnx"):
            entry["parity"] = {**parity_check(parity.streamed, spec, tmp / f"{name}.onnx", probes),
                               "method": "whole graph at full size, PyTorch run block by block from the checkpoint "
                                         "(the whole model does not fit beside its ONNX graph here)"}
        else:
            with tempfile.TemporaryDirectory(prefix=f".parity-{name}-", dir=tmp.parent) as scratch:
                small = Path(scratch) / f"{name}.onnx"
                with _quiet():
                    export_onnx(parity.reduced[0](), spec, small, opset, sample, checkpoint, islands)
                entry["parity"] = {**parity_check(parity.reduced[1], spec, small, probes),
                                   "method": f"a copy with {parity.reduced_config} (the whole model is too large "
                                             f"to check beside its ONNX graph here)"}
        report.seconds[f"parity_{name}"] = time.perf_counter() - t0
        log(f"  {name}: max abs error vs PyTorch {entry['parity']['max_abs']:.2e} "
            f"(rel {entry['parity']['max_rel']:.2e}) on shapes {[p['sizes'] for p in entry['parity']['probes']]}"
            f" ({entry['parity']['method']}{f', the graph in {precision}' if islands else ''})")
        check_parity(name, entry["parity"], precision)
    return entry


def _full_size_fits(path: Path) -> bool:
    """Whether ONNX Runtime's session of the graph `path` runs here within PARITY_FULL_SIZE_MAX_BYTES, for the
    full-size check against PyTorch run block by block."""
    size = graph_bytes(path)
    return size <= PARITY_FULL_SIZE_MAX_BYTES and runs_in(size, available_bytes())


MIN_TOKEN_COSINE = 0.999  # a weight-only text encoder against PyTorch, every real token's embedding


def _weight_only_text_encoder(ck: WanCheckpoint, te, spec, tmp: Path, entry: dict, precision: str, max_len: int,
                              report: ExportReport, log) -> dict:
    """The text encoder just exported to `tmp` (fp32, its parity checked) replaced there by its weight-only form,
    then checked at full size against PyTorch: the weightless `te` run with each block's weights read from the
    checkpoint as the block runs (export/streaming.py's blocks_streamed), so neither side needs the fp32 model in
    memory. Every real token's embedding must reach MIN_TOKEN_COSINE; otherwise nothing is written."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from ..precision.quality_gate import token_cosines
    from ..precision.weight_only import quantize_weights
    from .streaming import blocks_streamed

    t0 = time.perf_counter()
    log(f"  text_encoder: {precision} weight-only ...")
    src, converted = tmp / entry["file"], tmp / ".weight-only" / entry["file"]
    converted.parent.mkdir()
    detail = quantize_weights(src, converted, precision)
    for f in converted.parent.iterdir():  # the graph names its data file by name: both move as they are
        f.replace(tmp / f.name)
    converted.parent.rmdir()
    rng = np.random.default_rng(11)
    length = min(max_len, 64)  # padding is masked: a real token's embedding does not depend on it
    ids = rng.integers(1, te.encoder.config.vocab_size, (2, length)).astype(np.int64)
    mask = (np.arange(length)[None] < np.array([[min(24, length)], [min(7, length)]])).astype(np.int64)
    ids *= mask
    got = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(
        spec.output_names, {"input_ids": ids, "attention_mask": mask})[0]
    blocks = max((m for m in te.modules() if isinstance(m, torch.nn.ModuleList)),
                 key=lambda m: sum(p.numel() for p in m.parameters()))
    with blocks_streamed(te, ck.root / "text_encoder", blocks), torch.no_grad():
        ref = te(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    worst = float(token_cosines(got, ref, mask).min())
    report.seconds["weight_only_text_encoder"] = time.perf_counter() - t0
    log(f"  text_encoder {precision}: embedding cosine per token vs PyTorch >= {worst:.5f} (block by block, "
        f"full size)")
    if not worst >= MIN_TOKEN_COSINE:
        raise SoraError(f"the {precision} text encoder's embeddings differ from PyTorch's: cosine {worst:.5f} for a "
                        f"token, below {MIN_TOKEN_COSINE}; nothing was written. Export it in fp32 "
                        f"(--text-encoder-precision fp32) on a machine with the memory for it")
    return {**entry, "precision": precision, "detail": detail,
            "pytorch_check": {"method": "PyTorch run block by block from the checkpoint, full size",
                              "min_token_cosine": worst, "threshold": MIN_TOKEN_COSINE}}


def check_parity(name: str, parity: dict, precision: str = Graph.FP32) -> None:
    """The parity gate: a graph whose outputs differ from PyTorch's (fp32) by more than PARITY_MAX_REL for its
    precision (relative to the largest reference value, worst output and probe shape) is a wrong export, and nothing
    is written."""
    bound = PARITY_MAX_REL[precision]
    if not parity["max_rel"] <= bound:  # NaN fails too
        raise SoraError(f"{name}: the ONNX graph differs from PyTorch by {parity['max_rel']:.2e} relative (max abs "
                        f"{parity['max_abs']:.2e}), above the {precision} tolerance {bound:.0e}: refusing to ship "
                        f"it (nothing was written)")


REDUCED_LAYERS = 2  # the parity copy of a model too large to check whole: its first layers, same widths
# Models up to this much (two fp32 copies' worth: 0.5B parameters) are checked whole; larger ones on the reduced
# copy, so that an export's memory does not grow with the model (bench/results/export_memory_*).
PARITY_WHOLE_MAX_BYTES = 4 << 30
# Larger graphs up to this much (the real 1.3B DiT's 5.7 GB) are checked whole at full size against PyTorch run
# block by block, which holds the graph's session and one block: an export then stays within 8 GB of host memory.
PARITY_FULL_SIZE_MAX_BYTES = 6 << 30


def _export_into(ck: WanCheckpoint, cfg: ExportConfig, defaults: dict, params: dict[str, int], tmp: Path,
                 report: ExportReport, log, trace: dict, held: dict[str, str],
                 loras: LoraSet) -> tuple[dict, dict, int]:
    """Export every component into `tmp`, each traced weightless and its weights streamed from the checkpoint
    (export/streaming.py), or its graph reused from an earlier trace of the same content (`trace`: the digest of
    each checkpoint folder, of which a component's key takes its own, the attention form, the versions). A
    component in `held` is never written in fp32: the text encoder weight-only (fit_to_memory) is converted at once
    and checked against PyTorch at full size; the DiT in fp16 (stream_fp16) is written so as its weights stream.
    `loras` are fused into the DiT (the first expert, as diffusers loads them) as its weights stream, and into the
    PyTorch reference it is checked against. Returns
    (engine manifest entries, the VAE engine names, d_model)."""
    from .streaming import CheckpointTensors

    s, t = ck.vae_scale_spatial, ck.vae_scale_temporal
    p_t, p_h, p_w = ck.patch
    if p_t != 1:
        raise SoraError(f"temporal patch size {p_t} is not supported (Wan2.1 uses 1)")
    lat_f, lat_h, lat_w = latent_grid(defaults["frames"], defaults["height"], defaults["width"], t, s)
    lat_f_max = max(lat_f, latent_grid(cfg.max_frames, 0, 0, t, s)[0])
    lat_max = max(defaults["height"], defaults["width"], MAX_SIDE) // s
    f_dim = Dim("f", 1, lat_f, lat_f_max)
    h_dim = Dim("h", p_h, lat_h, lat_max // p_h * p_h, p_h)
    w_dim = Dim("w", p_w, lat_w, lat_max // p_w * p_w, p_w)
    engines = {}

    # Text encoder
    te = load_text_encoder(ck.root, ck.text_encoder_class, weights=False)
    d_model = te.encoder.config.hidden_size  # T5: d_model, BERT: hidden_size (transformers maps both)
    spec = text_encoder_spec(d_model, cfg.max_sequence_length)
    fewer = {"num_hidden_layers": min(REDUCED_LAYERS, te.encoder.config.num_hidden_layers)}  # T5 maps it too
    parity = ParitySource(lambda: load_text_encoder(ck.root, ck.text_encoder_class), params["text_encoder"],
                          (lambda: load_text_encoder(ck.root, ck.text_encoder_class, False, **fewer),
                           lambda: load_text_encoder(ck.root, ck.text_encoder_class, **fewer)), fewer)
    engines["text_encoder"] = _export_component(
        "text_encoder", te, parity, CheckpointTensors(ck.root / "text_encoder"), spec, tmp, cfg.attention.opset,
        {"b": 2, "s": min(8, cfg.max_sequence_length)},
        [{"b": 1, "s": cfg.max_sequence_length}, {"b": 2, "s": min(5, cfg.max_sequence_length)}], cfg, report, log,
        trace)
    if "text_encoder" in held:
        engines["text_encoder"] = _weight_only_text_encoder(ck, te, spec, tmp, engines["text_encoder"],
                                                            held["text_encoder"], cfg.max_sequence_length, report, log)
    del te

    # DiT (each expert of Wan2.2 A14B in turn): the exported module carries the export-time rewrites; the reference
    # is diffusers' own model.
    sample = {"b": 2, "f": 2, "h": 2 * p_h, "w": 3 * p_w}
    for expert in ck.experts:
        dit = load_dit(ck.root, cfg.attention, weights=False, expert=expert)
        config = dit.transformer.config
        fewer = {"num_layers": min(REDUCED_LAYERS, config["num_layers"])}
        spec = dit_spec(config, cfg.max_sequence_length, f_dim, h_dim, w_dim, name=expert)
        weights = CheckpointTensors(ck.root / expert, loras if expert == "transformer" else None)
        parity = ParitySource(lambda e=expert, w=weights: load_reference_dit(ck.root, w, e), params[expert],
                              (lambda e=expert: load_dit(ck.root, cfg.attention, False, e, **fewer),
                               lambda e=expert, w=weights: load_reference_dit(ck.root, w, e, **fewer)), fewer,
                              lambda e=expert, w=weights: streamed_reference_dit(ck.root, w, e))
        engines[expert] = _export_component(
            expert, dit, parity, weights, spec, tmp, cfg.attention.opset, sample,
            [{"b": 1, "f": 3, "h": 3 * p_h, "w": 2 * p_w}, {"b": 2, "f": 1, "h": p_h, "w": 4 * p_w}], cfg, report,
            log, trace, held.get("transformer", Graph.FP32))
    # The step-cache probe of each expert: the DiT's first block's modulated input, a small engine of its own (its
    # reference is diffusers' model with one layer: all the probe reads).
    one = {"num_layers": 1}
    for expert in ck.experts:
        dit = load_dit(ck.root, cfg.attention, weights=False, expert=expert)
        weights = CheckpointTensors(ck.root / expert, loras if expert == "transformer" else None)
        name = PROBES[expert]
        engines[name] = _export_component(
            name, FirstBlockProbe(dit.transformer),
            ParitySource(lambda e=expert, w=weights: ProbeReference(load_reference_dit(ck.root, w, e, **one).model),
                         0), weights,
            probe_spec(dit.transformer.config, f_dim, h_dim, w_dim, name=name), tmp, cfg.attention.opset, sample,
            [{"b": 1, "f": 3, "h": 3 * p_h, "w": 2 * p_w}], cfg, report, log, trace)
    del dit

    # VAE: the chunked causal decoder (first frame, then one latent frame per step), checked graph by graph and
    # then as the runtime runs it against diffusers' whole-clip decode.
    first, step, slots, _ = load_vae_decoders(ck.root, weights=False)
    weights = CheckpointTensors(ck.root / "vae")
    lat_hw = [Dim(n, 1, defaults[k] // s, lat_max) for n, k in (("h", "height"), ("w", "width"))]
    specs = vae_specs(ck.latent_channels, s, t, slots, *lat_hw)
    references = (None, None, None, None)
    if cfg.check_parity:  # small: checked whole
        references = load_vae_decoders(ck.root)
    for module, reference, spec in zip((first, step), references[:2], specs):
        engines[spec.name] = _export_component(spec.name, module, ParitySource(lambda r=reference: r, 0), weights,
                                               spec, tmp, cfg.attention.opset, {"h": 4, "w": 6}, [{"h": 3, "w": 5}],
                                               cfg, report, log, trace)
    if cfg.check_parity:
        decode = engines[specs[1].name]["decode_parity"] = _chunked_decode_parity(references[3], specs, tmp,
                                                                                  ck.latent_channels)
        log(f"  chunked decode vs diffusers' decode: max abs error {decode['max_abs']:.2e}")
        check_parity("the chunked VAE decode", decode)
    vae_engines = {"first": specs[0].name, "step": specs[1].name}
    return engines, vae_engines, d_model


def _lora_targets(folder: Path, engines: dict, ck: WanCheckpoint) -> None:
    """Record in each fp32 or fp16 DiT engine's entry where its graph holds each checkpoint tensor
    (precision/tensor_files.py's checkpoint_weights): what sora-run --lora changes at load, without re-export. An
    8-bit DiT's weights are quantized: LoRAs go into it at export only."""
    from ..precision.tensor_files import checkpoint_weights

    for name in ck.experts:
        entry = engines[name]
        if entry.get("precision", Graph.FP32) in (Graph.FP32, Graph.FP16):
            config = read_json(ck.root / name / "config.json")
            rows = [config["num_attention_heads"], config["attention_head_dim"]]
            entry["lora_targets"] = checkpoint_weights(folder / entry["file"], rows)


def _check_sizes(ck: WanCheckpoint) -> dict[str, int]:
    """Before any weight is read: each component's safetensors are well formed (runtime/weights.py), its config
    describes a model that can be built (on the meta device: no memory), and that model's parameters are the ones the
    weights hold, in number and shape. A config with huge dimensions is then one line instead of an export of
    something else. Returns each component's parameter count."""
    import torch
    import transformers
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from .streaming import from_config
    from ..runtime.weights import component_tensors

    classes = {"text_encoder": getattr(transformers, ck.text_encoder_class), "vae": AutoencoderKLWan,
               **{expert: WanTransformer3DModel for expert in ck.experts}}
    counts = {}
    for comp, cls in classes.items():
        tensors = component_tensors(ck.root / comp)
        stored = sum(t.numel for t in tensors.values())
        try:
            with torch.device("meta"), _quiet():
                model = from_config(cls, ck.root / comp)
        except Exception as e:  # a config the library cannot build a model from: any of its exceptions
            raise SoraError(f"{ck.root / comp}/config.json describes no model that can be built "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        counts[comp] = params = sum(p.numel() for p in model.parameters())
        for name, p in model.named_parameters():
            if name in tensors and tuple(p.shape) != tensors[name].shape:
                raise SoraError(f"{tensors[name].file}: {name} is {list(tensors[name].shape)}, but "
                                f"{comp}/config.json makes it {list(p.shape)}")
        if params > 2 * stored + 10**6:
            raise SoraError(f"{ck.root / comp}/config.json describes {params / 1e9:.2f}B parameters but its weights "
                            f"hold {stored / 1e9:.2f}B: the config does not belong to these weights")
    return counts


def _check_runs_here(params: dict[str, int], available: int | None, held: dict[str, str]) -> None:
    """The target build times the DiT and the gate runs the pipeline, each component of the reference in fp32 (or
    at the precision `held` for memory) beside the others' sessions: refuse a component whose weights alone exceed
    this machine's available memory (export streams its weights and needs no such copy: --onnx-only)."""
    for comp, n in params.items():
        p = held.get(component_of(comp), Graph.FP32)
        if not runs_in(WEIGHT_BYTES[p] * n, available):
            raise SoraError(f"{comp} has {n / 1e9:.2f}B parameters ({WEIGHT_BYTES[p] * n / 2**30:.1f} GiB in {p}), "
                            f"too much to run within this machine's {available / 2**30:.1f} GiB of available "
                            f"memory: export the portable ONNX with --onnx-only and build the target where it fits "
                            f"(sora-build)")


def _chunked_decode_parity(vae, specs, tmp: Path, z_dim: int) -> dict:
    """The runtime's chunked decoder on the exported graphs against diffusers' AutoencoderKLWan.decode."""
    import numpy as np
    import torch

    from ..runtime.backends.ort import OrtEngine
    from ..runtime.vae_decode import ChunkedVaeDecoder

    decoder = ChunkedVaeDecoder(*(OrtEngine(tmp / f"{sp.name}.onnx", sp) for sp in specs))
    z = np.random.default_rng(5).standard_normal((1, z_dim, 3, 3, 5), dtype=np.float32)
    got = decoder(z)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(z), return_dict=False)[0].numpy()
    err = float(np.abs(got - ref).max())
    return {"latent_shape": list(z.shape), "max_abs": err, "max_rel": err / float(np.abs(ref).max())}


def _prepare_source(cfg: ExportConfig, workdir: Path) -> tuple[WanCheckpoint, dict, str]:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if cfg.model == "demo":
        from ..demo.pipeline_dir import DEMO_DEFAULTS, WEIGHTS, build_demo_pipeline

        weights = Path(cfg.demo_weights) if cfg.demo_weights else WEIGHTS
        source = f"demo (weights {weights.resolve()})" if cfg.demo_weights else "demo"
        return read_checkpoint(build_demo_pipeline(workdir / "demo-src", weights)), dict(DEMO_DEFAULTS), source
    ck = read_checkpoint(cfg.model)
    return ck, ck.defaults, str(Path(cfg.model).resolve())


def run_export(cfg: ExportConfig, log: Callable[[str], None] = lambda s: None) -> ExportReport:
    """Export `cfg.model` to an engine directory at `cfg.out`. Raises SoraError on bad input."""
    out = Path(cfg.out)
    check_threads(cfg.threads)
    check_settings()  # the caches' sizes
    if cfg.min_psnr is not None and not (math.isfinite(cfg.min_psnr) and cfg.min_psnr > 0):
        raise SoraError(f"min_psnr={cfg.min_psnr}: the quality gate's threshold must be a finite number of dB > 0")
    check_destination(out, None if cfg.model == "demo" else Path(cfg.model))
    report = ExportReport(out=out, reused=False)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.build-", dir=out.parent) as work:
        work = Path(work)
        ck, defaults, source = _prepare_source(cfg, work)
        params = _check_sizes(ck)
        loras = LoraSet([read_lora(Path(path), scale) for path, scale in cfg.loras])
        if loras:  # each LoRA layer names a weight of the DiT, in its shape: before minutes of export
            from .streaming import CheckpointTensors

            CheckpointTensors(ck.root / "transformer", loras)
        pad_token_id = _pad_token_id(ck)
        model_text_len = defaults.pop("max_sequence_length")
        cfg = replace(cfg, max_sequence_length=cfg.max_sequence_length or model_text_len,
                      attention=_attention_form(cfg))
        for k in ("height", "width", "frames"):
            if getattr(cfg, k) is not None:
                defaults[k] = getattr(cfg, k)
        check_size(defaults["height"], defaults["width"], ck.vae_scale_spatial * max(ck.patch[1:]))
        for f in (defaults["frames"], cfg.max_frames):
            check_frames(f, ck.vae_scale_temporal)

        plan, notes = plan_precision(cfg.precision, dict(cfg.component_precision))
        available = available_bytes()
        # --onnx-only runs nothing here but the checks: its fp32 graphs are for the machine that builds the target
        plan, notes, held = fit_to_memory(plan, notes, params, None if cfg.onnx_only else available, cfg.precision,
                                          dict(cfg.component_precision))
        streamed, why = stream_fp16(plan, params, available)
        held, notes = {**held, **streamed}, {**notes, **why}
        for c in held:
            log(f"{c}: {notes[c]}")
        execution = execution_of(cfg.precision)  # fp32, bf16, or auto: decided with the target
        no_openvino = openvino_unsupported(plan)
        if cfg.onnx_only and (cfg.backend != AUTO or execution == Execution.BF16):
            raise SoraError("--onnx-only builds no runtime target: drop --backend and bf16 (build the target later "
                            "with sora-build ONNX_DIR -o ENGINE_DIR --backend ...)")
        if not cfg.onnx_only:
            # fail before minutes of export, not after
            _check_runs_here(params, available, held)
            check_request(cfg.backend, execution, no_openvino, cpu_only(plan))
            if cfg.backend == Backend.TENSORRT:
                from ..target.trt_build import check_plugin_precision

                check_plugin_precision(cfg.trt.attention, plan.get("transformer", Graph.FP32))
        options = {k: v for k, v in asdict(cfg).items() if k not in ("model", "out", "overwrite", "check_parity",
                                                                     "threads", "calib", "component_precision",
                                                                     "min_psnr", "trt", "loras")}
        if cfg.backend == Backend.TENSORRT:
            options["trt"] = asdict(cfg.trt)
        options.update(attention=cfg.attention.value, defaults=defaults, plan=plan, min_psnr=cfg.min_psnr)
        if loras:  # by content and scale, not by the files' names
            options["loras"] = loras.key()
        if cfg.backend in GPU_BACKENDS:
            options["gpu"] = target()  # a build for one GPU is not a build for another
        if plan["transformer"] == "int8":
            options["calib"] = {**cfg.calib.to_dict(), "prompts": cfg.calib.read_prompts()}
        versions = _versions()
        digests = _checkpoint_digests(ck)
        key, inputs_key = build_keys({"checkpoint": _whole_digest(digests), "options": options}, versions)
        if up_to_date(out, key, inputs_key, cfg.overwrite, log):
            log(f"{out} is already an up-to-date export of this model with these options (cache key {key[:12]})")
            report.reused = True
            return report

        reduced = any(p != Graph.FP32 for p in plan.values())
        stage = work / "engine"
        ref = work / "fp32" if reduced else stage  # the fp32 export: the reference for calibration and the gate
        ref.mkdir()
        engines, vae_engines, d_model = _export_into(ck, cfg, defaults, params, ref, report, log,
                                                  {"folders": digests, "attention": cfg.attention.value,
                                                   "text_encoder_class": ck.text_encoder_class,
                                                   "versions": {**versions, "soraedge_source": _trace_digest()}},
                                                  held, loras)
        (ref / "tokenizer").mkdir()
        shutil.copy2(ck.tokenizer_file, ref / "tokenizer" / "tokenizer.json")
        (ref / "scheduler").mkdir()
        (ref / "scheduler" / "scheduler_config.json").write_text(json.dumps(ck.scheduler_config, indent=2))
        pipeline = {
            "family": ck.family,
            "defaults": defaults,
            "max_sequence_length": cfg.max_sequence_length,
            "pad_token_id": pad_token_id,
            "text_dim": d_model,
            "latent_channels": ck.latent_channels,
            "latents_mean": ck.vae_config["latents_mean"],
            "latents_std": ck.vae_config["latents_std"],
            "vae_scale_spatial": ck.vae_scale_spatial,
            "vae_scale_temporal": ck.vae_scale_temporal,
            "patch_size": list(ck.patch),
            "vae": vae_engines,
            "tokenizer": "tokenizer/tokenizer.json",
            "scheduler": "scheduler/scheduler_config.json",
        }
        _lora_targets(ref, engines, ck)
        if ck.boundary_ratio is not None:  # Wan2.2 A14B: the engine transformer_2 runs below this share of the steps
            pipeline["boundary_ratio"] = ck.boundary_ratio
        body = {
            "cache_key": key,
            "inputs_key": inputs_key,
            "source": source,
            "created_unix": int(time.time()),
            "versions": versions,
            "precision": {c: held.get(c, Graph.FP32) for c in plan},
            "attention": cfg.attention.value,
            "gpu": None,  # portable ONNX, not built for a particular GPU
            **({"loras": loras.describe()} if loras else {}),
            "pipeline": pipeline,
            "engines": engines,
        }
        # in memory until the directory is complete: calibration, the target's timings and the gate run from it
        manifest = reference = staged(ref, body)
        if reduced:
            t0 = time.perf_counter()
            log(f"converting to {', '.join(f'{c} {p}' for c, p in plan.items())} ...")
            for c, why in notes.items():
                if c not in held:
                    log(f"  {c} stays fp32: {why}")
            stage.mkdir()
            for d in ("tokenizer", "scheduler"):
                shutil.copytree(ref / d, stage / d)
            converted = convert_engines(ref, stage, engines, plan, _dit_int8(cfg, reference, work), log)
            engines = {n: {k: v for k, v in e.items() if k != "lora_targets"} | converted[n]
                       for n, e in engines.items()}
            _lora_targets(stage, engines, ck)
            manifest = staged(stage, {**body, "precision": plan, "precision_notes": notes, "engines": engines})
            report.seconds["convert_precision"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.onnx_only:
            manifest = manifest.updated(runtime={"backend": Backend.ORT, "precision": Execution.FP32,
                                                 "onnx_only": True})
        else:
            log("building the runtime target (timing the DiT step) ...")
            manifest = build_runtime(manifest, cfg.backend, execution, cfg.threads, log, no_openvino, cfg.trt)
            report.seconds["build_target"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        runtime = gate_target(reference, manifest, manifest.runtime, plan, cfg.min_psnr, cfg.threads, log)
        if "quality_gate" in runtime:
            report.seconds["quality_gate"] = time.perf_counter() - t0
        manifest.updated(runtime=runtime).write()  # once, complete: then swapped into place
        if not commit(stage, out, work, key, inputs_key, cfg.overwrite, log):
            log(f"{out} was written meanwhile by another export of this model with these options: keeping it")
            report.reused = True
    report.seconds["total"] = time.perf_counter() - t_all
    return report


def _attention_form(cfg: ExportConfig) -> AttentionForm:
    """The DiT's ONNX attention form: as asked, or for --backend tensorrt what its version parses (and the plugin
    pass needs), refusing a form that cannot work there."""
    if cfg.backend != Backend.TENSORRT:
        return cfg.attention or AttentionForm.ONNX
    from ..target.trt_build import attention_graph
    from ..target.trt_target import require_tensorrt

    need = attention_graph(require_tensorrt(), cfg.trt.attention, cfg.attention.value if cfg.attention else None)
    return cfg.attention or AttentionForm(need)


def _dit_int8(cfg: ExportConfig, ref: Manifest, work: Path):
    @functools.cache
    def calibration():  # the fp32 pipeline run once, whichever DiT engines it calibrates
        from ..precision.calib.dit_int8 import calibration_samples

        return calibration_samples(ref, cfg.calib, cfg.threads)

    def build(name: str, src: Path, dst: Path) -> dict:
        from ..precision.calib.dit_int8 import quantize_dit

        return quantize_dit(name, src, dst, calibration(), cfg.calib, work, cfg.threads)

    return build


def _pad_token_id(ck: WanCheckpoint) -> int:
    from ..runtime.text import PromptEncoder
    cfg_file = ck.root / "tokenizer" / "tokenizer_config.json"
    pad = read_json(cfg_file).get("pad_token", "<pad>") if cfg_file.is_file() else "<pad>"
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not isinstance(pad, str):
        raise SoraError(f"{cfg_file}: pad_token {pad!r} is not a token")
    tid = PromptEncoder(str(ck.tokenizer_file), None, 1, 0).tok.token_to_id(pad)  # a malformed file: one line
    return 0 if tid is None else int(tid)

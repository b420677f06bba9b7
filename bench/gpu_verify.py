"""The prepared GPU verification: everything this project's GPU code claims, checked in one short loan of a GPU.

The GPU machine it is written for has python3 with torch (CUDA), triton, onnx, numpy and tokenizers, but no package
registry, no diffusers and only the CPU build of onnxruntime; each call to it carries at most 64 MiB of files and
the whole loan is 15 minutes, start included. So the work is split:

- `prepare` (here, on the CPU machine, once): the onnxruntime-gpu wheel in parts of at most `--part-mib`, each
  with its sha256, the small wheels the runtime and the DiT stage need there (ftfy, diffusers), and the tiny test
  pipeline's engines exported here, so nothing is exported there that needs diffusers' checkpoints. Everything
  goes under `.gpu/` (ignored by git; each call names its folders in `carry`).
- `call N` (there): receives part N into the machine's /tmp (it stays between calls while the machine is warm)
  and runs the stages that call is given (CALLS): the first calls run the torch-only stages while they carry
  parts. The last call also carries `.gpu/small`; it joins and checks the wheel, installs it beside the image's
  packages, and runs the ONNX Runtime and DiT stages.
- `run --dry-run` (here): every stage's logic on the CPU at small shapes (ONNX Runtime's CPU provider, Triton's
  interpreter, the plugin kernel compiled to PTX but not launched), so the script is tested before any GPU time.

Each stage runs in its own process under its own timeout and writes one JSON; a stage that fails or times out is
recorded as such and the next one runs. Results: <out>/gpu_verify.json and gpu_verify.md, with the GPU, driver and
library versions. Pass/fail bounds are stated in each stage (BOUNDS).

    python -m soraedge.bench.gpu_verify prepare                  # CPU machine: writes .gpu/
    python -m soraedge.bench.gpu_verify run --dry-run --out /tmp/gpu-dry
    # on the GPU machine, from the repository root (bench/README.md has the exact device calls):
    ln -sfn "$PWD" /tmp/soraedge && PYTHONPATH=/tmp python3 -m soraedge.bench.gpu_verify call 0 --out "$OUT"
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..runtime.manifest import sha256_file

PREP = Path(".gpu")  # under the repository root; `.gitignore` lists it
DEVICE_HOME = Path(tempfile.gettempdir()) / "soraedge-gpu"  # on the GPU machine, kept between calls
ORT_GPU = "onnxruntime-gpu==1.31.1"  # CUDA 13 build, for the image's torch 2.11+cu130 libraries
SMALL_WHEELS = ("ftfy==6.3.1", "wcwidth", "diffusers==0.42.1", "importlib_metadata")
DEVICE_PYTHON = "3.12"
BOUNDS = {
    "ort_vs_cpu_max_rel": 1e-3,  # one DiT call on the CUDA provider (TF32 off) against the CPU provider
    "graph_vs_plain_max_rel": 1e-5,  # a replayed CUDA graph against the same engine without one
    "pipeline_psnr_db": 40.0,  # a tiny-pipeline generation on ORT-CUDA against the CPU engines
    "kernel_cosine": 0.999,  # Triton fp16 attention (and the plugin launch) against fp32 SDPA
    "dit_cosine": 0.999,  # Wan2.1-1.3B DiT: torch bf16 and ORT-CUDA fp16 against torch fp32
}
# (stage, timeout seconds) per call. A loan is 15 minutes, start included, and the last call at most 9 of them: the
# calls carrying wheel parts run the torch-only stages; the last one carries the last part and .gpu/small.
CALLS = {0: [("env", 30), ("kernels", 120)], 1: [("plugin", 60)], 2: [], 3: [],
         4: [("install", 60), ("ort", 45), ("pipeline", 120), ("dit_torch", 240), ("dit_ort", 75)]}
STAGES = ("env", "kernels", "plugin", "install", "ort", "pipeline", "dit_torch", "dit_ort")  # as the calls run them


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- preparation (CPU machine) -------------------------------------------------------------------------------------
def prepare(prep: Path, part_mib: int) -> dict:
    """Wheels for the GPU machine's Python in parts with checksums, and the tiny engines; returns the manifest."""
    wheels = prep / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (28, 27, 17)] + ["--platform=manylinux2014_x86_64"]
    for spec in (ORT_GPU, *SMALL_WHEELS):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"--python-version={DEVICE_PYTHON}", "--implementation=cp", *platforms, "-d", str(wheels),
                        spec], check=True)
    big = next(wheels.glob("onnxruntime_gpu-*.whl"))
    parts = split(big, prep, part_mib << 20)
    small = prep / "small"
    shutil.rmtree(small, ignore_errors=True)
    (small / "wheels").mkdir(parents=True)
    for w in wheels.glob("*.whl"):
        if w != big:
            shutil.copy2(w, small / "wheels" / w.name)
    _tiny_engines(small / "engines")
    manifest = {"wheel": big.name, "bytes": big.stat().st_size, "sha256": sha256_file(big), "parts": parts,
                "small": sorted(p.name for p in (small / "wheels").iterdir())}
    (small / "parts.json").write_text(json.dumps(manifest, indent=2))
    if len(parts) != len(CALLS):
        _log(f"note: {len(parts)} parts; CALLS expects {len(CALLS)} (one per call)")
    return manifest


def split(big: Path, prep: Path, part_bytes: int) -> list[dict]:
    """`big` in parts of at most `part_bytes`, one folder each (prep/p0, p1, ...: what one call carries)."""
    parts = []
    with open(big, "rb") as f:
        for i in range(math.ceil(big.stat().st_size / part_bytes)):
            folder = prep / f"p{i}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            data = f.read(part_bytes)
            (folder / f"{big.name}.part{i}").write_bytes(data)
            parts.append({"file": f"p{i}/{big.name}.part{i}", "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
    return parts


def _tiny_engines(out: Path) -> None:
    from ..export.build import ExportConfig, run_export
    from ..export.tiny_wan import build_tiny_wan

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_wan(Path(tmp) / "model", "tiny-a")
        run_export(ExportConfig(model=str(model), out=out, frames=5, height=32, width=48, max_sequence_length=512,
                                precision="fp32", backend="ort", onnx_only=False, overwrite=True))


# -- on the GPU machine --------------------------------------------------------------------------------------------
def receive(prep: Path, home: Path) -> list[str]:
    """Move every part this call carried into `home`/parts (checked against parts.json when joined)."""
    dest = home / "parts"
    dest.mkdir(parents=True, exist_ok=True)
    got = []
    for p in sorted(prep.glob("p*/*.part*")):
        shutil.copy2(p, dest / p.name)
        got.append(p.name)
    small = prep / "small"
    if small.is_dir():
        shutil.copytree(small, home / "small", dirs_exist_ok=True)
    return got


def _join(home: Path) -> Path:
    manifest = json.loads((home / "small" / "parts.json").read_text())
    wheel = home / manifest["wheel"]
    with open(wheel, "wb") as out:
        for part in manifest["parts"]:
            path = home / "parts" / Path(part["file"]).name
            if not path.is_file():
                raise RuntimeError(f"part {path.name} never arrived")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise RuntimeError(f"part {path.name} is damaged (sha256 differs)")
            out.write(data)
    if sha256_file(wheel) != manifest["sha256"]:
        raise RuntimeError(f"the joined {wheel.name} differs from the one prepared")
    return wheel


def stage_env(ctx: dict) -> dict:
    import torch

    from ..runtime import cuda_info

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": cuda_info.gpu(), "torch_sees_gpu": torch.cuda.is_available(),
            "device_memory_used_mb": (cuda_info.device_memory_used() or 0) / 2**20,
            "installed_wheels_on_path": str(ctx["home"] / "site") in sys.path, "passed": True}


def stage_install(ctx: dict) -> dict:
    """Join the wheel parts, check every checksum, and install the wheels into home/site (first on sys.path for the
    later stages); in a dry run, only the checks."""
    home, dry = ctx["home"], ctx["dry_run"]
    wheel = _join(home)
    site = home / "site"
    wheels = [str(wheel)] if not dry else []
    wheels += [str(w) for w in (home / "small" / "wheels").glob("*.whl")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], check=True)
    return {"wheel": wheel.name, "sha256_checked": True, "installed": [Path(w).name for w in wheels],
            "passed": True}


def _providers(ctx) -> list:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if not ctx["dry_run"] else ["CPUExecutionProvider"]


def stage_ort(ctx: dict) -> dict:
    """The CUDA provider loads (preload_dlls, the session's first provider asserted) and matches the CPU provider
    on one DiT call; a CUDA graph replays and updates its outputs for new inputs."""
    import onnxruntime as ort

    from ..runtime.backends.ort import OrtEngine
    from ..runtime.backends.ort_io import OrtIoEngine
    from ..runtime.manifest import load_manifest

    m = load_manifest(ctx["home"] / "small" / "engines")
    path, spec = m.engine_path("transformer"), m.spec("transformer")
    device = "cpu" if ctx["dry_run"] else "cuda"
    cpu = OrtEngine(path, spec)
    gpu = OrtEngine(path, spec, providers=_providers(ctx))  # raises unless the first provider is the one running
    plain = OrtIoEngine(path, spec, device)
    graph = OrtIoEngine(path, spec, device, cuda_graph=True)
    errs, graph_errs = [], []
    for seed in range(3):  # a graph replayed with new inputs must give new outputs
        feeds = spec.sample_inputs(seed=seed, b=2, f=2, h=4, w=6)
        ref = cpu(**feeds)
        errs.append(float(np.abs(gpu(**feeds) - ref).max() / np.abs(ref).max()))
        graph_errs.append(float(np.abs(graph(**feeds) - plain(**feeds)).max() / np.abs(ref).max()))
    return {"onnxruntime": ort.__version__, "onnxruntime_from": str(Path(ort.__file__).parent),
            "available": ort.get_available_providers(),
            "session_providers": gpu.session.get_providers(), "max_rel_vs_cpu": max(errs),
            "graph_vs_plain_max_rel": max(graph_errs),
            "passed": max(errs) <= BOUNDS["ort_vs_cpu_max_rel"] and max(graph_errs) <= BOUNDS["graph_vs_plain_max_rel"]}


def stage_pipeline(ctx: dict) -> dict:
    """The tiny pipeline built for ORT-CUDA by the product's own target step (timings with and without graphs),
    then generations at two shapes, twice each, graphs off and on, against the CPU engines (PSNR)."""
    from ..precision.quality_gate import psnr
    from ..runtime.manifest import load_manifest
    from ..runtime.pipeline import Pipeline
    from ..target.build import TargetConfig, build_from_engines

    src = ctx["home"] / "small" / "engines"
    backend = "ort" if ctx["dry_run"] else "ort-cuda"
    built = ctx["home"] / f"engines-{backend}"
    report = build_from_engines(TargetConfig(source=src, out=built, backend=backend, overwrite=True), log=_log)
    cases = [(height, width, seed) for height, width in ((32, 48), (48, 32)) for seed in (0, 1)]
    cpu = Pipeline.load(src, backend="ort")
    refs = {c: cpu("a red fox", height=c[0], width=c[1], frames=5, steps=3, seed=c[2]).frames for c in cases}
    rows = []
    for graph in (False, True):
        pipe = Pipeline.load(built, cuda_graph=graph)
        for height, width, seed in cases:  # two shapes, each generated twice in one pipeline
            got = pipe("a red fox", height=height, width=width, frames=5, steps=3, seed=seed)
            rows.append({"cuda_graph": graph, "size": [height, width], "seed": seed,
                         "psnr_db": psnr(got.frames, refs[height, width, seed]),
                         "denoise_s": got.timings.get("denoise"), "device_mb": got.device_memory_mb})
    worst = min(r["psnr_db"] for r in rows)
    return {"backend": backend, "build_seconds": report.seconds, "timings": load_manifest(built).runtime.get(
        "timings"), "generations": rows, "worst_psnr_db": worst, "passed": worst >= BOUNDS["pipeline_psnr_db"]}


def _attention_inputs(torch, b, length, h, d, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(b, length, h, d, generator=g).to(device, torch.float16) for _ in range(3)]  # [B, L, H, D]


def _cosine(a, b) -> float:
    """precision/quality_gate.cosine for torch tensors where they are (32K-token attention outputs stay on the GPU)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()))


def stage_kernels(ctx: dict) -> dict:
    """Triton's fp16 flash attention against torch SDPA (fp16, and fp32 as the reference) at Wan shapes: cosine
    and TFLOP/s (triton.testing.do_bench; 4 B H L S D FLOPs per call)."""
    import torch
    import triton
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from ..fused_attention.flash_attention import flash_attention

    device = "cpu" if ctx["dry_run"] else "cuda"
    shapes = [(2, 128, 2, 64)] if ctx["dry_run"] else [(2, 4096, 12, 128), (2, 32768, 12, 128)]
    rows = []
    for b, length, h, d in shapes:
        q, k, v = (t.transpose(1, 2) for t in _attention_inputs(torch, b, length, h, d, device))  # [B, H, L, D]
        with torch.no_grad():
            ref = sdpa(q.float(), k.float(), v.float())
            ours = flash_attention(q, k, v)
            theirs = sdpa(q, k, v)
        row = {"shape": [b, h, length, d], "cosine_triton": _cosine(ours, ref),
               "cosine_sdpa_fp16": _cosine(theirs, ref)}
        if not ctx["dry_run"]:
            flops = 4 * b * h * length * length * d
            for name, fn in (("triton", lambda: flash_attention(q, k, v)), ("sdpa", lambda: sdpa(q, k, v))):
                ms = triton.testing.do_bench(fn)
                row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / (ms / 1e3) / 1e12
        rows.append(row)
    return {"rows": rows, "passed": all(r["cosine_triton"] >= BOUNDS["kernel_cosine"] for r in rows)}


def stage_plugin(ctx: dict) -> dict:
    """The TensorRT plugin's launch contract without TensorRT: the kernel compiled ahead of time to PTX for this
    GPU, loaded and launched through the CUDA driver exactly as the plugin's aot_impl describes it (grid, block,
    shared memory, then Q, K, V, L, S, H, O), against torch SDPA. A dry run compiles for sm_90 and checks the PTX
    entry's parameters only."""
    from ..fused_attention.trt_plugin import FLASH, SCALARS, compile_attention

    b, length, h, d = (2, 4096, 12, 128) if not ctx["dry_run"] else (1, 128, 2, 128)
    if ctx["dry_run"]:
        arch = (9, 0)
    else:
        import torch

        arch = torch.cuda.get_device_capability()
    c = compile_attention("fp16", d, 1, tuple(arch), FLASH)
    entry = c.ptx.decode().split(".entry", 1)[1].split(")", 1)[0]
    params = entry.count(".param")
    out = {"arch": list(arch), "kernel": c.name, "threads": c.threads, "shared_mem": c.shared_mem,
           "ptx_params": params}
    if params != 4 + len(SCALARS):
        return {**out, "passed": False, "error": f"the PTX entry takes {params} parameters, the plugin passes 7"}
    if ctx["dry_run"]:
        return {**out, "launched": False, "passed": True}
    import ctypes

    import torch
    from cuda.bindings import driver as cu
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    torch.cuda.init()
    q, k, v = _attention_inputs(torch, b, length, h, d, "cuda")
    o = torch.full_like(q, float("nan"))

    def ok(result):
        err, *rest = result
        if int(err) != 0:
            raise RuntimeError(f"CUDA driver error {err}")
        return rest[0] if rest else None

    module = ok(cu.cuModuleLoadData(c.ptx + b"\0"))
    fn = ok(cu.cuModuleGetFunction(module, c.name.encode()))
    if c.shared_mem > 48 * 1024:
        ok(cu.cuFuncSetAttribute(fn, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                 c.shared_mem))
    grid = c.grid(b, length, h)
    args = ((q.data_ptr(), k.data_ptr(), v.data_ptr(), length, length, h, o.data_ptr()),
            (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
             ctypes.c_void_p))
    stream = torch.cuda.current_stream().cuda_stream
    ok(cu.cuLaunchKernel(fn, grid[0], grid[1], 1, c.threads, 1, 1, c.shared_mem, stream, args, 0))
    torch.cuda.synchronize()
    ref = sdpa(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    cos = _cosine(o, ref)
    return {**out, "launched": True, "nan_left": bool(torch.isnan(o).any()), "cosine": cos,
            "passed": cos >= BOUNDS["kernel_cosine"] and not torch.isnan(o).any()}


def _dit_case(ctx: dict):
    from .harness import SCENARIOS

    scenario = "tiny" if ctx["dry_run"] else "wan-1.3b-1280tok"
    return scenario, SCENARIOS[scenario]


def stage_dit_torch(ctx: dict) -> dict:
    """Wan2.1-1.3B's transformer configuration (30 layers, random weights, tiny_wan's seed) at 1,280 tokens, CFG
    batch 2: torch fp32 (TF32 off: the reference, saved for dit_ort) and eager bf16 as diffusers loads it (its fp32
    modules kept), SDPA, timed with CUDA events; and the ONNX export with its fp16 conversion, left in home for
    dit_ort."""
    import torch

    from diffusers import WanTransformer3DModel

    from ..precision.convert import FP16_ISLANDS
    from ..precision.quality_gate import cosine
    from ..precision.fp16 import convert_fp16
    from .harness import build_scenario_model, export_scenario_dit

    scenario, sc = _dit_case(ctx)
    feeds = sc.dit_inputs()
    work = ctx["home"] / "dit"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    device = "cpu" if ctx["dry_run"] else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    model = build_scenario_model(sc, work)
    spec = export_scenario_dit(sc, work)
    convert_fp16(work / "dit.onnx", work / "dit_fp16.onnx", *FP16_ISLANDS["transformer"])
    export_s = time.perf_counter() - t0
    args = [torch.from_numpy(feeds[n]).to(device) for n in ("hidden_states", "timestep", "encoder_hidden_states")]
    with torch.inference_mode():
        ref = model.to(device)(*args, return_dict=False)[0].float().cpu().numpy()
    del model
    # bf16 as diffusers loads it: torch_dtype=bfloat16 keeps the modules it lists in fp32; the timestep stays fp32
    model = WanTransformer3DModel.from_pretrained(work / "transformer", torch_dtype=torch.bfloat16).eval().to(device)
    args = [a.to(torch.bfloat16) if a.dim() > 1 else a for a in args]

    def bf16():
        with torch.inference_mode():
            return model(*args, return_dict=False)[0]

    out = bf16().float().cpu()
    times = _cuda_times(torch, bf16, 10) if not ctx["dry_run"] else []
    np.save(work / "ref_fp32.npy", ref)
    (work / "spec.json").write_text(json.dumps(spec.to_dict()))
    cos = cosine(out.numpy(), ref)
    return {"scenario": scenario, "tokens": sc.tokens, "export_s": export_s,
            "torch_bf16_ms": float(np.median(times)) * 1e3 if times else None, "cosine_torch_bf16": cos,
            "passed": cos >= BOUNDS["dit_cosine"]}


def _cuda_times(torch, fn, repeats: int) -> list[float]:
    """Seconds per call by CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def stage_dit_ort(ctx: dict) -> dict:
    """The same DiT call on ONNX Runtime CUDA fp16 (IO binding; inputs read-only, so they are uploaded once as the
    sampler's embeddings are), with and without a CUDA graph, against dit_torch's fp32 output. ONNX Runtime's call
    synchronizes, so it is timed by the wall clock around it (its output download, 0.7 MB, included)."""
    from ..precision.quality_gate import cosine
    from ..runtime.backends.ort_io import OrtIoEngine
    from ..runtime.spec import EngineSpec

    scenario, sc = _dit_case(ctx)
    feeds = sc.dit_inputs()
    work = ctx["home"] / "dit"
    ref = np.load(work / "ref_fp32.npy")
    spec = EngineSpec.from_dict(json.loads((work / "spec.json").read_text()))
    for a in feeds.values():
        a.flags.writeable = False
    rows = {}
    for graph in (False, True):
        engine = OrtIoEngine(work / "dit_fp16.onnx", spec, "cpu" if ctx["dry_run"] else "cuda", cuda_graph=graph)
        for _ in range(3):
            out = engine(**feeds)
        times = []
        for _ in range(10 if not ctx["dry_run"] else 2):
            t0 = time.perf_counter()
            engine(**feeds)
            times.append(time.perf_counter() - t0)
        rows[f"ort-cuda-fp16{'-graph' if graph else ''}"] = {
            "ms": float(np.median(times)) * 1e3, "uploads": engine.uploads,
            "cosine_vs_torch_fp32": cosine(out, ref)}
    return {"scenario": scenario, "rows": rows,
            "passed": all(r["cosine_vs_torch_fp32"] >= BOUNDS["dit_cosine"] for r in rows.values())}


def run_stage(name: str, ctx: dict) -> dict:
    t0 = time.perf_counter()
    try:
        result = globals()[f"stage_{name}"](ctx)
    except Exception as e:  # a stage's failure is a result, recorded in one line
        result = {"passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    result["seconds"] = time.perf_counter() - t0
    return result


def run_stages(stages: list[tuple[str, int]], out: Path, home: Path, dry_run: bool) -> dict:
    """Each stage in a process of its own under its timeout; results in out/<stage>.json and home/results."""
    out.mkdir(parents=True, exist_ok=True)
    (home / "results").mkdir(parents=True, exist_ok=True)
    results = {}
    for name, timeout in stages:
        _log(f"stage {name} (timeout {timeout} s) ...")
        env = _stage_env(home, dry_run)  # per stage: the install stage creates home/site for the ones after it
        cmd = [sys.executable, "-m", "soraedge.bench.gpu_verify", "stage", name, "--home", str(home),
               "--out", str(out)] + (["--dry-run"] if dry_run else [])
        if dry_run and name == "kernels":
            env["TRITON_INTERPRET"] = "1"
        try:
            subprocess.run(cmd, env=env, timeout=timeout, check=False)
            results[name] = json.loads((out / f"{name}.json").read_text())
        except subprocess.TimeoutExpired:
            results[name] = {"passed": False, "error": f"timed out after {timeout} s"}
        except (OSError, ValueError) as e:
            results[name] = {"passed": False, "error": f"no result ({e})"}
        (home / "results" / f"{name}.json").write_text(json.dumps(results[name], indent=2, default=str))
        _log(f"  {name}: {'passed' if results[name].get('passed') else 'FAILED'} "
             f"{results[name].get('error', '')}")
    return results


def _stage_env(home: Path, dry_run: bool) -> dict:
    """The environment of one stage's process: the installed wheels (home/site) first on the path, once there."""
    env = dict(os.environ)
    site = home / "site"
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    if dry_run:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def summarize(out: Path, home: Path, dry_run: bool) -> dict:
    """Every stage's result so far (this call's and earlier calls'), as gpu_verify.json and .md."""
    results = {}
    for name in STAGES:
        f = home / "results" / f"{name}.json"
        if f.is_file():
            results[name] = json.loads(f.read_text())
    summary = {"dry_run": dry_run, "bounds": BOUNDS, "stages": results,
               "passed": bool(results) and all(r.get("passed") for r in results.values())}
    (out / "gpu_verify.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [f"### GPU verification{' (dry run on the CPU)' if dry_run else ''}", "",
             "| stage | result | seconds | detail |", "|---|---|---|---|"]
    for name, r in results.items():
        detail = r.get("error") or ", ".join(f"{k}={v}" for k, v in r.items()
                                             if isinstance(v, (int, float, str)) and k not in ("passed", "seconds"))
        lines.append(f"| {name} | {'pass' if r.get('passed') else 'FAIL'} | {r.get('seconds', 0):.1f} | "
                     f"{detail[:160]} |")
    (out / "gpu_verify.md").write_text("\n".join(lines) + "\n")
    return summary


@click.group()
def main():
    """The prepared GPU verification (see the module docstring and bench/README.md)."""


@main.command("prepare")
@click.option("--prep", type=click.Path(path_type=Path), default=PREP, show_default=True)
@click.option("--part-mib", type=click.IntRange(8, 60), default=52, show_default=True,
              help="Largest wheel part: a call carries one, with the working tree, under 64 MiB.")
def prepare_cmd(prep, part_mib):
    m = prepare(prep, part_mib)
    click.echo(f"{m['wheel']}: {len(m['parts'])} parts, sha256 {m['sha256'][:16]}...; small: {', '.join(m['small'])}")


@main.command("call")
@click.argument("number", type=int)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--prep", type=click.Path(path_type=Path), default=PREP, show_default=True)
def call_cmd(number, out, prep):
    """On the GPU machine: receive what this call carried, run its stages, summarize everything so far."""
    if number not in CALLS:
        raise click.BadParameter(f"calls are {sorted(CALLS)}")
    got = receive(prep, DEVICE_HOME)
    _log(f"call {number}: received {', '.join(got) or 'no parts'}")
    run_stages(CALLS[number], out, DEVICE_HOME, dry_run=False)
    summarize(out, DEVICE_HOME, dry_run=False)


@main.command("run")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--prep", type=click.Path(path_type=Path), default=PREP, show_default=True)
@click.option("--dry-run", is_flag=True, help="Every stage on the CPU, at small shapes.")
@click.option("--stages", default=",".join(STAGES), show_default=True)
def run_cmd(out, prep, dry_run, stages):
    """Every stage in one go (a GPU machine holding the whole .gpu/ folder, or --dry-run here)."""
    home = Path(tempfile.mkdtemp(prefix="soraedge-gpu-")) if dry_run else DEVICE_HOME
    receive(prep, home)
    timeouts = dict(s for c in CALLS.values() for s in c)
    chosen = [(s, timeouts[s] * (4 if dry_run else 1)) for s in stages.split(",")]
    run_stages(chosen, out, home, dry_run)
    summary = summarize(out, home, dry_run)
    click.echo((out / "gpu_verify.md").read_text())
    sys.exit(0 if summary["passed"] else 1)


@main.command("stage")
@click.argument("name", type=click.Choice(STAGES))
@click.option("--home", type=click.Path(path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--dry-run", is_flag=True)
def stage_cmd(name, home, out, dry_run):
    result = run_stage(name, {"home": home, "dry_run": dry_run})
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

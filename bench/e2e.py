"""sora-bench: end-to-end and per-stage latency of the engines against the PyTorch reference, in one run.

Same model, prompt, initial latents and thread count for every peer: diffusers' WanPipeline (eager; optionally
torch.compile'd transformer) and each engine directory on each available CPU backend/precision. Reports load and
warm-up apart from steady state, median and p95 over repeats, peak RSS per run (sampled, runtime/memory.py), PSNR of
the frames against the reference, the DiT call's FLOPs, achieved GFLOP/s against this machine's measured MatMul
peak, and DiT latency against token count with the fitted exponent. Results: JSON, Markdown and a PNG plot.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.choices import AUTO, Backend, Target
from ..runtime.errors import SoraError
from .flops import wan_dit_flops
from .matmul_peak import best_peak, matmul_peak
from ..runtime.machine import machine
from ..runtime.memory import PeakRss
from .harness import save, shape_name, time_calls, versions

PEERS = ("ort-fp32", "openvino-fp32", "openvino-bf16", "ort-cuda-fp32")


@dataclass(frozen=True)
class BenchConfig:
    model: str  # diffusers Wan directory or "demo": the PyTorch reference (and the export source)
    engines: tuple[Path, ...] = ()  # engine directories to time; empty: export the model into a temp dir
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    prompt: str = "a red fox runs along the beach at sunset"
    negative_prompt: str | None = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    repeats: int = 3
    peers: tuple[str, ...] = PEERS
    scaling: bool = True
    compile: bool = False
    reference_device: str = "cpu"  # where the PyTorch reference runs: "cpu" or "cuda" (next to the ort-cuda peer)


def _summary(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "n": len(values)}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from ..precision.quality_gate import psnr

    return psnr(a, b)


def _available_peers(peers) -> list[Target]:
    """The peers this machine runs: the CPU targets a build here would time (target/choose.py's candidates), and
    the GPU ones where a usable GPU is present."""
    from ..runtime import gpu_target
    from ..target.choose import check_request

    cpu = check_request(AUTO, AUTO)
    targets = [Target.of(*p.rsplit("-", 1)) for p in peers]
    return [t for t in targets if (not gpu_target.missing(gpu_target.target()) if t.backend.gpu else t in cpu)]


def _built_for(engine_dir: Path, backend: str, tmp: Path) -> Path:
    """`engine_dir`, or for a GPU backend a build of it for this GPU (the two-step path's second step) in tmp."""
    from ..target.build import TargetConfig, build_from_engines
    from ..runtime.manifest import load_manifest

    gpu = load_manifest(engine_dir, verify=False).data.get("gpu")
    if not Backend(backend).gpu or (gpu or {}).get("backend") == backend:
        return engine_dir
    out = tmp / f"{engine_dir.name}-{backend}"
    build_from_engines(TargetConfig(engine_dir, out, backend))  # reused when already built in this run
    return out


def _scaling_sizes(spec, patch) -> list[dict[str, int]]:
    f = spec.dim_map["f"].opt
    hmax, wmax = spec.dim_map["h"].max, spec.dim_map["w"].max
    sizes = []
    for k in (4, 8, 16, 24):
        h, w = min(k * patch[1], hmax), min(k * patch[2], wmax)
        if not sizes or (h, w) != (sizes[-1]["h"], sizes[-1]["w"]):
            sizes.append({"f": f, "h": h, "w": w})
    return sizes


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None, tick=lambda: None) -> dict:
    import torch
    from diffusers import WanPipeline

    from ..export.build import ExportConfig, run_export
    from ..export.checkpoint import read_checkpoint
    from ..demo.pipeline_dir import build_demo_pipeline
    from ..runtime.manifest import load_manifest
    from ..runtime.pipeline import Pipeline
    from .reference import run_reference

    if cfg.repeats < 1:
        raise SoraError(f"repeats={cfg.repeats}: need at least 1")
    for p in cfg.peers:
        if p not in PEERS:
            raise SoraError(f"unknown peer {p!r} (known: {', '.join(PEERS)})")
    for e in cfg.engines:
        load_manifest(e)  # a missing or damaged engine directory fails here, before any work
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="sora-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = build_demo_pipeline(tmp / "demo") if cfg.model == "demo" else read_checkpoint(cfg.model).root
        engines = list(cfg.engines)
        export_s = None
        if not engines:
            log("exporting the model for the engines under test ...")
            t0 = time.perf_counter()
            run_export(ExportConfig(model=cfg.model, out=tmp / "engines", backend="ort", check_parity=False,
                                    frames=cfg.frames, height=cfg.height, width=cfg.width))
            export_s = time.perf_counter() - t0
            engines = [tmp / "engines"]

        # Resolve the shape once, against the first engine directory; every other must cover it too.
        probe = Pipeline.load(engines[0], backend="ort")
        h, w, f, steps, g, negative, _ = probe.resolve(cfg.height, cfg.width, cfg.frames, cfg.steps, cfg.guidance,
                                                       cfg.negative_prompt)
        for e in engines[1:]:
            Pipeline.load(e, backend="ort").resolve(h, w, f, steps, g, negative)
        latents = np.random.default_rng(0).standard_normal(probe.latent_shape(h, w, f), dtype=np.float32)
        text_len = probe.config["max_sequence_length"]
        patch = probe.config["patch_size"]
        tokens = latents.shape[2] * latents.shape[3] * latents.shape[4] // (patch[1] * patch[2])
        batch = 2 if g > 1.0 else 1

        rows = []
        log("PyTorch reference (diffusers WanPipeline, eager) ...")
        t0 = time.perf_counter()
        ref_pipe = WanPipeline.from_pretrained(model_dir).to(cfg.reference_device)
        ref_pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0
        variants = [("pytorch-eager", ref_pipe)]
        if cfg.compile:
            variants.append(("pytorch-compile", None))
        ref_frames = None
        for name, _ in variants:
            if name == "pytorch-compile":
                ref_pipe.transformer = torch.compile(ref_pipe.transformer)
            t0 = time.perf_counter()
            run_reference(ref_pipe, cfg.prompt, negative, h, w, f, 1, g, latents)
            warm = time.perf_counter() - t0
            runs = []
            for _ in range(cfg.repeats):
                with PeakRss() as mem:
                    frames, stages, steps_s = run_reference(ref_pipe, cfg.prompt, negative, h, w, f, steps, g,
                                                            latents)
                runs.append((stages, steps_s, mem.peak))
                tick()
            if ref_frames is None:
                ref_frames = frames
            rows.append(_row(name, "fp32", None, load_s, warm, runs, _psnr(frames, ref_frames)))

        for engine_dir in engines:
            for backend, precision in _available_peers(cfg.peers):
                log(f"{engine_dir.name}: {backend} {precision} ...")
                t0 = time.perf_counter()
                pipe = Pipeline.load(_built_for(engine_dir, backend, tmp), threads=cfg.threads, backend=backend,
                                     precision=precision).open_all()
                load_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                pipe(cfg.prompt, negative, h, w, f, 1, g, latents=latents)
                warm = time.perf_counter() - t0
                runs = []
                for _ in range(cfg.repeats):
                    with PeakRss() as mem:
                        t0 = time.perf_counter()
                        res = pipe(cfg.prompt, negative, h, w, f, steps, g, latents=latents)
                        total = time.perf_counter() - t0
                    runs.append(({**res.timings, "total": total}, res.step_times, mem.peak))
                    tick()
                rows.append(_row(f"{backend}", precision, str(engine_dir) if cfg.engines else "exported here",
                                 load_s, warm, runs, _psnr(res.frames, ref_frames)))

        tcfg = dict(ref_pipe.transformer.config) if not cfg.compile else dict(ref_pipe.transformer._orig_mod.config)
        flops = wan_dit_flops(tcfg, batch, tokens, text_len)
        log("MatMul peak ...")
        peak = matmul_peak(cfg.threads)
        best_fp32 = best_peak(peak, "fp32")
        ref_total = rows[0]["stages"]["total"]["median"]
        for row in rows:
            row["dit_gflops"] = flops["total"] / row["stages"]["step"]["median"] / 1e9
            row["fraction_of_fp32_peak"] = row["dit_gflops"] / best_fp32
            row["speedup_vs_pytorch"] = ref_total / row["stages"]["total"]["median"]

        scaling = _scaling(cfg, ref_pipe, engines[0], batch, text_len, log, tick, tmp) if cfg.scaling else None

    return {"machine": machine(), "threads": cfg.threads, "versions": versions(), "model": cfg.model,
            "shape": {"height": h, "width": w, "frames": f, "steps": steps, "guidance": g, "batch": batch,
                      "latents": list(latents.shape), "tokens": tokens, "text_len": text_len},
            "prompt": cfg.prompt, "negative_prompt": negative, "repeats": cfg.repeats, "export_s": export_s,
            "flops_per_dit_call": flops, "matmul_peak_gflops": peak, "rows": rows, "scaling": scaling}


def _row(name, precision, engines, load_s, warm, runs, psnr) -> dict:
    stages = {k: _summary([r[0][k] for r in runs]) for k in ("encode", "denoise", "decode", "total")}
    stages["step"] = _summary([s for r in runs for s in r[1]])
    peaks = [r[2] for r in runs if r[2] is not None]
    return {"name": name, "precision": precision, "engines": engines, "load_s": load_s, "warmup_s": warm,
            "stages": stages, "peak_rss_mb": max(peaks) / 2**20 if peaks else None, "psnr_db": psnr}


def _scaling(cfg, ref_pipe, engine_dir, batch, text_len, log, tick, tmp) -> dict:
    """DiT call latency against tokens for PyTorch and each backend; exponent of a log-log fit."""
    import torch

    from ..runtime.pipeline import Pipeline
    from .reference import sync

    log("scaling ...")
    probe = Pipeline.load(engine_dir, backend="ort")
    spec = probe.dit().engine.spec
    patch = probe.config["patch_size"]
    sizes = _scaling_sizes(spec, patch)
    text_dim = spec.inputs[2].shape[2]
    points = []
    runners = {"pytorch-eager-fp32": None}
    for backend, precision in _available_peers(cfg.peers):
        runners[f"{backend}-{precision}"] = Pipeline.load(_built_for(engine_dir, backend, tmp), threads=cfg.threads,
                                                          backend=backend, precision=precision).dit()
    for s in sizes:
        feeds = spec.sample_inputs(seed=0, b=batch, **s)
        tokens = s["f"] * s["h"] * s["w"] // (patch[1] * patch[2])
        assert feeds["encoder_hidden_states"].shape == (batch, text_len, text_dim)
        for name, den in runners.items():
            if den is None:
                args = [torch.from_numpy(feeds[k]).to(cfg.reference_device)
                        for k in ("hidden_states", "timestep", "encoder_hidden_states")]

                def call():
                    with torch.inference_mode():
                        ref_pipe.transformer(*args, return_dict=False)
                    sync()
            else:
                def call(den=den):
                    den(feeds["hidden_states"], feeds["timestep"], feeds["encoder_hidden_states"])
            stats, _ = time_calls(call, max(cfg.repeats, 2))
            points.append({"peer": name, "tokens": tokens, "sizes": s, "seconds": stats["median_s"]})
        tick()
    exponents = {}
    for name in runners:
        xs = [p["tokens"] for p in points if p["peer"] == name]
        ys = [p["seconds"] for p in points if p["peer"] == name]
        if len(xs) >= 2:
            exponents[name] = float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
    return {"batch": batch, "points": points, "exponents": exponents}


def to_markdown(r: dict) -> str:
    s, m = r["shape"], r["machine"]
    lines = [f"## sora-bench: {r['model']}", "",
             f"{m['cpu']} ({m['cores']} cores), {r['threads']} threads; {s['frames']} frames {s['width']}x{s['height']}"
             f", {s['steps']} steps, guidance {s['guidance']} (DiT batch {s['batch']}), {s['tokens']} tokens, "
             f"{s['text_len']} text tokens; {r['repeats']} repeats; "
             f"DiT call {r['flops_per_dit_call']['total'] / 1e9:.2f} GFLOP; MatMul peak "
             + ", ".join(f"{k} {v:.0f}" for k, v in r["matmul_peak_gflops"].items()) + " GFLOP/s", "",
             "| peer | precision | load s | warm-up s | encode s | DiT step s (p95) | decode s | total s (p95) | "
             "vs PyTorch | DiT GFLOP/s | of fp32 peak | peak RSS MB | PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        st = row["stages"]
        rss = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] else "n/a"
        psnr = "inf (reference)" if row["psnr_db"] == float("inf") else f"{row['psnr_db']:.1f}"
        lines.append(
            f"| {row['name']} | {row['precision']} | {row['load_s']:.2f} | {row['warmup_s']:.2f} | "
            f"{st['encode']['median']:.3f} | {st['step']['median']:.4f} ({st['step']['p95']:.4f}) | "
            f"{st['decode']['median']:.3f} | {st['total']['median']:.3f} ({st['total']['p95']:.3f}) | "
            f"{row['speedup_vs_pytorch']:.2f}x | {row['dit_gflops']:.1f} | {row['fraction_of_fp32_peak']:.0%} | "
            f"{rss} | {psnr} |")
    if r.get("scaling"):
        lines += ["", "DiT call latency vs tokens (fitted exponent): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["scaling"]["exponents"].items())]
    return "\n".join(lines) + "\n"


def write_results(r: dict, out: Path) -> Path:
    """Save the result in `out` (bench/harness.py names it by scenario, machine and date), with a PNG of the
    latency-vs-tokens curves where there are some and matplotlib is installed; returns the JSON's path."""
    s = r["shape"]
    return save("e2e", shape_name(r["model"], s["frames"], s["height"], s["width"]), r, to_markdown(r), out,
                figure=_plot(r) if r.get("scaling") else None)


def _plot(r: dict):
    try:
        import matplotlib
    except ImportError:
        return None

    def write(path: Path) -> None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, k in r["scaling"]["exponents"].items():
            pts = [p for p in r["scaling"]["points"] if p["peer"] == name]
            ax.loglog([p["tokens"] for p in pts], [p["seconds"] for p in pts], "o-", label=f"{name} (k={k:.2f})")
        ax.set_xlabel("video tokens")
        ax.set_ylabel(f"DiT call, batch {r['scaling']['batch']} (s)")
        ax.set_title(f"{r['machine']['cpu']}, {r['threads']} threads")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    return write

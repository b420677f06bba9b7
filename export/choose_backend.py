"""Pick the CPU backend by measurement at export, and gate reduced execution precision (bf16) on quality.

`choose_runtime` times one DiT step (CFG batch of 2 at the engine's tuning shape, capped near 2K tokens) on each
available backend at fp32 and records the timings, the CPU and the winner in the manifest's `runtime` section.
With `precision="bf16"` it runs the quality gate: the same prompts and initial latents through the fp32 ONNX
Runtime engines and the bf16 ones, final-frame PSNR must reach `min_psnr` (and be finite), else SoraError and the
export writes nothing.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.backends import openvino as ov_backend
from ..runtime.errors import SoraError
from ..runtime.pipeline import Pipeline

GATE_PROMPTS = ("a red fox runs along the beach at sunset", "a small boat drifts on a calm lake at night")
GATE_STEPS = 4
MAX_TIMING_TOKENS = 2048


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of frames in [0, 1]; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _timing_sizes(spec, patch) -> dict[str, int]:
    sizes = spec.sizes("opt")
    while sizes["f"] * sizes["h"] * sizes["w"] // (patch[1] * patch[2]) > MAX_TIMING_TOKENS:
        if sizes["f"] > 1:
            sizes["f"] = (sizes["f"] + 1) // 2
        else:
            sizes["h"] = max(patch[1], sizes["h"] // 2 // patch[1] * patch[1])
            sizes["w"] = max(patch[2], sizes["w"] // 2 // patch[2] * patch[2])
    return sizes


def time_dit_step(engine_dir: Path, backend: str, precision: str, threads: int | None, repeats: int = 3) -> dict:
    """Median seconds of one DiT call (CFG batch of 2) after one warm-up, plus the load time."""
    t0 = time.perf_counter()
    pipe = Pipeline.load(engine_dir, threads=threads, verify=False, backend=backend, precision=precision)
    denoiser = pipe.denoiser  # opens (and on OpenVINO compiles) the DiT engine
    load_s = time.perf_counter() - t0
    spec = denoiser.engine.spec
    sizes = _timing_sizes(spec, pipe.config["patch_size"])
    feeds = spec.sample_inputs(seed=0, **sizes)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        denoiser(feeds["hidden_states"], feeds["timestep"], feeds["encoder_hidden_states"])
        if i:
            times.append(time.perf_counter() - t0)
    tokens = sizes["f"] * sizes["h"] * sizes["w"] // (pipe.config["patch_size"][1] * pipe.config["patch_size"][2])
    return {"step_s": float(np.median(times)), "load_s": load_s, "sizes": sizes, "tokens": tokens}


def _gate_size(pipe) -> tuple[int, int]:
    """The default height/width, halved until the latent is at most MAX_TIMING_TOKENS: small shapes flatter
    reduced precision (measured on the demo: bf16 gave 44 dB at 64x64 and 23 dB at 320x192)."""
    mult = pipe.config["vae_scale_spatial"] * max(pipe.config["patch_size"][1:])
    h, w = pipe.defaults["height"], pipe.defaults["width"]
    shape = pipe.latent_shape(h, w, pipe.defaults["frames"])
    patch = pipe.config["patch_size"]
    while shape[2] * shape[3] * shape[4] // (patch[1] * patch[2]) > MAX_TIMING_TOKENS and max(h, w) > mult:
        h, w = max(mult, h // 2 // mult * mult), max(mult, w // 2 // mult * mult)
        shape = pipe.latent_shape(h, w, pipe.defaults["frames"])
    return h, w


def quality_gate(engine_dir: Path, backend: str, precision: str, min_psnr: float, threads: int | None) -> dict:
    """Final-frame PSNR of (backend, precision) against fp32 ONNX Runtime, same prompts and latents."""
    ref = Pipeline.load(engine_dir, threads=threads, verify=False, backend="ort", precision="fp32")
    cand = Pipeline.load(engine_dir, threads=threads, verify=False, backend=backend, precision=precision)
    h, w = _gate_size(ref)
    frames = ref.defaults["frames"]
    scores = []
    for i, prompt in enumerate(GATE_PROMPTS):
        noise = np.random.default_rng(i).standard_normal(ref.latent_shape(h, w, frames), dtype=np.float32)
        a = ref(prompt, height=h, width=w, frames=frames, steps=GATE_STEPS, latents=noise).frames
        b = cand(prompt, height=h, width=w, frames=frames, steps=GATE_STEPS, latents=noise).frames
        scores.append(psnr(b, a) if np.isfinite(b).all() else float("nan"))
    worst = min(scores) if all(np.isfinite(s) or s == float("inf") for s in scores) else float("nan")
    result = {"backend": backend, "precision": precision, "prompts": list(GATE_PROMPTS), "height": h, "width": w,
              "frames": frames, "steps": GATE_STEPS, "psnr_db": scores, "min_psnr_db": min_psnr}
    if not worst >= min_psnr:  # also catches NaN
        raise SoraError(f"{precision} on {backend} fails the quality gate: PSNR {worst:.1f} dB against fp32 "
                        f"(threshold {min_psnr} dB); nothing was written. Use --precision fp32 or lower --min-psnr")
    return result


def choose_runtime(engine_dir: Path, backend: str, precision: str, min_psnr: float, threads: int | None,
                   log: Callable[[str], None]) -> dict:
    """Measure, gate and decide; returns the manifest's `runtime` section."""
    if precision == "bf16" and backend == "ort":
        raise SoraError("bf16 runs on OpenVINO here; ONNX Runtime engines are fp32: drop --backend ort or use fp32")
    candidates = [("ort", "fp32")]
    if ov_backend.available():
        candidates.append(("openvino", "fp32"))
        if precision == "bf16":
            candidates.append(("openvino", "bf16"))
    elif backend == "openvino" or precision == "bf16":
        raise SoraError("--backend openvino / --precision bf16 need OpenVINO: pip install 'soraedge[openvino]'")
    timings = {}
    for b, p in candidates:
        timings[f"{b}-{p}"] = time_dit_step(engine_dir, b, p, threads)
        log(f"  DiT step on {b} {p}: {timings[f'{b}-{p}']['step_s'] * 1000:.0f} ms "
            f"({timings[f'{b}-{p}']['tokens']} tokens, CFG batch 2)")
    runtime = {"timings": timings, "threads": threads, "machine": platform.machine(), "cpu": platform.processor()}
    if ov_backend.available():
        info = ov_backend.cpu_info()
        runtime["cpu"], runtime["openvino"] = info["cpu"], info["openvino"]
    if precision == "bf16":
        chosen = ("openvino", "bf16")
        runtime["quality_gate"] = quality_gate(engine_dir, *chosen, min_psnr, threads)
        log(f"  bf16 quality gate: PSNR {min(runtime['quality_gate']['psnr_db']):.1f} dB >= {min_psnr} dB")
    elif backend == "auto":
        chosen = min((c for c in candidates if c[1] == "fp32"), key=lambda c: timings[f"{c[0]}-{c[1]}"]["step_s"])
    else:
        chosen = (backend, "fp32")
    runtime["backend"], runtime["precision"] = chosen
    why = "passed the quality gate" if precision != "fp32" else "fastest measured" if backend == "auto" else "asked for"
    log(f"  runtime: {chosen[0]} {chosen[1]} ({why})")
    return runtime

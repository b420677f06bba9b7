"""The quality gate: reduced-precision engines are measured against the fp32 engines at build time, and refused.

Same prompts, same initial latents, same scheduler: the fp32 ONNX Runtime engines (the reference, themselves
checked against PyTorch at export) and the candidate engines each generate; the gate records
- the PSNR of the candidate's final frames against the reference's,
- the cosine similarity of the candidate DiT's output to the reference DiT's at every step, both fed the
  reference trajectory's inputs (so each step's error is seen on its own, not compounded),
- the cosine similarity of the candidate text encoder's embeddings to the reference's,
at a shape capped near 2K tokens and a few steps, so the gate takes seconds to minutes on 2 CPU cores. Below the
PSNR threshold, or with any NaN/Inf, the record does not pass, and `check_quality` raises SoraError: the export then
writes nothing (export/gated_choice.py decides when a failed gate refuses and when it falls back to fp32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.errors import SoraError
from ..runtime.pipeline import Pipeline

GATE_PROMPTS = ("a red fox runs along the beach at sunset", "a small boat drifts on a calm lake at night")
GATE_STEPS = 4
MAX_GATE_TOKENS = 2048
MIN_TEXT_COSINE = 0.99


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of frames in [0, 1]; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def gate_size(pipe: Pipeline) -> tuple[int, int]:
    """The default height/width, halved until the latent is at most MAX_GATE_TOKENS. Small shapes can flatter
    reduced precision: the random-weight demo of earlier sessions gave 44 dB in bf16 at 64x64 and 23 dB at 320x192;
    the trained demo loses 3 dB from 80 to 1280 tokens, and bench-384 nothing to 5120 (bench/gate_shape.py)."""
    mult = pipe.config["vae_scale_spatial"] * max(pipe.config["patch_size"][1:])
    h, w = pipe.defaults["height"], pipe.defaults["width"]
    patch = pipe.config["patch_size"]

    def tokens(h, w):
        shape = pipe.latent_shape(h, w, pipe.defaults["frames"])
        return shape[2] * shape[3] * shape[4] // (patch[1] * patch[2])

    while tokens(h, w) > MAX_GATE_TOKENS and max(h, w) > mult:
        h, w = max(mult, h // 2 // mult * mult), max(mult, w // 2 // mult * mult)
    return h, w


def measure_quality(reference: Path, candidate: Path, backend: str, precision: str, min_psnr: float,
                    threads: int | None) -> dict:
    """Measure `candidate` engines on (backend, execution precision) against fp32 `reference` engines; the record's
    `passed` says whether they meet `min_psnr` and MIN_TEXT_COSINE (check_quality raises where they do not)."""
    ref = Pipeline.load(reference, threads=threads, verify=False, backend="ort", precision="fp32")
    cand = Pipeline.load(candidate, threads=threads, verify=False, backend=backend, precision=precision)
    h, w = gate_size(ref)
    frames = ref.defaults["frames"]
    psnrs, step_cosines = [], []
    for i, prompt in enumerate(GATE_PROMPTS):
        noise = np.random.default_rng(i).standard_normal(ref.latent_shape(h, w, frames), dtype=np.float32)
        trajectory = []
        a = ref(prompt, height=h, width=w, frames=frames, steps=GATE_STEPS, latents=noise,
                observe=lambda feeds, out: trajectory.append((feeds, out))).frames
        b = cand(prompt, height=h, width=w, frames=frames, steps=GATE_STEPS, latents=noise).frames
        psnrs.append(psnr(b, a) if np.isfinite(b).all() else float("nan"))
        dit = cand.denoiser
        step_cosines.append([cosine(dit(f["hidden_states"], f["timestep"], f["encoder_hidden_states"]), out)
                             for f, out in trajectory])
    text = [cosine(x, y) for x, y in zip(ref.encode(list(GATE_PROMPTS)), cand.encode(list(GATE_PROMPTS)))]
    worst = _worst(psnrs)
    return {"backend": backend, "execution_precision": precision, "prompts": list(GATE_PROMPTS), "height": h,
            "width": w, "frames": frames, "steps": GATE_STEPS, "psnr_db": psnrs, "min_psnr_db": min_psnr,
            "dit_step_cosine": step_cosines, "text_embedding_cosine": text, "min_text_cosine": MIN_TEXT_COSINE,
            "passed": bool(worst >= min_psnr and min(text) >= MIN_TEXT_COSINE)}  # NaN compares False


def _worst(psnrs: list[float]) -> float:
    """The lowest PSNR, or NaN where any is NaN (non-finite frames), which fails every threshold."""
    return min(psnrs) if all(not np.isnan(s) for s in psnrs) else float("nan")


def check_quality(result: dict, label: str = "") -> None:
    """Raise SoraError (one line) where a measure_quality record did not pass. `label` names what was gated (e.g.
    "int8 transformer")."""
    worst = _worst(result["psnr_db"])
    if not worst >= result["min_psnr_db"]:  # also catches NaN
        raise SoraError(f"{label or result['execution_precision']} on {result['backend']} fails the quality gate: "
                        f"PSNR {worst:.1f} dB against fp32 (threshold {result['min_psnr_db']} dB); nothing was "
                        f"written. Use a higher precision, another calibration, or lower --min-psnr")
    if not min(result["text_embedding_cosine"]) >= MIN_TEXT_COSINE:
        raise SoraError(f"the text encoder fails the quality gate: embedding cosine "
                        f"{min(result['text_embedding_cosine']):.4f} against fp32 (threshold {MIN_TEXT_COSINE}); "
                        f"nothing was written. Use int8 or fp32 for it")


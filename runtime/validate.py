"""Checks on every number a user hands in, shared by export and run so each rule and its message are written once.
Each is checked before any compute; 0 is an error, never "use the default". `latent_grid` is the latent size those
numbers give."""

from __future__ import annotations

import math

import numpy as np

from .errors import SoraError

MAX_STEPS = 1000  # sampler steps: the training schedule's 1000 timesteps; more only repeats them
MAX_GUIDANCE = 100.0  # classifier-free guidance scale; published recipes use 1-15
MAX_SEED = 2**64 - 1  # numpy's and torch's seed range


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
        raise SoraError(f"steps={steps}: need at least 1 step and at most {MAX_STEPS}, a whole number")


def check_guidance(guidance, name: str = "guidance") -> None:
    if not isinstance(guidance, (int, float, np.floating)) or not math.isfinite(guidance) \
            or not 0 <= guidance <= MAX_GUIDANCE:
        raise SoraError(f"{name}={guidance}: guidance must be >= 0 and <= {MAX_GUIDANCE:g}, a finite number (1 or "
                        f"less disables the negative prompt)")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise SoraError(f"seed={seed}: need a whole number from 0 to 2**64-1")


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SoraError(f"threads={threads}: need at least 1 (leave it out to use every core)")


def check_text(text: str, name: str = "prompt") -> None:
    if not isinstance(text, str):
        raise SoraError(f"{name} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SoraError(f"{name} is not valid UTF-8 text") from None


def check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise SoraError(f"{what} are not finite (NaN or inf): nothing was written")


def check_size(height: int, width: int, multiple: int) -> None:
    """Height and width must be positive multiples of `multiple` (VAE spatial factor x DiT patch)."""
    for name, v in (("height", height), ("width", width)):
        if v < multiple or v % multiple:
            lo = max(multiple, v // multiple * multiple)
            raise SoraError(f"{name}={v} is not a multiple of {multiple} (nearest valid: {lo} or {lo + multiple})")


def latent_grid(frames: int, height: int, width: int, scale_t: int, scale_s: int) -> tuple[int, int, int]:
    """(frames, height, width) of a causal video VAE's latent for a video of that size: the first frame alone, then
    one latent frame per `scale_t` frames; `scale_s` pixels a side per latent cell."""
    return (frames - 1) // scale_t + 1, height // scale_s, width // scale_s


def check_frames(frames: int, scale_t: int) -> None:
    """Pixel frame counts must be of the form scale_t*k+1 (the causal VAE keeps the first frame alone)."""
    if frames < 1 or (frames - 1) % scale_t:
        lo = (max(frames - 1, 0) // scale_t) * scale_t + 1
        raise SoraError(f"frames={frames} is not of the form {scale_t}k+1 (nearest valid: {lo} or {lo + scale_t})")

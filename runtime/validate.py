"""Checks on user-facing video sizes, shared by export and run so the rule and its message are written once."""

from __future__ import annotations

from .errors import SoraError


def check_size(height: int, width: int, multiple: int) -> None:
    """Height and width must be positive multiples of `multiple` (VAE spatial factor x DiT patch)."""
    for name, v in (("height", height), ("width", width)):
        if v < multiple or v % multiple:
            lo = max(multiple, v // multiple * multiple)
            raise SoraError(f"{name}={v} is not a multiple of {multiple} (nearest valid: {lo} or {lo + multiple})")


def check_frames(frames: int, scale_t: int) -> None:
    """Pixel frame counts must be of the form scale_t*k+1 (the causal VAE keeps the first frame alone)."""
    if frames < 1 or (frames - 1) % scale_t:
        lo = (max(frames - 1, 0) // scale_t) * scale_t + 1
        raise SoraError(f"frames={frames} is not of the form {scale_t}k+1 (nearest valid: {lo} or {lo + scale_t})")

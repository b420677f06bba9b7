"""Read a generated toy-world video back: which colour the object is and which way it moved.

The background is the median of the border pixels; the object is every pixel far enough from it. Colour: the
mean colour of the object's inner half (its brightest pixels against the background), nearest palette entry by
hue. Motion: the object's centroid path and its size over the clip;
a size change larger than the centroid's travel means growing/shrinking, otherwise the dominant direction.
Frames are uint8 [F, H, W, 3]. `score` turns verdicts over a prompt set into colour and motion accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .toy_world import COLOURS

OBJECT_DISTANCE = 80.0  # summed |RGB - background| above which a pixel belongs to the object
MIN_PIXELS = 6  # frames with fewer object pixels do not count for motion
STILL_PX = 4.0  # less travel and radius change than this over the clip reads as "static"


def _hue(rgb) -> float:
    """Hue angle in degrees of an RGB colour."""
    r, g, b = (float(c) for c in rgb)
    return float(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)


def nearest_hue(rgb) -> str:
    """The palette colour whose hue is nearest: robust to the darkening and desaturation a small VAE adds."""
    gaps = {name: abs((_hue(rgb) - _hue(c) + 180) % 360 - 180) for name, c in COLOURS.items()}
    return min(gaps, key=gaps.get)


@dataclass(frozen=True)
class Verdict:
    colour: str | None  # None: no object found
    motion: str | None
    travel_px: float = 0.0
    radius_change_px: float = 0.0


def read_video(frames: np.ndarray) -> Verdict:
    frames = np.asarray(frames, np.float32)  # [F, H, W, 3]
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    background = np.median(border.reshape(-1, 3), axis=0)
    distance = np.abs(frames - background).sum(-1)  # [F, H, W]
    masks = distance > OBJECT_DISTANCE
    if masks.sum() < MIN_PIXELS:
        return Verdict(None, None)
    core = masks & (distance >= np.median(distance[masks]))  # the object's inner half, not its blurred rim
    colour = nearest_hue(frames[core].mean(axis=0))

    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    t, cx, cy, radius = [], [], [], []
    for i, m in enumerate(masks):
        n = int(m.sum())
        if n >= MIN_PIXELS:
            t.append(i)
            cx.append(xs[m].mean())
            cy.append(ys[m].mean())
            radius.append(np.sqrt(n / np.pi))
    if len(t) < 2:
        return Verdict(colour, None)
    slope = lambda v: np.polyfit(t, v, 1)[0] * (frames.shape[0] - 1)  # noqa: E731 - change over the clip
    dx, dy, dr = slope(cx), slope(cy), slope(radius)
    travel = float(np.hypot(dx, dy))
    if travel < STILL_PX and abs(dr) < STILL_PX / 2:
        motion = "static"
    elif abs(dr) * 2 > travel:
        motion = "growing" if dr > 0 else "shrinking"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return Verdict(colour, motion, travel, float(dr))


def score(verdicts, scenes) -> dict:
    """Colour and motion accuracy of verdicts against the scenes they were generated for."""
    n = len(scenes)
    colour = sum(v.colour == s.colour for v, s in zip(verdicts, scenes)) / n
    motion = sum(v.motion == s.motion for v, s in zip(verdicts, scenes)) / n
    return {"n": n, "colour_accuracy": colour, "motion_accuracy": motion}

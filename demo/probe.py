"""Read a generated toy-world video back as a person would: the object's colour, its shape and how it moved.

The background is the median of the border pixels; the object is every pixel far enough from it.
- Colour: the mean colour of all the object's pixels, read as the nearest of the palette's hues and the hues
  halfway between neighbouring palette entries ("between red and yellow" is what a person calls orange: wrong for
  a yellow or a red prompt alike, not snapped to the nearer one), or "grey" where it has little saturation. The
  colour counts only if the object is one flat colour: at least FLAT_SHARE of its pixels read as that colour on
  their own, so a yellow centre in a red halo is not yellow.
- Shape: how much of its bounding box the object fills (area over box, both from the object's coverage so that
  anti-aliased edges count by their share), the median over the frames: nearest of a circle's pi/4, a square's 1
  and a triangle's 1/2. The shape counts only if the object's plain mask (its pixels counted whole, over their box)
  reads the same: a square core in a faint round fringe is a square to one reading and a circle to the other, and
  reads "unclear".
- Motion: the object's centroid path and its size over the clip; a size change larger than the centroid's travel
  means growing/shrinking, otherwise the dominant direction.
Frames are uint8 [F, H, W, 3]. `score` turns verdicts over a prompt set into colour, shape and motion accuracy and
the share with all three right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .toy_world import COLOURS

OBJECT_DISTANCE = 80.0  # summed |RGB - background| above which a pixel belongs to the object
MIN_PIXELS = 6  # frames with fewer object pixels do not count for motion
SHAPE_PIXELS = 20  # frames with fewer do not count for shape: a few pixels have no shape
STILL_PX = 4.0  # less travel and radius change than this over the clip reads as "static"
FLAT_SHARE = 0.8  # of the object's pixels that must read as its colour
GREY_SATURATION = 0.25  # (max - min) / max below which a colour has no hue
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # share of the bounding box each shape fills


def _hues(rgb: np.ndarray) -> np.ndarray:
    """Hue angles in degrees of RGB colours [..., 3]."""
    r, g, b = np.moveaxis(np.asarray(rgb, np.float64), -1, 0)
    return np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360


def _anchors() -> dict[str, float]:
    """The palette's hues and, between each two neighbours, the hue halfway: {name: hue}."""
    palette = sorted((float(_hues(np.array(c))), name) for name, c in COLOURS.items())
    anchors = {name: hue for hue, name in palette}
    for (h0, a), (h1, b) in zip(palette, palette[1:] + [(palette[0][0] + 360, palette[0][1])]):
        anchors[f"between {a} and {b}"] = (h0 + h1) / 2 % 360
    return anchors


ANCHORS = _anchors()


def colour_names(rgb: np.ndarray) -> np.ndarray:
    """The name a person gives each RGB colour [..., 3]: the nearest anchor's by hue, or "grey"."""
    rgb = np.asarray(rgb, np.float64)
    names = np.array(list(ANCHORS))
    gaps = np.abs((_hues(rgb)[..., None] - np.array(list(ANCHORS.values())) + 180) % 360 - 180)
    out = names[gaps.argmin(-1)]
    top = rgb.max(-1)
    grey = (top - rgb.min(-1)) < GREY_SATURATION * np.maximum(top, 1e-6)
    return np.where(grey, "grey", out)


@dataclass(frozen=True)
class Verdict:
    colour: str | None  # None: no object found
    motion: str | None
    shape: str | None = None
    flat_share: float = 0.0  # of the object's pixels that read as `colour` on their own
    fill: float = 0.0  # median share of its bounding box the object fills
    mask_fill: float = 0.0  # the same, of the object's plain mask (its pixels counted whole, their box)
    travel_px: float = 0.0
    radius_change_px: float = 0.0
    mean_name: str | None = None  # the name of the object's mean colour, flat or not


def _fill(coverage: np.ndarray) -> float:
    """Area over bounding box of one frame's object coverage [H, W] in [0, 1], both in the coverage's sub-pixel
    measure: the box's width is the sum over columns of the column's largest coverage, its height likewise."""
    width, height = coverage.max(0).sum(), coverage.max(1).sum()
    return float(coverage.sum() / max(width * height, 1e-6))


def _mask_fill(mask: np.ndarray) -> float:
    """Pixel count over bounding-box area of one frame's object mask [H, W] (bool): a plain detector's reading."""
    ys, xs = np.nonzero(mask)
    return float(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))


def _nearest_shape(fill: float) -> str:
    """The shape whose share of its bounding box is nearest `fill`."""
    return min(FILL, key=lambda s: abs(FILL[s] - fill))


def object_pixels(frames: np.ndarray, background=None) -> tuple[np.ndarray, np.ndarray]:
    """(masks [F, H, W]: the object's pixels, coverage [F, H, W] in [0, 1]: how much of each pixel the object
    covers, anti-aliased edges by their share) of frames [F, H, W, 3]. `background`: its RGB where known, else the
    median of the border pixels."""
    frames = np.asarray(frames, np.float32)
    if background is None:
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
        background = np.median(border.reshape(-1, 3), axis=0)
    distance = np.abs(frames - np.asarray(background, np.float32)).sum(-1)  # [F, H, W]
    masks = distance > OBJECT_DISTANCE
    full = float(np.percentile(distance[masks], 90)) if masks.any() else 1.0  # the object's own colour, inside
    coverage = np.clip(distance / max(full, 1e-6), 0.0, 1.0) * (distance > OBJECT_DISTANCE / 2)
    return masks, coverage


def read_video(frames: np.ndarray) -> Verdict:
    frames = np.asarray(frames, np.float32)  # [F, H, W, 3]
    masks, coverage = object_pixels(frames)
    if masks.sum() < MIN_PIXELS:
        return Verdict(None, None)
    pixels = frames[masks]
    mean_name = str(colour_names(pixels.mean(axis=0)))
    flat = float((colour_names(pixels) == mean_name).mean())
    colour = mean_name if flat >= FLAT_SHARE else "mixed"

    shaped = [i for i, m in enumerate(masks) if m.sum() >= SHAPE_PIXELS]
    fill = float(np.median([_fill(coverage[i]) for i in shaped])) if shaped else 0.0
    mask_fill = float(np.median([_mask_fill(masks[i]) for i in shaped])) if shaped else 0.0
    shape = None
    if shaped:
        by_coverage, by_mask = _nearest_shape(fill), _nearest_shape(mask_fill)
        shape = by_coverage if by_coverage == by_mask else "unclear"

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
        return Verdict(colour, None, shape, flat, fill, mask_fill, mean_name=mean_name)
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
    return Verdict(colour, motion, shape, flat, fill, mask_fill, travel, float(dr), mean_name)


def score(verdicts, scenes) -> dict:
    """Colour, shape and motion accuracy of verdicts against the scenes they were generated for, and the share of
    videos with all three right."""
    n = len(scenes)
    right = [(v.colour == s.colour, v.shape == s.shape, v.motion == s.motion) for v, s in zip(verdicts, scenes)]
    return {"n": n, "colour_accuracy": sum(r[0] for r in right) / n, "shape_accuracy": sum(r[1] for r in right) / n,
            "motion_accuracy": sum(r[2] for r in right) / n, "all_accuracy": sum(all(r) for r in right) / n}

"""A toy world simple enough to learn on two CPU cores: one flat-coloured shape moving on a black background.

Each clip is 17 frames of 64x64 RGB (uint8 [F, H, W, 3]) of one shape (circle, square, triangle) in one colour,
moving left, right, up or down, or growing or shrinking, with a caption from a template:
"a red circle moving left on a black background". Everything is deterministic from a seed. Some
colour x shape x motion combinations are held out of training (`HELD_OUT`), so the probe can tell whether the
model composes what it learned or only recalls what it saw.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

FRAMES, SIZE = 17, 64
COLOURS = {  # name -> RGB
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (235, 220, 40), "magenta": (220, 50, 220), "cyan": (40, 220, 220),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "growing", "shrinking")
BACKGROUND = (0, 0, 0)
SUPERSAMPLE = 4  # edge anti-aliasing


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str

    @property
    def caption(self) -> str:
        verb = f"moving {self.motion}" if self.motion in ("left", "right", "up", "down") else self.motion
        return f"a {self.colour} {self.shape} {verb} on a black background"


ALL_SCENES = tuple(Scene(c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS))
# 12 of 108 held out, two per colour, so that every pair of attributes (colour-shape, colour-motion, shape-motion)
# still appears in training: the model is asked to compose pairs it has seen into triples it has not.
_COLOURS, _MOTIONS = list(COLOURS), list(MOTIONS)
HELD_OUT = tuple(Scene(c, SHAPES[(i + k) % 3], _MOTIONS[(i + 3 * k) % 6]) for i, c in enumerate(_COLOURS) for k in (0, 1))
TRAIN_SCENES = tuple(sc for sc in ALL_SCENES if sc not in HELD_OUT)


SQUARE_HALF_SIDE = 0.85  # a square's half side, in units of its half-size r
TRIANGLE_BASE = 0.8  # a triangle's apex is r above its centre, its base this many r below
# Each shape's area in units of r^2, and how far below its centre (cx, cy) the centroid of its area lies, in units of
# r: what its pixels say of where it is and how large.
AREA = {"circle": np.pi, "square": (2 * SQUARE_HALF_SIDE) ** 2, "triangle": 1 + TRIANGLE_BASE}
CENTROID_BELOW = {"circle": 0.0, "square": 0.0, "triangle": (2 * TRIANGLE_BASE - 1) / 3}


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Coverage in [0, 1], [SIZE, SIZE], of a shape centred at (cx, cy) with half-size r (pixels)."""
    n = SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        side = SQUARE_HALF_SIDE * r
        inside = (np.abs(x - cx) <= side) & (np.abs(y - cy) <= side)
    else:  # triangle, apex up
        top, bottom = cy - r, cy + TRIANGLE_BASE * r
        half_width = r * (y - top) / (bottom - top)
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    return inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, seed: int) -> np.ndarray:
    """The clip for `scene`, uint8 [FRAMES, SIZE, SIZE, 3]; start, size and speed drawn from `seed`."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, FRAMES)
    if scene.motion in ("growing", "shrinking"):
        r0, r1 = rng.uniform(5, 7), rng.uniform(15, 19)
        radius = r0 + (r1 - r0) * (t if scene.motion == "growing" else 1 - t)
        cx = np.full(FRAMES, rng.uniform(26, 38))
        cy = np.full(FRAMES, rng.uniform(26, 38))
    else:
        radius = np.full(FRAMES, rng.uniform(7, 10))
        travel = rng.uniform(22, 30)
        start = rng.uniform(12, SIZE - 12 - travel)
        along = start + travel * t
        across = np.full(FRAMES, rng.uniform(18, SIZE - 18))
        if scene.motion in ("left", "up"):
            along = along[::-1]
        cx, cy = (along, across) if scene.motion in ("left", "right") else (across, along)
    return draw(scene, cx, cy, radius)


def draw(scene: Scene, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """`scene`'s shape in its colour, centred at (cx[i], cy[i]) with half-size radius[i] in frame i: uint8
    [FRAMES, SIZE, SIZE, 3]."""
    colour = np.array(COLOURS[scene.colour], np.float32)
    background = np.array(BACKGROUND, np.float32)
    frames = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
    for i in range(FRAMES):
        cover = _mask(scene.shape, cx[i], cy[i], radius[i])[..., None]
        frames[i] = np.round(cover * colour + (1 - cover) * background).astype(np.uint8)
    return frames


def sample(scenes, seed: int) -> tuple[Scene, np.ndarray]:
    """One (scene, clip) drawn from `scenes` deterministically from `seed`."""
    rng = np.random.default_rng([seed, 7])
    scene = scenes[int(rng.integers(len(scenes)))]
    return scene, render(scene, seed)

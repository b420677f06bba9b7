"""The demo's toy world and its probe: captions, held-out split, determinism, and the probe reading ground truth.

The probe is what judges the trained demo model, so it is checked first on the clips the world itself renders:
every colour x shape x motion combination must be read back right. Then on clips made wrong the ways a person
sees first (a halo of another colour, a colour between two of the palette, a blob for a square, the wrong way):
each must be read wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

from soraedge.demo.probe import read_video, score
from soraedge.demo.toy_world import (ALL_SCENES, COLOURS, FRAMES, HELD_OUT, MOTIONS, SHAPES, SIZE, TRAIN_SCENES,
                                     _mask, render)


def test_probe_reads_every_rendered_scene():
    clips = [render(s, seed) for seed, s in enumerate(ALL_SCENES)]
    assert clips[0].shape == (FRAMES, SIZE, SIZE, 3) and clips[0].dtype == np.uint8
    got = score([read_video(c) for c in clips], ALL_SCENES)
    assert got == {"n": len(ALL_SCENES), "colour_accuracy": 1.0, "shape_accuracy": 1.0, "motion_accuracy": 1.0,
                   "all_accuracy": 1.0}


def _clip(layers, xs=np.linspace(20, 44, FRAMES)) -> np.ndarray:
    """A clip of shapes moving right along y = 32: `layers` [(shape, rgb, half-size)] painted in order."""
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), np.float32)
    for i, x in enumerate(xs):
        for shape, rgb, r in layers:
            cover = _mask(shape, x, 32.0, r)[..., None]
            frames[i] = cover * np.array(rgb, np.float32) + (1 - cover) * frames[i]
    return np.round(frames).astype(np.uint8)


YELLOW, RED = COLOURS["yellow"], COLOURS["red"]


@pytest.mark.parametrize("name, clip, wrong", [
    ("the clip as rendered (the control)", _clip([("square", YELLOW, 9)]), set()),
    ("a yellow square in a red halo", _clip([("square", RED, 12), ("square", YELLOW, 7)]), {"colour"}),
    ("an orange square", _clip([("square", (240, 140, 30), 9)]), {"colour"}),
    ("a round blob for a square", _clip([("circle", YELLOW, 10)]), {"shape"}),
    ("a triangle for a square", _clip([("triangle", YELLOW, 10)]), {"shape"}),
    ("a square in a faint round fringe", _clip([("circle", (70, 70, 0), 12), ("square", YELLOW, 9)]), {"shape"}),
    ("moving left", _clip([("square", YELLOW, 9)])[::-1], {"motion"}),
])
def test_probe_reads_deliberately_wrong_clips_as_wrong(name, clip, wrong):
    """Each clip is meant as "a yellow square moving right"; the probe must find exactly what was made wrong."""
    v = read_video(clip)
    seen = {"colour": v.colour != "yellow", "shape": v.shape != "square", "motion": v.motion != "right"}
    assert {k for k, bad in seen.items() if bad} == wrong, (name, v)


def test_probe_says_nothing_about_an_empty_video_and_is_not_fooled_by_a_static_one():
    assert read_video(np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)).colour is None
    still = np.repeat(render(ALL_SCENES[0], 0)[:1], FRAMES, axis=0)  # the first frame held
    assert read_video(still).motion == "static"


def test_held_out_combinations_are_unseen_but_their_parts_are_not():
    assert set(HELD_OUT).isdisjoint(TRAIN_SCENES) and len(HELD_OUT) == 12
    for attr, values in (("colour", COLOURS), ("shape", SHAPES), ("motion", MOTIONS)):
        assert {getattr(s, attr) for s in TRAIN_SCENES} == set(values)


def test_clips_are_deterministic_and_captions_follow_the_template():
    scene = ALL_SCENES[5]
    assert np.array_equal(render(scene, 3), render(scene, 3)) and not np.array_equal(render(scene, 3),
                                                                                      render(scene, 4))
    assert ALL_SCENES[0].caption == "a red circle moving left on a black background"
    assert [s for s in ALL_SCENES if s.motion == "growing"][0].caption == "a red circle growing on a black background"

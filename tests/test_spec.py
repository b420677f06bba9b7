"""EngineSpec: the one statement of shapes, and every view derived from it (runtime/spec.py)."""

import numpy as np
import pytest

from soraedge.runtime.errors import SoraError
from soraedge.runtime.spec import Dim, EngineSpec, TensorSpec

SPEC = EngineSpec(
    name="toy",
    inputs=(TensorSpec("x", "float32", ("b", 4, "h", "w")), TensorSpec("c", "float32", (1, 2, "2*h", "2*w"))),
    outputs=(TensorSpec("y", "float32", ("b", 3, "8*h", "4*(w-1)+1")),),
    dims=(Dim("b", 1, 2, 2), Dim("h", 2, 4, 16, 2), Dim("w", 1, 3, 9)),
)


def test_derived_views_agree():
    feeds = SPEC.sample_inputs(h=6, w=5)
    assert feeds["x"].shape == (2, 4, 6, 5) and feeds["c"].shape == (1, 2, 12, 10)
    assert SPEC.dynamic_axes() == {"x": {0: "b", 2: "h", 3: "w"}, "c": {2: "2*h", 3: "2*w"},
                                   "y": {0: "b", 2: "8*h", 3: "4*(w-1)+1"}}
    assert SPEC.trt_profile()["x"] == ((1, 4, 2, 1), (2, 4, 4, 3), (2, 4, 16, 9))
    assert SPEC.trt_profile()["c"] == ((1, 2, 4, 2), (1, 2, 8, 6), (1, 2, 32, 18))
    sizes = SPEC.bind(feeds)
    assert SPEC.output_shapes(sizes) == {"y": (2, 3, 48, 17)}
    assert EngineSpec.from_dict(SPEC.to_dict()) == SPEC


@pytest.mark.parametrize("change,message", [
    (lambda f: f.update(x=f["x"].astype(np.float64)), "dtype float64"),
    (lambda f: f.update(x=f["x"][:, :3]), "axis 1 is 3, expected 4"),
    (lambda f: f.update(c=f["c"][:, :, :10]), r"expected 2\*h=12"),
    (lambda f: f.pop("c"), "missing inputs"),
])
def test_bind_refuses(change, message):
    feeds = SPEC.sample_inputs(h=6, w=5)
    change(feeds)
    with pytest.raises(SoraError, match=message):
        SPEC.bind(feeds)


def test_bind_refuses_out_of_range_and_off_multiple():
    with pytest.raises(SoraError, match=r"h=5 \(expected a multiple of 2 in \[2, 16\]\)"):
        SPEC.bind({"x": np.zeros((1, 4, 5, 3), np.float32), "c": np.zeros((1, 2, 10, 6), np.float32)})
    with pytest.raises(ValueError):
        Dim("bad", 1, 3, 2)


def test_run_settings_are_recorded_at_export_and_read_back(tiny_engines):
    """How each engine is opened (threads, arena, per-shape compiles, CUDA graphs) travels in its manifest entry."""
    from soraedge.runtime.manifest import load_manifest
    from soraedge.runtime.spec import RunSettings

    m = load_manifest(tiny_engines("tiny-a"))
    assert m.spec("dit_probe").run == RunSettings(one_thread=True)
    assert m.spec("transformer").run == RunSettings(static_shapes=1, cuda_graph=True)
    assert m.spec("vae_decoder_first").run == m.spec("vae_decoder_step").run == RunSettings(arena=False,
                                                                                             static_shapes=2)
    assert m.spec("text_encoder").run == RunSettings()
    assert EngineSpec.from_dict(m.spec("dit_probe").to_dict()) == m.spec("dit_probe")

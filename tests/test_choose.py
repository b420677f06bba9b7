"""The target choice as a pure function: candidates and their measured DiT steps in, one (backend, precision) out."""

import pytest

from soraedge.runtime.choices import Target
from soraedge.runtime.errors import SoraError
from soraedge.precision.convert import RUN_FRACTION
from soraedge.target.choose import BF16_MIN_SPEEDUP, OPENVINO_COMPILE_MEMORY, choose, fit_candidates

ORT, OV, OV_BF16 = Target.of("ort", "fp32"), Target.of("openvino", "fp32"), Target.of("openvino", "bf16")


@pytest.mark.parametrize("steps, rejected, expect", [
    ({ORT: 0.30}, (), ORT),  # one candidate: asked for
    ({ORT: 0.30, OV: 0.25}, (), OV),  # the fastest fp32
    ({ORT: 0.30, OV: 0.25, OV_BF16: 0.25 / BF16_MIN_SPEEDUP}, (), OV_BF16),  # bf16 exactly at the margin
    ({ORT: 0.30, OV: 0.25, OV_BF16: 0.24}, (), OV),  # bf16 faster, but by less than the margin
    ({OV_BF16: 0.20}, (), OV_BF16),  # bf16 asked for: all there is
    ({ORT: 0.30, OV: 0.25, OV_BF16: 0.10}, (OV_BF16,), OV),  # the gate rejected bf16: the fastest fp32 ships
    ({ORT: 0.20, OV: 0.25, OV_BF16: 0.10}, (OV_BF16,), ORT),
])
def test_choose(steps, rejected, expect):
    assert choose(list(steps), steps, frozenset(rejected)) == expect


def test_nothing_left_is_refused():
    with pytest.raises(SoraError, match="every candidate was rejected: openvino bf16"):
        choose([OV_BF16], {OV_BF16: 0.1}, frozenset({OV_BF16}))


@pytest.mark.parametrize("available, kept", [
    (None, [ORT, OV, OV_BF16]),  # unknown: all timed
    (10 * 2**30, [ORT, OV, OV_BF16]),
    (OPENVINO_COMPILE_MEMORY["bf16"] * 2**30 / RUN_FRACTION - 1, [ORT, OV]),  # bf16's compile needs the most
    (OPENVINO_COMPILE_MEMORY["fp32"] * 2**30 / RUN_FRACTION - 1, [ORT]),  # ONNX Runtime is always timed
])
def test_candidates_whose_compile_does_not_fit_are_not_timed(available, kept):
    left, too_large = fit_candidates([ORT, OV, OV_BF16], 2**30, available)
    assert left == kept and set(too_large) == {OV, OV_BF16} - set(kept)
    assert all("1.0 GiB DiT needs about" in why for why in too_large.values())


def test_a_build_where_openvino_cannot_compile_times_onnx_runtime_alone(engine_copy, tmp_path, monkeypatch):
    """A real target build on the tiny engines with the available memory set below OpenVINO's compile: ONNX Runtime
    is timed and ships, the manifest says why OpenVINO was not timed; asked for OpenVINO, the build refuses in one
    line and writes nothing."""
    from soraedge.runtime.manifest import load_manifest
    from soraedge.target import choose as choose_module
    from soraedge.target.build import TargetConfig, build_from_engines

    weights = choose_module.dit_weight_bytes(load_manifest(engine_copy, verify=False))
    monkeypatch.setattr(choose_module, "available_bytes", lambda: 2 * weights)
    lines = []
    build_from_engines(TargetConfig(engine_copy, tmp_path / "e", threads=2), lines.append)
    runtime = load_manifest(tmp_path / "e").runtime
    assert runtime["backend"] == "ort" and list(runtime["timings"]) == ["ort-fp32"]
    if runtime.get("not_timed"):  # OpenVINO is installed here
        assert "needs about" in runtime["not_timed"]["openvino-fp32"]
        assert any("openvino fp32 is not timed" in s for s in lines)
        assert any("runtime: ort fp32 (the only candidate whose compile fits" in s for s in lines)
        with pytest.raises(SoraError, match="openvino fp32: compiling its .* DiT needs about"):
            build_from_engines(TargetConfig(engine_copy, tmp_path / "x", backend="openvino", threads=2))
        assert not (tmp_path / "x").exists()

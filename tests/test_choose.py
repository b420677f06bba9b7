"""The target choice as a pure function: candidates and their measured DiT steps in, one (backend, precision) out."""

import pytest

from soraedge.runtime.choices import Target
from soraedge.runtime.errors import SoraError
from soraedge.target.choose import BF16_MIN_SPEEDUP, choose

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

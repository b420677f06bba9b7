"""What a GPU's first run would trip over, checked where a CPU can check it: a provider that does not load is a
one-line error and never a silent CPU run, ONNX Runtime's TensorRT provider gets its profile shapes from the spec,
and the shared TensorRT activation buffer re-points every engine (dropping the CUDA graphs captured against the old
address) when it grows."""

import pytest

from soraedge.runtime.backends.ort import OrtEngine, check_providers
from soraedge.runtime.backends.ort_io import cuda_provider, tensorrt_provider
from soraedge.runtime.backends.trt import ActivationPool, activation_bytes
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest


def test_a_gpu_provider_that_does_not_load_is_refused_not_run_on_the_cpu(tiny_engines):
    """This machine's onnxruntime has no CUDA provider: ONNX Runtime itself falls back to the CPU with a warning.
    The engine must refuse instead."""
    m = load_manifest(tiny_engines("tiny-a"))
    with pytest.raises(SoraError, match="could not use CUDAExecutionProvider for dit_probe.onnx .*runs on "
                                        "CPUExecutionProvider"):
        OrtEngine(m.engine_path("dit_probe"), m.spec("dit_probe"),
                  providers=[("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
    OrtEngine(m.engine_path("dit_probe"), m.spec("dit_probe"))  # control: the CPU provider asked for, and got


@pytest.mark.parametrize("asked, running, ok", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"], True),
    ([("TensorrtExecutionProvider", {}), "CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"],
     False),
    (["CPUExecutionProvider"], ["CPUExecutionProvider"], True),
    (["CUDAExecutionProvider"], [], False),
])
def test_the_first_provider_asked_for_is_the_one_running(asked, running, ok):
    if ok:
        check_providers(asked, running, "m.onnx")
    else:
        with pytest.raises(SoraError, match="libraries did not load"):
            check_providers(asked, running, "m.onnx")


def test_the_tensorrt_provider_gets_the_specs_profile_and_graph_setting(tiny_engines, tmp_path):
    m = load_manifest(tiny_engines("tiny-a"))
    spec = m.spec("transformer")
    name, options = tensorrt_provider(tmp_path / "c", spec, cuda_graph=True)
    assert name == "TensorrtExecutionProvider" and options["trt_cuda_graph_enable"] == "True"
    assert "trt_fp16_enable" not in options and "trt_int8_enable" not in options  # precision is in the graph
    profile = spec.trt_profile()
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        parsed = dict(item.split(":") for item in options[key].split(","))
        assert set(parsed) == set(profile) == set(spec.input_names)
        assert all(tuple(int(d) for d in parsed[n].split("x")) == profile[n][i] for n in parsed)
    assert profile["hidden_states"][0] != profile["hidden_states"][2]  # a real range, not one shape


def test_fp32_graphs_run_in_fp32_on_the_cuda_provider():
    name, options = cuda_provider(cuda_graph=True)
    assert name == "CUDAExecutionProvider" and options["use_tf32"] == "0" and options["enable_cuda_graph"] == "1"


class _Owner:
    """What ActivationPool asks of an engine: `point_at(ptr, size)`; records each call."""

    def __init__(self):
        self.calls = []

    def point_at(self, ptr, size):
        self.calls.append((ptr, size))


def test_the_activation_pool_re_points_every_engine_when_it_grows():
    freed, addresses = [], iter(range(0x1000, 0x10000, 0x1000))
    pool = ActivationPool(alloc=lambda n: next(addresses), free=freed.append)
    a, b, c = _Owner(), _Owner(), _Owner()
    pool.attach(a, 100)
    pool.attach(b, 50)  # fits: no move
    assert a.calls == [(0x1000, 100)] and b.calls == [(0x1000, 100)] and not freed
    pool.attach(c, 300)  # grows: the old buffer is freed and every engine hears the new address
    assert freed == [0x1000]
    assert a.calls[-1] == b.calls[-1] == c.calls[-1] == (0x2000, 300)
    pool.detach(a)
    pool.attach(_Owner(), 400)
    assert a.calls[-1] == (0x2000, 300) and b.calls[-1] == (0x3000, 400)


def test_a_zero_activation_need_is_an_answer_not_a_fallback():
    class V2:
        device_memory_size_v2 = 0  # TensorRT 11 has no device_memory_size

    class V1:
        device_memory_size = 7

    assert activation_bytes(V2()) == 0 and activation_bytes(V1()) == 7


def test_a_re_pointed_tensorrt_engine_drops_the_graphs_captured_against_the_old_buffer():
    from types import SimpleNamespace

    from soraedge.runtime.backends.trt import TrtEngine

    pointed, destroyed = [], []
    engine = object.__new__(TrtEngine)  # the bookkeeping alone: TensorRT and CUDA are not on this machine
    engine.context = SimpleNamespace(set_device_memory=lambda ptr, size: pointed.append((ptr, size)))
    engine.cudart = SimpleNamespace(cudaGraphExecDestroy=destroyed.append)
    engine.slots = {(1,): {"graph": "captured"}, (2,): {"graph": None}}
    engine.point_at(0x2000, 300)
    assert pointed == [(0x2000, 300)] and destroyed == ["captured"]
    assert all(slot["graph"] is None for slot in engine.slots.values())  # captured again on the next call

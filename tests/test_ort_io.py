"""The IO-binding engine (runtime/backends/ort_io.py), which the ort-cuda backend runs on: on the CPU provider here
(the same code path: slots, buffers from the spec, in-place uploads), and on CUDA where a GPU is present."""

import numpy as np
import pytest

from soraedge.runtime.backends.ort_io import OrtIoEngine
from soraedge.runtime.gpu_target import target
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline


def _io_pipeline(engine_dir, device="cpu", **kw):
    manifest = load_manifest(engine_dir)
    opened = {}

    def open_io(name, spec):
        opened[name] = OrtIoEngine(manifest.engine_path(name), spec, device, **kw)
        return opened[name]

    return Pipeline(manifest, open_with=open_io), opened


def test_io_binding_matches_plain_onnx_runtime(tiny_engines):
    engines = tiny_engines("tiny-a")
    ref = Pipeline.load(engines)("a red fox", steps=3, guidance=5.0, seed=1)
    pipe, opened = _io_pipeline(engines)
    got = pipe("a red fox", steps=3, guidance=5.0, seed=1)
    np.testing.assert_allclose(got.latents, ref.latents, atol=1e-5)
    np.testing.assert_allclose(got.frames, ref.frames, atol=1e-5)
    # The DiT: per step the latents and the timestep are copied in; the (read-only) text embeddings once.
    assert opened["transformer"].uploads == 3 * 2 + 1
    # A second generation brings new embeddings: uploaded again once, not stale ones reused.
    again = pipe("a blue whale", steps=3, guidance=5.0, seed=1)
    assert opened["transformer"].uploads == 2 * (3 * 2 + 1)
    np.testing.assert_allclose(again.frames, Pipeline.load(engines)("a blue whale", steps=3, guidance=5.0,
                                                                      seed=1).frames, atol=1e-5)


def test_buffers_come_from_the_spec_and_writeable_inputs_are_always_copied(tiny_engines):
    manifest = load_manifest(tiny_engines("tiny-a"))
    spec = manifest.spec("transformer")
    engine = OrtIoEngine(manifest.engine_path("transformer"), spec)
    feeds = spec.sample_inputs(seed=0, b=2, f=2, h=4, w=6)
    first = engine(**feeds)
    (slot,) = engine._slots.values()
    sizes = spec.bind(feeds)
    assert {n: tuple(v.shape()) for n, v in slot.outputs.items()} == spec.output_shapes(sizes)
    feeds["hidden_states"] *= 2  # changed in place: must not be mistaken for the array already uploaded
    second = engine(**feeds)
    assert engine.uploads == 6 and not np.allclose(first, second)
    assert first is not second and not np.shares_memory(first, second)  # outputs do not alias the buffers
    engine(**spec.sample_inputs(seed=0, b=1, f=1, h=2, w=2))
    assert len(engine._slots) == 2  # a new shape gets its own buffers


def test_cfg_as_two_calls_matches_one_batch(tiny_engines):
    engines = tiny_engines("tiny-a")
    batch = Pipeline.load(engines)("a red fox", steps=3, guidance=5.0, seed=2)
    split = Pipeline.load(engines, cfg_batch=False)("a red fox", steps=3, guidance=5.0, seed=2)
    assert split.dit_evaluations == 2 * batch.dit_evaluations == 6
    np.testing.assert_allclose(split.frames, batch.frames, atol=1e-4)


def psnr(a, b):
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-20)))


needs_cuda = pytest.mark.skipif(not target()["cuda_provider"] or target()["name"] is None,
                                reason="needs a CUDA GPU and onnxruntime-gpu (this machine has neither)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_matches_the_cpu_engines(tiny_engines, tmp_path, cuda_graph):
    from soraedge.target.build import TargetConfig, build_from_engines

    cpu = tiny_engines("tiny-a")
    gpu = tmp_path / "cuda"
    build_from_engines(TargetConfig(cpu, gpu, "ort-cuda"))
    ref = Pipeline.load(cpu)("a red fox", steps=4, seed=3)
    got = Pipeline.load(gpu, cuda_graph=cuda_graph)("a red fox", steps=4, seed=3)
    assert psnr(got.frames, ref.frames) >= 40.0
    assert got.device_memory_mb["denoise"] > 0

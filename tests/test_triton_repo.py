"""sora-triton's model repository: every config.pbtxt parses as Triton's ModelConfig protobuf (from tritonclient) and
says what the engine spec says; the engine files are the exported bytes; bad input is refused without touching
what exists; and a real tritonserver (nvidia-pytriton's binary) loads the tiny pipeline's repository and answers
two concurrent requests with the frames sora-run's pipeline makes on the same inputs."""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TEST_SIZE

from soraedge.cli.triton_cmd import main as triton_main
from soraedge.serve.repository import TRITON_TYPES, write_triton_repo
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest, sha256_file
from soraedge.runtime.spec import EngineSpec
from soraedge.serve.bls import REQUEST_INPUTS, RESPONSE_OUTPUTS, batch_dim, request_arguments


def _parse(path: Path):
    text_format = pytest.importorskip("google.protobuf.text_format", reason="protobuf comes with tritonclient[grpc]")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="Triton's model-config protobuf ships with tritonclient[grpc]")
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())  # raises on any unknown field/enum


@pytest.mark.parametrize("python_engines", [False, True])
def test_every_config_is_a_valid_model_config_derived_from_the_spec(tiny_engines, tmp_path, python_engines):
    engines = tiny_engines("tiny-a")
    manifest = load_manifest(engines)
    models = write_triton_repo(engines, tmp_path / "repo", instances=2, python_engines=python_engines)
    assert set(models) == set(manifest.engine_names)
    for engine, model in models.items():
        spec = manifest.spec(engine)
        config = _parse(tmp_path / "repo" / model / "config.pbtxt")
        assert config.name == model
        if python_engines:
            assert config.backend == "python" and not config.platform
            assert EngineSpec.from_dict(json.loads(config.parameters["engine_spec"].string_value)) == spec
        else:
            assert config.platform == "onnxruntime_onnx" and not config.backend
        batch = batch_dim(spec)
        assert config.max_batch_size == (spec.dim_map[batch].max if batch else 0)
        assert batch in (None, "b") and (batch is None) == engine.startswith("vae_")
        assert config.instance_group[0].count == 2
        for declared, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
            assert [t.name for t in declared] == [t.name for t in tensors]
            for d, t in zip(declared, tensors):
                assert d.data_type == _parse_enum(TRITON_TYPES[t.dtype])
                shape = t.shape[1:] if batch else t.shape
                expected = [e if isinstance(e, int) else -1 for e in shape] or [1]
                assert list(d.dims) == expected
                assert d.HasField("reshape") == (not shape)  # the timestep [b]: declared [1], reshaped to []
    sampler = _parse(tmp_path / "repo" / "soraedge" / "config.pbtxt")
    assert sampler.backend == "python" and sampler.max_batch_size == 0
    assert [(i.name, i.optional) for i in sampler.input] == [(n, not req) for n, _, _, req in REQUEST_INPUTS]
    assert [o.name for o in sampler.output] == [n for n, _, _ in RESPONSE_OUTPUTS]
    assert json.loads(sampler.parameters["engine_models"].string_value) == models


def _parse_enum(name: str) -> int:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Value(name)


def test_repository_holds_the_exported_bytes_and_the_pipeline_metadata(tiny_engines, tmp_path):
    engines = tiny_engines("tiny-a")
    manifest = load_manifest(engines)
    models = write_triton_repo(engines, tmp_path / "repo")
    for engine, model in models.items():
        rel = manifest.data["engines"][engine]["file"]
        version = tmp_path / "repo" / model / "1"
        assert sha256_file(version / "model.onnx") == manifest.data["files"][rel]["sha256"]
        if rel + ".data" in manifest.data["files"]:
            assert sha256_file(version / (rel + ".data")) == manifest.data["files"][rel + ".data"]["sha256"]
    pipeline = load_manifest(tmp_path / "repo" / "soraedge" / "1" / "pipeline", verify=False)
    assert pipeline.data == manifest.data
    for rel in (manifest.config["tokenizer"], manifest.config["scheduler"]):
        assert sha256_file(pipeline.root / rel) == manifest.data["files"][rel]["sha256"]


def test_bad_input_is_one_line_and_keeps_what_exists(tiny_engines, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("mine")
    for args in ([str(tiny_engines("tiny-a")), "-o", str(repo)],  # exists, no --overwrite
                 [str(tmp_path / "nowhere"), "-o", str(tmp_path / "r2")],  # not an engine directory
                 [str(tiny_engines("tiny-a")), "-o", str(tmp_path / "r3"), "--instances", "0"]):
        result = CliRunner().invoke(triton_main, args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert (repo / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    # --overwrite replaces only a repository sora-triton wrote: never a user's folder
    result = CliRunner().invoke(triton_main, [str(tiny_engines("tiny-a")), "-o", str(repo), "--overwrite"])
    assert result.exit_code == 2 and "not a repository written by sora-triton (it holds keep.txt)" in result.output
    assert (repo / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    for _ in range(2):  # written, then replaced
        result = CliRunner().invoke(triton_main, [str(tiny_engines("tiny-a")), "-o", str(ours), "--overwrite"])
        assert result.exit_code == 0, result.output
        assert (ours / "soraedge" / "config.pbtxt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no old copy left behind


def test_request_arguments_take_one_element_each_and_need_a_prompt():
    args = request_arguments({"PROMPT": np.array([b"a fox"], dtype=object), "STEPS": np.array([3], np.int32),
                              "GUIDANCE": np.array([2.5], np.float32), "GUIDANCE_2": np.array([1.5], np.float32),
                              "SCHEDULER": np.array([b"euler"], dtype=object)})
    assert args == {"prompt": "a fox", "steps": 3, "guidance": 2.5, "guidance_2": 1.5, "scheduler": "euler"}
    with pytest.raises(SoraError, match="PROMPT is required"):
        request_arguments({"STEPS": np.array([3], np.int32)})
    with pytest.raises(SoraError, match="one element"):
        request_arguments({"PROMPT": np.array([b"a", b"b"], dtype=object)})


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nvidia-pytriton's tritonserver is Linux-only")
def test_real_tritonserver_answers_two_concurrent_requests_like_sora_run(experts_engines, tmp_path):
    """Wan2.2 A14B's two-expert engines (a model per engine, both experts included) on a real server: a request
    with the low-noise expert's guidance and a swapped scheduler and shift, and one with the defaults, at once."""
    pytest.importorskip("pytriton", reason="no tritonserver: the `triton` extra installs nvidia-pytriton")
    pytest.importorskip("tritonclient.grpc", reason="the client needs tritonclient[grpc] (the `triton` extra)")
    from soraedge.cli.triton_client import generate
    from soraedge.cli.triton_serve import missing_libraries, start_server, stop_server

    if missing := missing_libraries():
        pytest.skip(f"tritonserver's Python-backend stub cannot load {missing} on this machine")
    from soraedge.runtime.pipeline import Pipeline
    from soraedge.runtime.video import to_uint8

    engines = experts_engines("tiny-a14b-a")
    write_triton_repo(engines, tmp_path / "repo", instances=2, python_engines=True)
    size = TEST_SIZE["tiny-a14b-a"]
    requests = [dict(prompt="a red fox running", seed=3, steps=3, guidance=5.0, guidance_2=2.0, scheduler="euler",
                     flow_shift=5.0, **size),
                dict(prompt="a blue whale", negative_prompt="blurry", seed=7, steps=2, guidance=3.0, **size)]
    http, grpc, metrics = _free_ports(3)
    server = start_server(tmp_path / "repo", http, grpc, metrics, tmp_path / "server.log", timeout_s=120)
    try:
        results: list = [None, None]

        def send(i):
            try:
                results[i] = generate(f"127.0.0.1:{grpc}", "soraedge", timeout_s=120, **requests[i])
            except Exception as e:  # reported below, with the server's log
                results[i] = e

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        with pytest.raises(SoraError, match="frames"):  # bad input: the server's one-line reason comes back
            generate(f"127.0.0.1:{grpc}", "soraedge", timeout_s=60, prompt="x", frames=6)
    finally:
        stop_server(server)
    log = (tmp_path / "server.log").read_text(errors="replace")[-3000:]
    pipe = Pipeline.load(engines)
    for request, result in zip(requests, results):
        assert isinstance(result, tuple), f"{result!r}\n{log}"
        video, timings = result
        expected = to_uint8(pipe(**request).frames)  # [F, H, W, 3]
        assert video.dtype == np.uint8 and video.shape == expected.shape
        assert np.abs(video.astype(int) - expected.astype(int)).max() <= 1
        assert set(timings) >= {"encode", "denoise", "decode"}

"""The Triton Inference Server side of a model repository (serve/repository.py writes it): the Python models.

Inside `tritonserver`'s Python backend, `SamplerModel` loads the engine directory's metadata (manifest, tokenizer,
scheduler config; no ONNX files) from its version folder and builds the runtime's own `Pipeline` with
`open_with=BlsEngine`: every engine call (text encoder, DiT, step-cache probe, VAE decoder steps) becomes a BLS
request to the server's model of that engine. The sampler loop, the scheduler, CFG and the chunked VAE decode
are therefore the runtime's code, not a copy. `REQUEST_INPUTS`/`RESPONSE_OUTPUTS` are the one statement of the
request protocol: the repository writer, this model and the client (cli/triton_client.py) all read them.
`EngineModel` serves one engine on the runtime's own backend (ONNX Runtime) for servers without Triton's
onnxruntime backend (e.g. the `tritonserver` that the `nvidia-pytriton` wheel ships).

The Python backend's stub embeds Python with the environment ignored, so `PYTHONPATH` does not reach `sys.path`;
the model files the writer emits (MODEL_PY) add it back, so the server's environment says where soraedge lives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..runtime.errors import SoraError
from ..runtime.spec import EngineSpec

PIPELINE_FOLDER = "pipeline"  # in the sampler model's version folder: manifest.json, tokenizer/, scheduler/
# (name, Triton data type, numpy dtype, required): one element each; absent = the engine directory's default (seed 0).
REQUEST_INPUTS = (
    ("PROMPT", "TYPE_STRING", np.object_, True),
    ("NEGATIVE_PROMPT", "TYPE_STRING", np.object_, False),
    ("STEPS", "TYPE_INT32", np.int32, False),
    ("GUIDANCE", "TYPE_FP32", np.float32, False),
    ("SEED", "TYPE_INT64", np.int64, False),
    ("HEIGHT", "TYPE_INT32", np.int32, False),
    ("WIDTH", "TYPE_INT32", np.int32, False),
    ("FRAMES", "TYPE_INT32", np.int32, False),
    ("GUIDANCE_2", "TYPE_FP32", np.float32, False),  # Wan2.2 A14B's low-noise expert
    ("SCHEDULER", "TYPE_STRING", np.object_, False),  # unipc | euler, with FLOW_SHIFT: a distilled recipe
    ("FLOW_SHIFT", "TYPE_FP32", np.float32, False),
)
# (name, Triton data type, dims): the video as uint8 [F, H, W, 3] and the stage timings as one JSON string.
RESPONSE_OUTPUTS = (("VIDEO", "TYPE_UINT8", (-1, -1, -1, 3)), ("TIMINGS", "TYPE_STRING", (1,)))


def request_arguments(values: dict[str, np.ndarray | None]) -> dict:
    """Request tensors ({name: one-element array or None}) -> Pipeline call arguments; SoraError if malformed."""
    args = {}
    for name, _, dtype, required in REQUEST_INPUTS:
        value = values.get(name)
        if value is None:
            if required:
                raise SoraError(f"request input {name} is required")
            continue
        value = np.asarray(value).reshape(-1)
        if value.size != 1:
            raise SoraError(f"request input {name} must hold one element, got {value.size}")
        item = value[0]
        if dtype is np.object_:
            item = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        elif dtype is np.float32:
            item = float(item)
        else:
            item = int(item)
        args[name.lower()] = item
    return args


MODEL_PY = '''"""Triton Python-backend entry point: {what} (soraedge/serve/bls.py)."""
import os
import site

# The backend stub ignores PYTHONPATH; honour it (as site dirs, so .pth files such as an editable install's are
# read) so the server's environment decides where soraedge is installed.
for path in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    site.addsitedir(path)

from soraedge.serve.bls import {cls} as TritonPythonModel  # noqa: E402,F401
'''


def batch_dim(spec: EngineSpec) -> str | None:
    """The dynamic dimension that leads every input and output, if any: the model's Triton batch axis (the
    repository writer leaves it out of `dims`; a tensor that is nothing but it is declared [1], reshaped to [])."""
    first = {t.shape[0] if t.shape else None for t in (*spec.inputs, *spec.outputs)}
    lead = first.pop() if len(first) == 1 else None
    return lead if isinstance(lead, str) and lead in spec.dim_map else None


class BlsEngine:
    """An engine whose every call is a BLS request to the server model `model` (the runtime's engine interface:
    `engine(**inputs) -> first output`, `engine.run(**inputs) -> all outputs`, `.spec`)."""

    def __init__(self, model: str, spec: EngineSpec, pb_utils):
        self.model = model
        self.spec = spec
        self._pb = pb_utils
        batched = batch_dim(spec) is not None
        self._as_sent = {t.name: batched and len(t.shape) == 1 for t in spec.inputs}  # [b] goes as [b, 1]

    def run(self, **feeds: np.ndarray) -> list[np.ndarray]:
        self.spec.bind(feeds)  # the same validation as a local engine, before the request leaves
        pb = self._pb
        tensors = [pb.Tensor(n, np.ascontiguousarray(feeds[n][:, None] if self._as_sent[n] else feeds[n]))
                   for n in self.spec.input_names]
        request = pb.InferenceRequest(model_name=self.model, requested_output_names=self.spec.output_names,
                                      inputs=tensors)
        response = request.exec()
        if response.has_error():
            raise SoraError(f"{self.model}: {response.error().message()}")
        return [pb.get_output_tensor_by_name(response, n).as_numpy() for n in self.spec.output_names]

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        return self.run(**feeds)[0]


class SamplerModel:
    """The sampler model: prompt and settings in, VIDEO (uint8 [F, H, W, 3]) and TIMINGS (JSON) out."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from ..runtime.manifest import load_manifest
        from ..runtime.pipeline import Pipeline

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        models = json.loads(config["parameters"]["engine_models"]["string_value"])  # {engine: server model}
        root = Path(args["model_repository"]) / args["model_version"] / PIPELINE_FOLDER
        manifest = load_manifest(root, verify=False)  # the ONNX files live in the engine models' folders
        # backend="ort" only keeps the Pipeline from looking for the backend chosen at export: BLS runs the engines
        self.pipe = Pipeline(manifest, backend="ort", open_with=lambda name, spec: BlsEngine(models[name], spec,
                                                                                             pb_utils))

    def execute(self, requests) -> list:
        from ..runtime.video import to_uint8

        pb = self._pb
        responses = []
        for request in requests:
            try:
                values = {}
                for name, *_ in REQUEST_INPUTS:
                    tensor = pb.get_input_tensor_by_name(request, name)
                    values[name] = None if tensor is None else tensor.as_numpy()
                result = self.pipe(**request_arguments(values))
                video = to_uint8(result.frames)  # [F, H, W, 3]
                timings = np.array([json.dumps(result.timings).encode()], dtype=np.object_)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("VIDEO", video),
                                                                      pb.Tensor("TIMINGS", timings)]))
            except SoraError as e:  # bad input: a one-line error for this request, the others go on
                responses.append(pb.InferenceResponse(error=pb.TritonError(str(e))))
        return responses


class EngineModel:
    """One engine as a Python-backend model, run by the runtime's ONNX Runtime backend (config parameter `engine_spec`,
    the engine file `model.onnx` beside this model's model.py)."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from ..runtime.backends import open_engine

        self._pb = pb_utils
        params = json.loads(args["model_config"])["parameters"]
        spec = EngineSpec.from_dict(json.loads(params["engine_spec"]["string_value"]))
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.engine = open_engine("ort", path, spec)

    def execute(self, requests) -> list:
        pb = self._pb
        spec = self.engine.spec
        responses = []
        for request in requests:
            try:
                feeds = {n: pb.get_input_tensor_by_name(request, n).as_numpy() for n in spec.input_names}
                outputs = self.engine.run(**feeds)
                responses.append(pb.InferenceResponse(
                    output_tensors=[pb.Tensor(n, o) for n, o in zip(spec.output_names, outputs)]))
            except SoraError as e:
                responses.append(pb.InferenceResponse(error=pb.TritonError(str(e))))
        return responses

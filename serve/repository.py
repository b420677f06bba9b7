"""Turn an engine directory into a Triton Inference Server model repository.

One model per engine (text encoder, DiT and step-cache probe (each of Wan2.2 A14B's experts has both), the two VAE
decoder graphs), `onnxruntime_onnx` for ONNX engines and `tensorrt_plan` (with CUDA graphs) for plan files (or, with
`python_engines`, Python-backend models that run the ONNX files on the runtime's ONNX Runtime backend, for servers
built without the onnxruntime backend, such as the one in the `nvidia-pytriton` wheel), each config derived from the
engine's EngineSpec: names, data types, dims (-1 where dynamic), and `max_batch_size` only where one dimension leads
every input and output (then that axis leaves `dims` and the server may batch requests along it). Plus one
Python-backend model, `<prefix>`, that runs the runtime's sampler with BLS calls to them (serve/bls.py); its version
folder holds the engine directory's manifest, tokenizer and scheduler config, and its config names the engine
models. Engine files are hard-linked where the filesystem allows (copied otherwise). The repository is written to a
temporary folder beside `repo` and renamed into place, so a failed write leaves nothing half-built; its marker file
(`soraedge-repository.json`, which Triton ignores: it loads model folders only) lists the models it wrote, and only
such a folder, holding nothing else, is ever replaced (with `--overwrite`).

    sora-triton ENGINE_DIR -o REPO [--prefix soraedge] [--instances 1] [--kind cpu|gpu] [--python-engines]
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from ..runtime.errors import SoraError
from ..runtime.interrupts import raise_if_interrupted
from ..runtime.manifest import MANIFEST, Manifest, load_manifest
from ..runtime.safe_files import inside, link_or_copy, output_lock
from ..runtime.spec import EngineSpec
from .bls import MODEL_PY, PIPELINE_FOLDER, REQUEST_INPUTS, RESPONSE_OUTPUTS, batch_dim

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


class Token(str):
    """A bare protobuf text-format token (an enum value), written without quotes."""


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """A dict as protobuf text format: nested dicts are messages, lists of dicts repeated messages, lists of
    scalars repeated scalars, str quoted (Token bare), bool lower-case."""
    pad = "  " * indent

    def scalar(v) -> str:
        if isinstance(v, Token):
            return str(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines += [f"{pad}{key} {{", to_pbtxt(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {scalar(value)}")
    return "\n".join(line for line in lines if line)


def engine_config(name: str, spec: EngineSpec, platform: str, instances: int, kind: str) -> dict:
    """The model config of one engine, from its spec. `platform` "python" serves it with EngineModel (the runtime's
    ONNX Runtime backend inside the Python backend) for servers without Triton's onnxruntime backend."""
    batch = batch_dim(spec)

    def tensor(t):
        shape = t.shape[1:] if batch else t.shape
        entry = {"name": t.name, "data_type": Token(TRITON_TYPES[t.dtype]),
                 "dims": [e if isinstance(e, int) else -1 for e in shape]}
        if not entry["dims"]:  # only the batch axis (the DiT's timestep [b]): Triton spells it [1] -> []
            entry.update(dims=[1], reshape={"shape": []})
        return entry

    runs_on = {"backend": "python"} if platform == "python" else {"platform": platform}
    config = {"name": name, **runs_on, "max_batch_size": spec.dim_map[batch].max if batch else 0,
              "input": [tensor(t) for t in spec.inputs], "output": [tensor(t) for t in spec.outputs],
              "instance_group": [{"count": instances, "kind": Token(KINDS[kind])}]}
    if platform == "python":
        config["parameters"] = [{"key": "engine_spec", "value": {"string_value": json.dumps(spec.to_dict())}}]
    if batch:
        config["dynamic_batching"] = {}
    if platform == "tensorrt_plan":
        config["optimization"] = {"cuda": {"graphs": True}}
    return config


def sampler_config(name: str, models: dict[str, str], instances: int) -> dict:
    """The Python-backend sampler model's config (it runs on the CPU; its engines run where their models do)."""
    return {
        "name": name, "backend": "python", "max_batch_size": 0,
        "input": [{"name": n, "data_type": Token(t), "dims": [1], "optional": not required}
                  for n, t, _, required in REQUEST_INPUTS],
        "output": [{"name": n, "data_type": Token(t), "dims": list(dims)} for n, t, dims in RESPONSE_OUTPUTS],
        "instance_group": [{"count": instances, "kind": Token("KIND_CPU")}],
        "parameters": [{"key": "engine_models", "value": {"string_value": json.dumps(models, sort_keys=True)}}],
    }


def _platform(path: Path) -> tuple[str, str]:
    """(Triton platform, model file name) for an engine file."""
    if path.suffix == ".onnx":
        return "onnxruntime_onnx", "model.onnx"
    if path.suffix in (".plan", ".engine"):
        return "tensorrt_plan", "model.plan"
    raise SoraError(f"{path.name}: Triton serves .onnx and TensorRT .plan engines, not {path.suffix!r}")


def _write_engine_model(manifest: Manifest, engine: str, folder: Path, model: str, instances: int, kind: str,
                        python_engines: bool):
    src = manifest.engine_path(engine)
    platform, filename = _platform(src)
    if python_engines:
        if platform != "onnxruntime_onnx":
            raise SoraError(f"{src.name}: only ONNX engines can be served by the Python backend")
        platform = "python"
    version = folder / "1"
    version.mkdir(parents=True)
    link_or_copy(src, version / filename)
    data = manifest.data["engines"][engine]["file"] + ".data"
    if data in manifest.data["files"]:  # external weights keep their name: the graph refers to them by it
        link_or_copy(manifest.file(data), version / Path(data).name)
    if python_engines:
        (version / "model.py").write_text(MODEL_PY.format(what=f"the {engine} engine on ONNX Runtime",
                                                          cls="EngineModel"))
    config = engine_config(model, manifest.spec(engine), platform, instances, kind)
    (folder / "config.pbtxt").write_text(to_pbtxt(config) + "\n")


MARKER = "soraedge-repository.json"  # what makes a folder a repository this writer may replace
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_prefix(prefix: str) -> None:
    """Model names become folder names in the repository: letters, digits, '_' and '-' only (Triton's model names,
    kept to what is a plain folder name on every file system)."""
    if not isinstance(prefix, str) or not _MODEL_NAME.fullmatch(prefix):
        raise SoraError(f"prefix {prefix!r} is not a valid model name: use 1-64 letters, digits, '_' or '-', "
                        f"starting with a letter or digit")


def is_repository(repo: Path) -> bool:
    try:
        data = json.loads((repo / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == "soraedge.triton-repository"


def _check_repo_destination(repo: Path, engine_dir: Path, overwrite: bool) -> None:
    """A repository is written to a new folder, or replaces one this writer wrote (with `overwrite`); never a user's
    folder, a file, or a folder holding the engine directory."""
    if repo.resolve() == engine_dir.resolve() or repo.resolve() in engine_dir.resolve().parents:
        raise SoraError(f"{repo} is (or holds) the engine directory {engine_dir}: write the repository elsewhere")
    if repo.is_symlink() or (repo.exists() and not repo.is_dir()):
        raise SoraError(f"{repo} exists and is not a directory: refusing to replace it")
    if not repo.exists() or not any(repo.iterdir()):
        return
    if not is_repository(repo):
        names = sorted(p.name for p in repo.iterdir())
        raise SoraError(f"{repo} exists and is not a repository written by sora-triton (it holds "
                        f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): refusing to touch it")
    if not overwrite:
        raise SoraError(f"{repo} exists; pass --overwrite to replace it")
    models = set(json.loads((repo / MARKER).read_text()).get("models") or [])
    foreign = sorted(p.name for p in repo.iterdir() if p.name != MARKER and p.name not in models)
    if foreign:
        raise SoraError(f"{repo} also holds {', '.join(foreign[:3])}, which sora-triton did not write: replacing "
                        f"it would delete them; move them out first")


def write_triton_repo(engine_dir: Path, repo: Path, prefix: str = "soraedge", instances: int = 1,
                      kind: str = "cpu", python_engines: bool = False, overwrite: bool = False) -> dict[str, str]:
    """Write the model repository; returns {engine: model name} (the sampler model is named `prefix`).
    `python_engines` serves the engines through the Python backend (EngineModel) instead of Triton's
    onnxruntime backend."""
    engine_dir, repo = Path(engine_dir), Path(repo)
    if kind not in KINDS:
        raise SoraError(f"unknown instance kind {kind!r} (known: {', '.join(KINDS)})")
    if instances < 1:
        raise SoraError(f"instances={instances}: need at least 1")
    check_prefix(prefix)
    manifest = load_manifest(engine_dir)  # verified: the repository gets exactly what was exported
    _check_repo_destination(repo, engine_dir, overwrite)
    models = {e: f"{prefix}_{e}" for e in manifest.engine_names}
    for model in models.values():
        check_prefix(model)
    try:
        repo.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoraError(f"cannot create the folder {repo.parent} for the repository ({e.strerror})") from None
    work = Path(tempfile.mkdtemp(prefix=f".{repo.name}.build-", dir=repo.parent))
    try:
        stage = work / "repo"
        for engine, model in models.items():
            _write_engine_model(manifest, engine, stage / model, model, instances, kind, python_engines)
        sampler = stage / prefix
        pipeline = sampler / "1" / PIPELINE_FOLDER
        pipeline.mkdir(parents=True)
        (sampler / "1" / "model.py").write_text(MODEL_PY.format(what="the soraedge sampler", cls="SamplerModel"))
        config = manifest.config
        for rel in (MANIFEST, config["tokenizer"], config["scheduler"]):
            src = engine_dir / MANIFEST if rel == MANIFEST else manifest.file(rel)
            inside(pipeline, rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, inside(pipeline, rel))
        (sampler / "config.pbtxt").write_text(to_pbtxt(sampler_config(prefix, models, instances)) + "\n")
        (stage / MARKER).write_text(json.dumps({"schema": "soraedge.triton-repository",
                                                "models": sorted([prefix, *models.values()])}, indent=1) + "\n")
        raise_if_interrupted()
        with output_lock(repo):
            _check_repo_destination(repo, engine_dir, overwrite)  # again: another writer may have been faster
            raise_if_interrupted()
            if repo.exists():
                repo.rename(work / "previous")
            stage.rename(repo)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return models

"""manifest.json: what an engine directory holds, and the checks that refuse a directory that is not what it says.

An engine directory is trusted because its files hash to what its manifest records, never because files with the
right names exist. A build holds the manifest it is making in memory (`staged`, then `Manifest.updated` as the
target adds files and sections: the build's timings, calibration and quality gate run from it) and writes it once,
when the directory is complete (`Manifest.write`); `load_manifest` is how every runtime entry point reads one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from .choices import Backend, Execution, Graph
from .errors import SoraError
from .safe_files import atomic_write_text, inside
from .spec import EngineSpec
from .verified_files import VerifiedFiles, identity

MANIFEST = "manifest.json"
SCHEMA = "soraedge.engines"  # what makes a manifest.json recognisably ours (a folder we may replace)
FORMAT_VERSION = 1
CACHE_DIR = ".cache"  # the hash record of runtime/verified_files.py; not part of the content, never a compiled model
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file under root except the manifest and backend caches; files in
    `known` keep the hashes recorded there (they were hashed when written and are not changed afterwards)."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and p.relative_to(root).parts[0] != CACHE_DIR:
            rel = p.relative_to(root).as_posix()
            files[rel] = (known or {}).get(rel) or {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def staged(root: Path, body: dict, files: dict[str, dict] | None = None) -> Manifest:
    """The manifest of an engine directory being built in `root`, held in memory and checked like one read from
    disk. `files`: hashes already taken (default: hash the tree)."""
    data = {"schema": SCHEMA, "format_version": FORMAT_VERSION, **body,
            "files": files if files is not None else hash_tree(root)}
    _check_structure(root, data)
    return Manifest(root, data)


# Engine-entry keys naming files a runtime target adds beside the portable ONNX (built for one target, not carried
# into a build for another): TensorRT plans, ONNX Runtime's CPU graph of the DiT.
TARGET_FILE_KEYS = ("plan", "ort_cpu_file")


class Manifest:
    """A verified manifest: the parsed JSON plus typed accessors for what the runtime needs. Every path it hands out
    was checked to lie inside `root` when the manifest was read (`read_manifest`)."""

    def __init__(self, root: Path, data: dict, verified: dict[str, str] | None = None):
        self.root = root
        self.data = data
        self.verified = verified or {}  # relative path -> stat identity of the file when its hash was checked

    def updated(self, engines: dict[str, dict] | None = None, **sections) -> Manifest:
        """A new manifest (this one is left as it was): `sections` replaced, each engine's entry extended by
        `engines[name]`, and the files written into `root` since this one was made hashed and listed."""
        data = {**self.data, **sections}
        if engines:
            data["engines"] = {n: {**e, **engines.get(n, {})} for n, e in self.data["engines"].items()}
        data["files"] = hash_tree(self.root, self.data["files"])
        _check_structure(self.root, data)
        return Manifest(self.root, data)

    def write(self) -> None:
        """Write root/manifest.json atomically: the last step of a build."""
        atomic_write_text(self.root / MANIFEST, json.dumps(self.data, indent=2, sort_keys=False) + "\n")

    @property
    def config(self) -> dict:
        return self.data["pipeline"]

    def spec(self, engine: str) -> EngineSpec:
        return EngineSpec.from_dict(self.data["engines"][engine]["spec"])

    def file(self, rel: str) -> Path:
        """root/rel, re-checked when it is opened: a listed file that changed since its hash was verified is hashed
        again (an engine opened lazily is never used unchecked)."""
        path = inside(self.root, rel)
        if rel in self.verified and identity(path.stat()) != self.verified[rel]:
            _verify_files(self.root, {rel: self.data["files"][rel]}, self.verified)
        return path

    def engine_path(self, engine: str) -> Path:
        return self._engine_file(engine, self.data["engines"][engine]["file"])

    def _engine_file(self, engine: str, rel: str) -> Path:
        """`rel` and the weights it reads, re-checked: its own external data, or the portable graph's, which ONNX
        Runtime's CPU graph of the DiT shares."""
        for data in dict.fromkeys((rel + ".data", self.data["engines"][engine]["file"] + ".data")):
            if data in self.data["files"]:
                self.file(data)
        return self.file(rel)

    def path_for(self, engine: str, backend: str) -> Path:
        """The file `backend` runs for `engine`: the TensorRT plan, ONNX Runtime's CPU graph where the export wrote
        one (target/choose.py: the DiT with ONNX Runtime's MultiHeadAttention), else the portable ONNX."""
        if backend == "tensorrt":
            return self.plan_path(engine)
        ort_file = self.data["engines"][engine].get("ort_cpu_file")
        if backend == "ort" and ort_file:
            return self._engine_file(engine, ort_file)
        return self.engine_path(engine)

    def plan_path(self, engine: str) -> Path:
        """The engine's TensorRT plan (directories built with --backend tensorrt)."""
        plan = self.data["engines"][engine].get("plan")
        if plan is None:
            raise SoraError(f"{self.root} has no TensorRT plan for {engine}: build one with sora-build {self.root} "
                            f"-o NEW_DIR --backend tensorrt")
        return self._engine_file(engine, plan)

    def content_key(self, engine: str) -> str:
        """A short hash of an engine's graph and weights files, for naming caches of it."""
        rel = self.data["engines"][engine]["file"]
        parts = [self.data["files"][f]["sha256"] for f in (rel, rel + ".data") if f in self.data["files"]]
        return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]

    @property
    def runtime(self) -> dict:
        """The backend and precision chosen at export (ONNX Runtime fp32 for directories that record none)."""
        return self.data.get("runtime") or {"backend": Backend.ORT, "precision": Execution.FP32}

    @property
    def precision(self) -> dict[str, str]:
        """Graph precision per component ({"transformer": "int8", ...}); directories from before per-component
        precision record one string for all."""
        p = self.data.get("precision", Graph.FP32)
        return dict(p) if isinstance(p, dict) else {c: p for c in ("transformer", "text_encoder", "vae")}

    @property
    def engine_names(self) -> list[str]:
        return list(self.data["engines"])


def is_engine_dir(root: Path) -> bool:
    """True when `root` holds a manifest of our schema: the only kind of folder an export may replace."""
    try:
        data = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA and isinstance(data.get("format_version"), int)


def load_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Read, check the structure and every path of, and (by default) verify every file's hash. Raises SoraError
    with a one-line reason."""
    root = Path(root)
    if not root.is_dir():
        raise SoraError(f"engine directory {root} does not exist (create one with `sora-export MODEL -o {root}`)")
    path = root / MANIFEST
    if not path.is_file():
        raise SoraError(f"{root} has no {MANIFEST}: not an engine directory written by sora-export")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SoraError(f"{path} is unreadable or malformed ({type(e).__name__}): re-run sora-export") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise SoraError(f"{path} is not a soraedge engine manifest (no \"schema\": \"{SCHEMA}\"): re-run sora-export")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise SoraError(f"{path} has format version {version!r}; this runtime reads {FORMAT_VERSION}: re-export")
    _check_structure(root, data)
    verified = _verify_files(root, data["files"]) if verify else {}
    return Manifest(root, data, verified)


def _malformed(path: Path, what: str) -> SoraError:
    return SoraError(f"{path / MANIFEST} is malformed: {what}; re-run sora-export")


def _check_structure(root: Path, data: dict) -> None:
    """Every field the runtime reads has its type; every path the manifest names is inside `root` and listed (so
    hash-checked) in `files`."""
    files, engines, pipeline = data.get("files"), data.get("engines"), data.get("pipeline")
    if not isinstance(files, dict):
        raise _malformed(root, "'files' is not a mapping")
    for rel, meta in files.items():
        inside(root, rel, "file")
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])
                and isinstance(meta.get("bytes"), int) and meta["bytes"] >= 0):
            raise _malformed(root, f"files[{rel!r}] needs a sha256 and a byte count")
    if not isinstance(engines, dict) or not engines:
        raise _malformed(root, "'engines' is not a non-empty mapping")
    named = []
    for name, entry in engines.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise _malformed(root, f"engines[{name!r}] has no file")
        try:
            EngineSpec.from_dict(entry.get("spec"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _malformed(root, f"engines[{name!r}].spec is invalid ({type(e).__name__}: {e})") from None
        named += [(f"engines[{name!r}].{k}", entry[k]) for k in TARGET_FILE_KEYS + ("file",) if entry.get(k)]
    if not isinstance(pipeline, dict):
        raise _malformed(root, "'pipeline' is not a mapping")
    for key in ("tokenizer", "scheduler"):
        named.append((f"pipeline.{key}", pipeline.get(key)))
    defaults = pipeline.get("defaults")
    missing = [k for k in DEFAULT_KEYS if not isinstance(defaults, dict) or k not in defaults]
    if missing:
        raise _malformed(root, f"pipeline.defaults lacks {missing}")
    vae = pipeline.get("vae")
    if not isinstance(vae, dict) or any(vae.get(k) not in engines for k in ("first", "step")):
        raise _malformed(root, "pipeline.vae does not name two of its engines")
    for what, rel in named:
        inside(root, rel, what)
        if rel not in files:
            raise _malformed(root, f"{what} {rel!r} is not listed (so not hash-checked) in 'files'")


DEFAULT_KEYS = ("height", "width", "frames", "steps", "guidance", "negative_prompt", "fps")


def _verify_files(root: Path, files: dict, verified: dict[str, str] | None = None) -> dict[str, str]:
    """Every listed file present with the size and sha256 the manifest records; files recorded as already hashed
    and untouched since are not read again (runtime/verified_files.py). Returns {relative path: stat identity}
    of what was checked (into `verified`, when given)."""
    record = VerifiedFiles(root / CACHE_DIR)
    verified = {} if verified is None else verified
    for rel, meta in files.items():
        f = inside(root, rel, "file")
        if not f.is_file():
            raise SoraError(f"{f} is listed in the manifest but missing: the engine directory is incomplete")
        started, before = time.time(), f.stat()
        if not record.unchanged(rel, f, meta["sha256"]):
            if before.st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
                raise SoraError(f"{f} does not match its manifest hash (truncated or replaced): re-run sora-export")
            record.note(rel, f, before, meta["sha256"], started)
        verified[rel] = identity(before)
    record.save()
    return verified

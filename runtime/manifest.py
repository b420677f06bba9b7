"""manifest.json: what an engine directory holds, and the checks that refuse a directory that is not what it says.

An engine directory is trusted because its files hash to what its manifest records, never because files with the
right names exist. `write_manifest` is called by export; `load_manifest` by every runtime entry point.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .errors import SoraError
from .spec import EngineSpec
from .verified_files import VerifiedFiles

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
CACHE_DIR = ".cache"  # backend compile caches inside an engine directory; not part of its content


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file under root except the manifest and backend caches."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and p.relative_to(root).parts[0] != CACHE_DIR:
            files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, fsync, rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(root: Path, body: dict, files: dict | None = None) -> dict:
    """Write root/manifest.json; `files` reuses hashes already taken of an unchanged tree (default: hash it)."""
    manifest = {"format_version": FORMAT_VERSION, **body, "files": files if files is not None else hash_tree(root)}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


# Engine-entry keys naming files a runtime target adds beside the portable ONNX (built for one target, not carried
# into a build for another): TensorRT plans, ONNX Runtime's CPU graph of the DiT.
TARGET_FILE_KEYS = ("plan", "ort_cpu_file")


class Manifest:
    """A verified manifest: the parsed JSON plus typed accessors for what the runtime needs."""

    def __init__(self, root: Path, data: dict):
        self.root = root
        self.data = data

    @property
    def config(self) -> dict:
        return self.data["pipeline"]

    def spec(self, engine: str) -> EngineSpec:
        return EngineSpec.from_dict(self.data["engines"][engine]["spec"])

    def engine_path(self, engine: str) -> Path:
        return self.root / self.data["engines"][engine]["file"]

    def path_for(self, engine: str, backend: str) -> Path:
        """The file `backend` runs for `engine`: the TensorRT plan, ONNX Runtime's CPU graph where the export wrote
        one (export/choose_backend.py: the DiT with ONNX Runtime's MultiHeadAttention), else the portable ONNX."""
        if backend == "tensorrt":
            return self.plan_path(engine)
        ort_file = self.data["engines"][engine].get("ort_cpu_file")
        if backend == "ort" and ort_file:
            return self.root / ort_file
        return self.engine_path(engine)

    def plan_path(self, engine: str) -> Path:
        """The engine's TensorRT plan (directories built with --backend tensorrt)."""
        plan = self.data["engines"][engine].get("plan")
        if plan is None:
            raise SoraError(f"{self.root} has no TensorRT plan for {engine}: build one with sora-export {self.root} "
                            f"-o {self.root} --backend tensorrt --overwrite")
        return self.root / plan

    def content_key(self, engine: str) -> str:
        """A short hash of an engine's graph and weights files, for naming caches of it."""
        rel = self.data["engines"][engine]["file"]
        parts = [self.data["files"][f]["sha256"] for f in (rel, rel + ".data") if f in self.data["files"]]
        return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]

    @property
    def runtime(self) -> dict:
        """The backend and precision chosen at export (ONNX Runtime fp32 for directories that record none)."""
        return self.data.get("runtime") or {"backend": "ort", "precision": "fp32"}

    @property
    def precision(self) -> dict[str, str]:
        """Graph precision per component ({"transformer": "int8", ...}); directories from before per-component
        precision record one string for all."""
        p = self.data.get("precision", "fp32")
        return dict(p) if isinstance(p, dict) else {c: p for c in ("transformer", "text_encoder", "vae")}

    @property
    def engine_names(self) -> list[str]:
        return list(self.data["engines"])


def load_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Read and (by default) verify every file's hash. Raises SoraError with a one-line reason."""
    root = Path(root)
    if not root.is_dir():
        raise SoraError(f"engine directory {root} does not exist (create one with `sora-export MODEL -o {root}`)")
    path = root / MANIFEST
    if not path.is_file():
        raise SoraError(f"{root} has no {MANIFEST}: not an engine directory written by sora-export")
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        version = data["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SoraError(f"{path} is unreadable or malformed ({type(e).__name__}): re-run sora-export") from None
    if version != FORMAT_VERSION:
        raise SoraError(f"{path} has format version {version}; this runtime reads {FORMAT_VERSION}: re-export")
    if verify:
        _verify_files(root, files)
    return Manifest(root, data)


def _verify_files(root: Path, files: dict) -> None:
    """Every listed file present with the size and sha256 the manifest records; files recorded as already hashed
    and untouched since are not read again (runtime/verified_files.py)."""
    verified = VerifiedFiles(root / CACHE_DIR)
    for rel, meta in files.items():
        f = root / rel
        if not f.is_file():
            raise SoraError(f"{f} is listed in the manifest but missing: the engine directory is incomplete")
        if verified.unchanged(rel, f, meta["sha256"]):
            continue
        started, before = time.time(), f.stat()
        if before.st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise SoraError(f"{f} does not match its manifest hash (truncated or replaced): re-run sora-export")
        verified.note(rel, f, before, meta["sha256"], started)
    verified.save()

"""Traced graphs kept between exports of the same checkpoint, keyed by content.

Tracing is most of an export (about 55 of the 60 seconds for the test models, minutes at real size), and the graph
it writes depends only on the content of the component's own checkpoint folder (the text encoder's class besides),
the component, its engine spec, the trace sample and opset, the attention form and the versions of the tracing code
(export/) and its libraries: exporting the same model again with another precision, backend or gate threshold reuses
it, and so does another checkpoint that shares the component (Wan2.2 A14B's high-noise expert, text encoder and VAE
with a Wan2.1 checkpoint of the same weights). The key is a hash of all of these; an entry is the graph and its
external data with their sha256, reused only when both still hash as recorded. Entries are hard links to the
export's own files (no copy of the weights; an entry is never written after it is stored), kept only where the
engine folder and the cache share a file system, in `$XDG_CACHE_HOME/soraedge/traces`, the least recently used
dropped beyond `SORAEDGE_TRACE_CACHE_GB` (runtime/user_cache.py: default 20; 0 turns the cache off).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..runtime.manifest import sha256_file
from ..runtime.safe_files import link_or_copy
from ..runtime.user_cache import cache_home, capacity, prune


def trace_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _folder() -> Path:
    return cache_home() / "traces"


def reuse(key: str, onnx: Path) -> bool:
    """Put the cached graph `key` at `onnx` (+ its .data) if there is an intact one; True if so."""
    entry = _folder() / key
    if not entry.is_dir():
        return False
    try:
        files = json.loads((entry / "entry.json").read_text())["files"]
        intact = all(Path(name).name == name and sha256_file(entry / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        intact = False
    if not intact:  # changed or half-removed: dropped, so this export's trace takes its place
        shutil.rmtree(entry, ignore_errors=True)
        return False
    for name in files:  # named after the engine: `onnx` is that name in another folder
        link_or_copy(entry / name, onnx.parent / name)
    os.utime(entry)  # recently used
    return True


def store(key: str, onnx: Path) -> None:
    """Keep the graph at `onnx` (+ its .data) under `key` by hard links; nothing if the cache is off, the files
    are on another file system, or the cache cannot be written."""
    limit = capacity("SORAEDGE_TRACE_CACHE_GB")
    files = [p for p in (onnx, onnx.with_name(onnx.name + ".data")) if p.exists()]
    if not limit or sum(p.stat().st_size for p in files) > limit:
        return
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".entry-", dir=folder))
    except OSError:
        return
    try:
        for p in files:
            os.link(p, tmp / p.name)
        (tmp / "entry.json").write_text(json.dumps({"files": {p.name: sha256_file(p) for p in files},
                                                    "stored_unix": int(time.time())}))
        os.rename(tmp, folder / key)
    except OSError:  # another file system (no hard link), or another export stored the same key meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return
    prune([e for e in folder.iterdir() if e.is_dir() and not e.name.startswith(".")], limit, keep=folder / key)

"""Where this user's caches live: `$XDG_CACHE_HOME/soraedge` (default `~/.cache/soraedge`), and how big they grow.

Caches are keyed by content and are this machine's own: prompt embeddings (runtime/prompt_cache.py), traced graphs
(export/trace_cache.py) and the backends' compiled models (OpenVINO's blobs, ONNX Runtime's TensorRT engines, a DiT's
weights with LoRAs added: runtime/lora.py), named by the engine's content hash, the backend (or `lora`) and the
precision. Compiled models never live in an engine directory: a directory from elsewhere could otherwise ship a
compiled model that its manifest's hashes do not cover. The traced graphs and the compiled models are kept within a
size each (`SORAEDGE_TRACE_CACHE_GB`, `SORAEDGE_COMPILED_CACHE_GB`, default 20 GB, 0 turns a cache off) by dropping
the least recently used entries: at real sizes one compiled DiT is as large as its weights.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from .errors import SoraError

DEFAULT_GB = {"SORAEDGE_TRACE_CACHE_GB": 20.0, "SORAEDGE_COMPILED_CACHE_GB": 20.0}


def cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soraedge"


def capacity(variable: str) -> float:
    """The bytes a cache may hold: the environment variable `variable` in GB, else its default. A value that is not
    a size is an error, never the default."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return DEFAULT_GB[variable] * 2**30
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not 0 <= gb < math.inf:
        raise SoraError(f"{variable}={raw!r}: expected a size in GB (0 turns the cache off)")
    return gb * 2**30


def check_settings() -> None:
    """Refuse a cache size that is not one, before any work."""
    for variable in DEFAULT_GB:
        capacity(variable)


def prune(entries: list[Path], limit: float, keep: Path | None = None) -> None:
    """Drop the least recently used of `entries` (folders, by modification time) until the rest hold at most `limit`
    bytes; `keep`, the entry in use, stays."""
    sized = []
    for e in entries:
        try:
            sized.append((e.stat().st_mtime, sum(f.stat().st_size for f in e.rglob("*") if f.is_file()), e))
        except OSError:  # removed by a concurrent run
            continue
    total = sum(size for _, size, _ in sized)
    for _, size, e in sorted(sized, key=lambda s: s[0]):
        if total <= limit:
            break
        if keep is not None and e == keep:
            continue
        shutil.rmtree(e, ignore_errors=True)
        total -= size


def compiled_cache(backend: str, engine: str, content_key: str, precision: str) -> Path | None:
    """The folder for one engine's compiled models on one backend at one precision; None when the cache is off."""
    if not capacity("SORAEDGE_COMPILED_CACHE_GB"):
        return None
    return cache_home() / "compiled" / backend / f"{engine}-{content_key}-{precision}"


def compiled_used(folder: Path) -> None:
    """Mark `folder` (compiled_cache's) recently used and keep the compiled models within their size."""
    try:
        os.utime(folder)
        root = folder.parent.parent
        entries = [e for b in root.iterdir() if b.is_dir() for e in b.iterdir() if e.is_dir()]
    except OSError:  # nothing was written (a read-only cache, a backend that compiled nothing to disk)
        return
    prune(entries, capacity("SORAEDGE_COMPILED_CACHE_GB"), keep=folder)

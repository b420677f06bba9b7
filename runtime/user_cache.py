"""Where this user's caches live: `$XDG_CACHE_HOME/soraedge` (default `~/.cache/soraedge`).

Caches are keyed by content and are this machine's own: prompt embeddings (runtime/prompt_cache.py) and the
backends' compiled models (OpenVINO's blobs, ONNX Runtime's TensorRT engines), named by the engine's content hash,
the backend and the precision. Compiled models never live in an engine directory: a directory from elsewhere could
otherwise ship a compiled model that its manifest's hashes do not cover.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soraedge"


def compiled_cache(backend: str, engine: str, content_key: str, precision: str) -> Path:
    """The folder for one engine's compiled models on one backend at one precision."""
    return cache_home() / "compiled" / backend / f"{engine}-{content_key}-{precision}"

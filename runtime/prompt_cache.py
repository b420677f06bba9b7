"""On-disk cache of prompt embeddings, so repeated or batch generations skip the text encoder entirely.

Keyed by content: the text encoder engine's content hash, the tokenizer file's hash and the sequence length name a
folder; the sha256 of the exact prompt text names the entry. Entries are written to a unique temp file and renamed
(safe under concurrent runs); an unreadable or mis-shaped entry is ignored and rewritten; the folder is kept under
a byte budget by evicting the least recently used entries.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soraedge" / "prompts"


class PromptCache:
    def __init__(self, root: Path, key: str, shape: tuple[int, int], max_bytes: int = 512 << 20):
        self.dir = Path(root) / key
        self.shape = shape  # [L, D] of one prompt's embedding
        self.max_bytes = max_bytes

    def _path(self, text: str) -> Path:
        return self.dir / f"{hashlib.sha256(text.encode()).hexdigest()}.npy"

    def get(self, text: str) -> np.ndarray | None:
        path = self._path(text)
        try:
            emb = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if emb.shape != self.shape or emb.dtype != np.float32:
            return None  # damaged or from another layout: rewritten by the next put
        try:
            os.utime(path)  # recency for eviction
        except OSError:
            pass  # evicted by a concurrent run, or a read-only cache: the entry is still good
        return emb

    def put(self, text: str, emb: np.ndarray) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb.astype(np.float32))
            os.replace(tmp, self._path(text))
            self._evict()
        except OSError:
            pass  # a cache that cannot be written is only a slower run

    def _evict(self) -> None:
        entries = sorted(self.dir.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for p in entries:
            if total <= self.max_bytes:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)

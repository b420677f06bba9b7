"""On-disk cache of prompt embeddings, so repeated or batch generations skip the text encoder entirely.

Keyed by content: the text encoder engine's content hash, the tokenizer file's hash and the sequence length name a
folder; the sha256 of the exact prompt text names the entry. Entries are written to a unique temp file and renamed
(safe under concurrent runs; removed when the write fails); an unreadable, mis-shaped or non-finite entry is ignored
and rewritten; the folder is kept under a byte budget by evicting the least recently used files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import numpy as np

from .safe_files import temp_beside
from .user_cache import cache_home

STALE_TMP_S = 3600  # a temp file this old belongs to no running put


def default_cache_dir() -> Path:
    return cache_home() / "prompts"


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
        if emb.shape != self.shape or emb.dtype != np.float32 or not np.isfinite(emb).all():
            return None  # damaged or from another layout: rewritten by the next put
        try:
            os.utime(path)  # recency for eviction
        except OSError:
            pass  # evicted by a concurrent run, or a read-only cache: the entry is still good
        return emb

    def put(self, text: str, emb: np.ndarray) -> None:
        path = self._path(text)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with temp_beside(path) as (fd, tmp):  # removed on any failure (a full disk included)
                with os.fdopen(os.dup(fd), "wb") as f:
                    np.save(f, emb.astype(np.float32))
                os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written is only a slower run
        with contextlib.suppress(OSError):
            self._evict()  # after a failed write too: a full disk gets room back

    def _evict(self) -> None:
        """Oldest first until the folder is within budget. Every file counts, the temp files that a killed run
        left behind too (those older than STALE_TMP_S are removed outright)."""
        now = time.time()
        entries = []
        for p in self.dir.glob("*"):
            try:
                st = p.stat()
            except OSError:
                continue  # evicted by a concurrent run
            if p.name.startswith(".") and now - st.st_mtime > STALE_TMP_S:
                p.unlink(missing_ok=True)
            else:
                entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            total -= size
            p.unlink(missing_ok=True)

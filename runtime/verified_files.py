"""The engine files a load has already hashed, recorded by their stat identity, so that loading an unchanged engine
directory does not read every weight again.

`load_manifest` checks each file against the sha256 its manifest records. A real model's engines are tens of GB,
several seconds of hashing on every `sora-run`. Once a file has hashed to the manifest's value, its identity (device,
inode, size, mtime and ctime in nanoseconds) is recorded beside that hash in `<root>/.cache/verified.json`. A later
load skips a file only when both its identity and the hash the manifest expects are unchanged, as git's index does
for its work tree. Writing a file, renaming or copying another onto its name, or setting its mtime back all give it
a new ctime (which no user-level call can set), so it is hashed again.

A file changed within a second of being hashed is not recorded, because filesystem timestamps are coarse. The record
sits in the directory's cache folder, outside its content, and is only an optimisation. An unreadable record counts
as empty, and a directory that cannot be written is simply hashed on every load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RECORD = "verified.json"
SETTLE_S = 1.0  # a file whose ctime is this recent when hashing starts is not recorded


def identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class VerifiedFiles:
    """{relative path: {"stat": identity, "sha256": hash}} of one engine directory, read from and saved to
    `cache_dir`/verified.json."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / RECORD
        self.entries = self._read()
        self.changed = False

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def unchanged(self, rel: str, path: Path, sha256: str) -> bool:
        """True when `path` was recorded as hashing to `sha256` and has not been touched since."""
        entry = self.entries.get(rel)
        return entry == {"stat": identity(os.stat(path)), "sha256": sha256}

    def note(self, rel: str, path: Path, before: os.stat_result, sha256: str, started: float) -> None:
        """Record that `path`, stat'ed as `before` when hashing `started` (time.time()), hashed to `sha256`: only if
        it did not change while being hashed and its last change is older than the timestamps' resolution;
        otherwise forget what was recorded of it."""
        if identity(os.stat(path)) != identity(before) or before.st_ctime_ns / 1e9 > started - SETTLE_S:
            self.changed |= self.entries.pop(rel, None) is not None  # a stale entry goes
            return
        self.entries[rel] = {"stat": identity(before), "sha256": sha256}
        self.changed = True

    def save(self) -> None:
        """Replace the record atomically; nothing happens where the folder cannot be written."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{RECORD}.", dir=self.path.parent)
        except OSError:
            return
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f, indent=1)
            os.replace(tmp, self.path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)

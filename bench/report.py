"""Save a bench result as results/<name>_<tag>.json (everything measured) and .md (the table), and print the table."""

from __future__ import annotations

import json
from pathlib import Path


def save(results: Path, name: str, tag: str, result: dict, markdown: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}_{tag}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (results / f"{name}_{tag}.md").write_text(markdown)
    print(markdown)

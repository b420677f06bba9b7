"""Save a bench result as results/<name>_<tag>.json (everything measured) and .md (the table), and print the table;
the `--tag`/`--results` options every bench CLI takes to say where."""

from __future__ import annotations

import json
from pathlib import Path

import click

RESULTS = Path(__file__).parent / "results"


def result_options(name: str, default_tag: str = "cpu"):
    """Decorator adding `--tag` and `--results` to a bench CLI whose results are saved as `name` (see `save`)."""
    def add(command):
        command = click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
                               help="Folder the results are written to (default: bench/results).")(command)
        return click.option("--tag", default=default_tag, show_default=True,
                            help=f"Results go to <results>/{name}_<tag>.json and .md.")(command)
    return add


def save(results: Path, name: str, tag: str, result: dict, markdown: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}_{tag}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (results / f"{name}_{tag}.md").write_text(markdown)
    print(markdown)

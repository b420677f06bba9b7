"""Measurements taken in fresh processes: each child's peak host memory (VmHWM) is its own.

`run_child` runs a code string in a new Python process and returns the JSON its last line prints (or the error and
the last lines it wrote when it fails or is killed); the code reports its peak with `peak_gb`. `table` writes such
runs as one Markdown table (the machine they ran on: harness.py's `host`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable


def peak_gb() -> float:
    """This process's peak resident memory so far (VmHWM), in GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def run_child(root: Path, code: str, *args: str) -> dict:
    """`code` in a fresh Python process with `root` and `args` as its argv; the JSON its last line prints."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", code, str(root), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        why = "killed (out of memory)" if proc.returncode == -9 else f"exit {proc.returncode}"
        return {"error": f"{why}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}",
                "stderr": proc.stderr.strip().splitlines()[-40:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(first: str, runs: dict[str, dict], result_of: Callable[[dict], str]) -> list[str]:
    """Markdown lines: one row per run (its name, peak, wall time, and `result_of(run)` or why it failed)."""
    lines = [f"| {first} | Peak host memory (GB) | Wall time (s) | Result |", "|---|---|---|---|"]
    for name, run in runs.items():
        peak, wall = (f"{run['vm_hwm_gb']:.2f}", f"{run['seconds']:.0f}") if "seconds" in run else ("-", "-")
        result = f"failed: {run['error']}" if run.get("error") else result_of(run)
        lines.append(f"| {name} | {peak} | {wall} | {result} |")
    return lines

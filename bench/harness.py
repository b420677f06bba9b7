"""What every bench shares, in one place: the scenarios (a model of export/tiny_wan.py's table at one shape), the
timers, the machine and library versions, and the results folder: files named `<bench>_<scenario>_<machine>_<date>`
(`-2`, `-3` for later runs the same day; nothing is overwritten) with the command that produced them, and an index
generated from them (`results/README.md`).

    python -m soraedge.bench.harness    # regenerate results/README.md from the JSON files
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from ..runtime.errors import SoraError
from ..runtime.machine import machine
from ..runtime.validate import latent_grid

RESULTS = Path(__file__).parent / "results"
INDEX = "README.md"
NAME = re.compile(r"^(?P<bench>[a-z0-9_]+?)_(?P<scenario>[A-Za-z0-9.\-]+)_(?P<machine>[a-z0-9\-]+)_"
                  r"(?P<date>\d{4}-\d\d-\d\d)(?:-(?P<run>\d+))?$")


@dataclass(frozen=True)
class Scenario:
    """A model of export/tiny_wan.py's TINY_CONFIGS (one name, one model: the transformer `build_tiny_wan` writes for
    it, same seed, same weights) at one video shape, with the CFG batch of 2 and Wan's 512 text tokens."""

    model: str
    frames: int
    height: int
    width: int
    text_len: int = 512
    batch: int = 2

    def config(self):
        from ..export.tiny_wan import TINY_CONFIGS

        return TINY_CONFIGS[self.model]

    def dit_config(self) -> dict:
        from ..export.tiny_wan import dit_config

        return dit_config(self.config())

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """[B, C, f, h, w] of the model's Wan VAE (4x temporal; 8x spatial, Wan2.2's 16x)."""
        return (self.batch, self.config().latent_channels,
                *latent_grid(self.frames, self.height, self.width, 4, self.config().vae_scale_spatial))

    @property
    def tokens(self) -> int:
        _, _, f, h, w = self.latent_shape
        pf, ph, pw = self.config().patch
        return (f // pf) * (h // ph) * (w // pw)

    def dit_inputs(self) -> dict[str, np.ndarray]:
        """The DiT's inputs at a fixed seed (latents, a timestep of 900, text states)."""
        rng = np.random.default_rng(0)
        lat = self.latent_shape
        return {"hidden_states": rng.standard_normal(lat, dtype=np.float32),
                "timestep": np.full((self.batch,), 900.0, np.float32),
                "encoder_hidden_states": rng.standard_normal((self.batch, self.text_len, self.config().text_dim),
                                                             dtype=np.float32)}


# The DiT-step scenarios; benches of a whole pipeline name theirs `shape_name(model, ...)`.
SCENARIOS = {
    # hidden 384 = 6 heads x 64, Wan's FFN ratio, 17 frames of 256x256 -> 5 x 32 x 32 latents -> 1280 tokens
    "wan-384x6-1280tok": Scenario("wan-384x6", 17, 256, 256),
    "wan-384x6-320tok": Scenario("wan-384x6", 5, 128, 256),
    # Wan2.1-T2V-1.3B's layer shape, 4 of its 30 layers; and its whole transformer (the GPU verification's DiT)
    "wan-1.3b-4layers-1280tok": Scenario("wan21-1.3b-4layers", 17, 256, 256),
    "wan-1.3b-1280tok": Scenario("wan21-1.3b-shapes", 17, 256, 256),
    # Wan2.2-TI2V-5B's layer shape, 2 of its 30 layers (its VAE compresses 16x: 512x512 makes the same 1280 tokens)
    "wan-5b-2layers-1280tok": Scenario("wan22-ti2v-5b-2layers", 17, 512, 512),
    "tiny": Scenario("tiny-a", 5, 32, 48, text_len=16),
}
DEFAULT_SCENARIO = "wan-384x6-1280tok"


def build_scenario_model(sc: Scenario, tmp: Path):
    """The scenario's transformer (export/tiny_wan.py's, seeded), saved as tmp/transformer for the exporter;
    returned for eager runs."""
    from ..export.tiny_wan import build_transformer

    model = build_transformer(sc.config()).eval()
    model.save_pretrained(tmp / "transformer")
    return model


def export_scenario_dit(sc: Scenario, tmp: Path):
    """Export tmp/transformer to tmp/dit.onnx with a spec covering the scenario's shape; returns the spec."""
    from ..export.dit import AttentionForm, dit_spec, load_dit
    from ..export.onnx_export import export_onnx
    from ..runtime.spec import Dim

    _, _, f, h, w = sc.latent_shape
    spec = dit_spec(sc.dit_config(), sc.text_len, Dim("f", 1, f, max(f, 21)), Dim("h", 2, h, max(h, 160), 2),
                    Dim("w", 2, w, max(w, 160), 2))
    export_onnx(load_dit(tmp, AttentionForm.ONNX), spec, tmp / "dit.onnx", 23, {"b": 2, "f": 2, "h": 4, "w": 6})
    return spec


def shape_name(model: str, frames: int | None = None, height: int | None = None, width: int | None = None) -> str:
    """A scenario name for a model at a shape: `demo-17x64x64`; the model alone where the bench picks the shape."""
    name = Path(model).name if os.sep in model else model
    return f"{name}-{frames}x{height}x{width}" if frames and height and width else name


def scenario_options(fn):
    """--scenario (one of SCENARIOS) and --threads, as every CPU DiT bench takes them."""
    fn = click.option("--threads", type=int, default=os.cpu_count(), show_default=True)(fn)
    return click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), default=DEFAULT_SCENARIO,
                        show_default=True)(fn)


# ---- the timers

def time_calls(fn, repeats: int) -> tuple[dict, object]:
    """(median/p95 seconds of `fn` over `repeats` calls after one warm-up call, warm-up seconds; the warm-up
    call's output)."""
    t0 = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {**summary(times), "warmup_s": warm, "repeats": repeats}, out


def time_interleaved(calls: dict, repeats: int, gap_s: float = 0.3) -> tuple[dict, dict]:
    """Each of `calls` ({key: fn}, every engine already open) once as warm-up, then all in turn `repeats` times with
    a pause before each call (the previous library's worker threads stop spinning): on a small shared machine,
    timing one engine after another let drift between minutes move ratios by 10% or more. Returns
    ({key: median/p95/min seconds}, {key: warm-up output})."""
    outs, warmup, times = {}, {}, {k: [] for k in calls}
    for key, fn in calls.items():
        t0 = time.perf_counter()
        outs[key] = fn()
        warmup[key] = time.perf_counter() - t0
    for _ in range(repeats):
        for key, fn in calls.items():
            time.sleep(gap_s)
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: {**summary(v), "min_s": float(min(v)), "warmup_s": warmup[k], "repeats": repeats}
            for k, v in times.items()}, outs


def summary(seconds: list[float]) -> dict:
    return {"median_s": float(np.median(seconds)), "p95_s": float(np.percentile(seconds, 95))}


# ---- the machine and the libraries

def versions() -> dict:
    import diffusers
    import onnxruntime
    import torch

    from .. import __version__

    v = {"soraedge": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
         "onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        v["openvino"] = openvino.__version__
    except ImportError:
        pass
    return v


def host() -> dict:
    """The machine (runtime/machine.py) and its total memory in GiB."""
    meminfo = Path("/proc/meminfo").read_text().split()
    return {**machine(), "memory_gb": int(meminfo[1]) / 2**20}


def machine_name(m: dict | None = None) -> str:
    """The machine as a results file names it: the GPU's name where there is one (`nvidia-h200`), else the CPU's
    with its core count (`amd-epyc-2c`)."""
    m = m if m is not None else machine()
    if m.get("gpu"):
        return _slug(m["gpu"]["name"])
    words = [w for w in re.split(r"[^A-Za-z0-9]+", m["cpu"].split("@")[0])
             if w and w.lower() not in ("r", "tm", "cpu", "processor")]
    return f"{_slug(' '.join(words))}-{m['cores']}c"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


# ---- results

def results_option(command):
    """`--results`, the folder every bench CLI writes to."""
    return click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
                        show_default="bench/results",
                        help="Folder the results and their index are written to.")(command)


def save(bench: str, scenario: str, result: dict, markdown: str, results: Path = RESULTS, figure=None) -> Path:
    """Write `result` (JSON, with the bench, scenario, machine, date and command added) and `markdown` under a new
    name, `figure(path)` beside them if given, regenerate the index, print the table; returns the JSON's path."""
    m = result.get("machine") if isinstance(result.get("machine"), dict) else machine()
    date = datetime.date.today().isoformat()
    stem = f"{bench}_{_slug_scenario(scenario)}_{machine_name(m)}_{date}"
    results.mkdir(parents=True, exist_ok=True)
    run = 1
    while (results / f"{stem}{f'-{run}' if run > 1 else ''}.json").exists():
        run += 1
    stem += f"-{run}" if run > 1 else ""
    record = {"bench": bench, "scenario": scenario, "date": date, "command": _command(), **result, "machine": m}
    (results / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (results / f"{stem}.md").write_text(markdown)
    if figure is not None:
        figure(results / f"{stem}.png")
    write_index(results)
    print(markdown)
    return results / f"{stem}.json"


def _slug_scenario(scenario: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "-", scenario).strip("-")


def _command() -> str:
    """The command line that is running, as a user would type it."""
    argv0 = Path(sys.argv[0])
    head = [f"python -m soraedge.bench.{argv0.stem}"] if argv0.suffix == ".py" else [argv0.name]
    return " ".join(head + [shlex.quote(a) for a in sys.argv[1:]])


def index_rows(results: Path) -> list[dict]:
    """One row per result, sorted by bench, scenario and date; files that do not follow the naming are refused."""
    rows = []
    for path in sorted(results.glob("*.json")):
        match = NAME.match(path.stem)
        if match is None or not (Path(__file__).parent / f"{match['bench']}.py").is_file():  # a bench's module
            raise SoraError(f"{results}: {path.name} is not a result of these benches (named <bench>_<scenario>_"
                            f"<machine>_<date>[-run].json): write the results to a folder of their own")
        record = json.loads(path.read_text())
        rows.append({**match.groupdict(), "stem": path.stem, "threads": record.get("threads"),
                     "command": record.get("command", ""), "run": int(match["run"] or 1),
                     "files": sorted(p.suffix[1:] for p in results.glob(f"{path.stem}.*"))})
    return sorted(rows, key=lambda r: (r["bench"], r["scenario"], r["date"], r["run"], r["machine"]))


def index_markdown(results: Path) -> str:
    lines = ["# Bench results", "",
             "Generated from the JSON files by `python -m soraedge.bench.harness` (every bench run regenerates it). "
             "Each JSON holds everything measured, the machine, the library versions and the command that "
             "produced it; the Markdown beside it is its table. Compare rows within one file: the machine is shared "
             "and its speed varies from day to day.", "",
             "| bench | scenario | machine | date | threads | command | files |", "|---|---|---|---|---|---|---|"]
    for r in index_rows(results):
        date = r["date"] + (f" ({r['run']})" if r["run"] > 1 else "")
        files = ", ".join(f"[{ext}]({r['stem']}.{ext})" for ext in r["files"])
        command = f"`{r['command']}`" if r["command"] else ""
        lines.append(f"| {r['bench']} | {r['scenario']} | {r['machine']} | {date} | {r['threads'] or ''} | "
                     f"{command.replace('|', '&#124;')} | {files} |")
    return "\n".join(lines) + "\n"


def write_index(results: Path = RESULTS) -> Path:
    path = results / INDEX
    path.write_text(index_markdown(results))
    return path


if __name__ == "__main__":
    print(write_index())

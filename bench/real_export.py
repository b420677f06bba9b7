"""A real Wan2.1-T2V-1.3B layout with random weights, exported and run end to end on this machine: peak host
memory and wall time of `sora-export` (defaults: `--precision auto`) and of a small `sora-run --low-memory`.

The layout is the public checkpoint's: the umT5-XXL text encoder (5.7B parameters) stored bf16 in shards, the
1.3B DiT stored fp32 in shards, the Wan2.1 VAE (diffusers' default AutoencoderKLWan configuration) and a
UniPC scheduler; the tokenizer is the test models' (no hub access here; the ids it produces are valid umT5 ids).
Each command runs in its own fresh process, so each peak (VmHWM) is that command's alone. Writes
bench/results/ (JSON + Markdown).

    python -m soraedge.bench.real_export [--workdir DIR] [--size 128x128x5] [--steps 2]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click

from ..export.tiny_wan import REAL_DIT_CONFIGS, REAL_TEXT_ENCODER_CONFIGS
from .children import run_child, table
from .export_memory import write_random_checkpoint
from .harness import host, results_option, save, shape_name

VAE_CONFIG: dict = {}  # diffusers' AutoencoderKLWan defaults: the Wan2.1 VAE

COMMAND = """
import contextlib, io, json, sys, time
from pathlib import Path
t0 = time.perf_counter()
which, args = sys.argv[2], sys.argv[3:]
if which == "export":
    from soraedge.cli.export_cmd import main
else:
    from soraedge.cli.run_cmd import main

from soraedge.bench.children import peak_gb

class Lines(io.StringIO):  # each line the command prints, with the process's peak so far (stderr: kept if killed)
    def write(self, text):
        for line in text.splitlines():
            if line.strip():
                print(f"[{time.perf_counter() - t0:6.0f} s, peak {peak_gb():.2f} GB] {line}", file=sys.stderr,
                      flush=True)
        return super().write(text)

out = Lines()
with contextlib.redirect_stdout(out):
    try:
        main(args, standalone_mode=False)
        error = None
    except SystemExit as e:  # the CLIs exit non-zero with their one-line error (on stderr)
        error = f"exit {e.code}"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
print(json.dumps({"seconds": time.perf_counter() - t0, "vm_hwm_gb": peak_gb(), "error": error,
                  "output": out.getvalue().splitlines()}))
"""


def write_layout(root: Path) -> dict:
    """The checkpoint folder at `root`, with random weights in the real configurations."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from ..export.tiny_wan import build_tiny_wan

    build_tiny_wan(root, "tiny-a")  # model_index.json, tokenizer, scheduler; its weights are replaced below
    info = {}
    for comp, cls, config, dtype, prefix in (
            ("text_encoder", UMT5EncoderModel, REAL_TEXT_ENCODER_CONFIGS["umt5-xxl"], "bf16", "model"),
            ("transformer", WanTransformer3DModel, REAL_DIT_CONFIGS["wan2.1-1.3b"], "fp32", "diffusion_pytorch_model"),
            ("vae", AutoencoderKLWan, VAE_CONFIG, "fp32", "diffusion_pytorch_model")):
        shutil.rmtree(root / comp)
        info[comp] = {**write_random_checkpoint(root / comp, cls, config, dtype, prefix), "dtype": dtype}
    return info


def to_markdown(r: dict) -> str:
    m = r["machine"]
    parts = ", ".join(f"{c} {i['parameters'] / 1e9:.2f}B stored {i['dtype']} in {i['shards']} shard(s)"
                      for c, i in r["layout"].items())
    lines = ["### Real Wan2.1-T2V-1.3B layout, random weights: export and generation on the CPU", "",
             f"{parts}. {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB; each command in a fresh process, "
             f"peak = VmHWM; {r['date']}.", "",
             *table("Command", {f"`{name}`": c for name, c in r["commands"].items()}, lambda c: "ok")]
    for name, c in r["commands"].items():
        lines += ["", f"`{name}` printed:", "", "```", *c.get("output", c.get("stderr", [])), "```"]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the checkpoint and the engines go (default: a temporary folder; needs about 50 GB).")
@click.option("--size", default="128x128x5", show_default=True, help="HEIGHTxWIDTHxFRAMES of the export's defaults "
              "and the generation.")
@click.option("--steps", default=2, show_default=True)
@results_option
def main(workdir, size, steps, results):
    height, width, frames = size.split("x")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root, engines = Path(tmp) / "Wan2.1-T2V-1.3B-random", Path(tmp) / "engines"
        t0 = time.perf_counter()
        layout = write_layout(root)
        print(f"layout written in {time.perf_counter() - t0:.0f} s: {layout}")
        export = ["sora-export", str(root), "-o", str(engines), "--height", height, "--width", width,
                  "--frames", frames]
        run = ["sora-run", "--engines", str(engines), "--prompt", "a red fox runs along the beach", "--low-memory",
               "--steps", str(steps), "-o", str(Path(tmp) / "video.mp4")]
        commands = {" ".join(export[:1] + ["MODEL"] + export[4:]): run_child(root, COMMAND, "export", *export[1:])}
        print(commands)
        if not next(iter(commands.values())).get("error"):
            commands[" ".join(run[:1] + run[3:-2])] = run_child(root, COMMAND, "run", *run[1:])
            print(commands)
    result = {"layout": layout, "size": size, "steps": steps, "commands": commands, "date": time.strftime("%Y-%m-%d"),
              "machine": host()}
    scenario = shape_name("wan2.1-t2v-1.3b", int(frames), int(height), int(width))
    save("real_export", scenario, result, to_markdown(result), results)


if __name__ == "__main__":
    main()

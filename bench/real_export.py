"""A real Wan2.1 layout with random weights, exported (and run end to end where it fits) on this machine: peak host
memory and wall time of `sora-export` and of a small `sora-run --low-memory`.

`--layout wan2.1-t2v-1.3b` is the public checkpoint's: the umT5-XXL text encoder (5.7B parameters) stored bf16 in
shards, the 1.3B DiT stored fp32 in shards, the Wan2.1 VAE (diffusers' default AutoencoderKLWan configuration);
exported with the defaults (`--precision auto`) and run. `--layout wan2.1-t2v-14b` is the 14B DiT's (40 layers,
width 5120; Wan2.2 A14B's experts have its shape) stored bf16 in shards as released, exported for a GPU target
(`--onnx-only --dit-precision fp16`: written in fp16 as its weights stream, 28.6 GB beside a 28.6 GB checkpoint)
and not run (its weights alone exceed this machine's memory); its text encoder is umT5-XXL's configuration with 2
layers (the whole encoder is measured in the 1.3B layout; in full its fp32 export would not fit this disk beside
the DiT). `--layout wan2.2-ti2v-5b` is TI2V-5B's DiT (30 layers, width 3072, 48 latent channels, bf16 shards) and
the Wan2.2 VAE in a TI2V pipeline (`expand_timesteps`), exported the same way. Both use a UniPC scheduler and
the test models' tokenizer (no hub access here; the ids it produces are valid umT5 ids). Each command runs in its
own fresh process, so each peak (VmHWM) is that command's alone. Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.real_export [--layout wan2.1-t2v-1.3b] [--workdir DIR] [--size 128x128x5] [--steps 2]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..export.tiny_wan import REAL_DIT_CONFIGS, REAL_TEXT_ENCODER_CONFIGS, REAL_VAE_CONFIGS
from .children import run_child, table
from .export_memory import write_random_checkpoint
from .harness import host, results_option, save, shape_name


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


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: each component's configuration and stored dtype, what the export is asked for beyond
    the shape, and whether the result is run here."""

    title: str
    dit: str  # REAL_DIT_CONFIGS key
    dit_dtype: str
    text_encoder: dict = field(default_factory=lambda: REAL_TEXT_ENCODER_CONFIGS["umt5-xxl"])
    export_options: tuple[str, ...] = ()
    run: bool = True
    vae: str = "wan2.1"  # REAL_VAE_CONFIGS key
    pipeline: str = "tiny-a"  # the test model whose model_index.json, tokenizer and scheduler the layout takes


LAYOUTS = {
    "wan2.1-t2v-1.3b": Layout("Real Wan2.1-T2V-1.3B layout", "wan2.1-1.3b", "fp32"),
    "wan2.1-t2v-14b": Layout("Wan2.1-T2V-14B's DiT (the text encoder umT5-XXL's configuration with 2 layers)",
                             "wan2.1-14b", "bf16", {**REAL_TEXT_ENCODER_CONFIGS["umt5-xxl"], "num_layers": 2},
                             ("--onnx-only", "--dit-precision", "fp16"), run=False),
    "wan2.2-ti2v-5b": Layout("Wan2.2-TI2V-5B's DiT and VAE (the text encoder umT5-XXL's configuration with 2 layers)",
                             "wan2.2-ti2v-5b", "bf16", {**REAL_TEXT_ENCODER_CONFIGS["umt5-xxl"], "num_layers": 2},
                             ("--onnx-only", "--dit-precision", "fp16"), run=False, vae="wan2.2",
                             pipeline="tiny-ti2v-a"),
}


def write_layout(root: Path, layout: Layout = LAYOUTS["wan2.1-t2v-1.3b"]) -> dict:
    """The checkpoint folder at `root`, with random weights in the layout's configurations."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from ..export.tiny_wan import build_tiny_wan

    build_tiny_wan(root, layout.pipeline)  # model_index.json, tokenizer, scheduler; its weights are replaced below
    info = {}
    for comp, cls, config, dtype, prefix in (
            ("text_encoder", UMT5EncoderModel, layout.text_encoder, "bf16", "model"),
            ("transformer", WanTransformer3DModel, REAL_DIT_CONFIGS[layout.dit], layout.dit_dtype,
             "diffusion_pytorch_model"),
            ("vae", AutoencoderKLWan, REAL_VAE_CONFIGS[layout.vae], "fp32", "diffusion_pytorch_model")):
        shutil.rmtree(root / comp)
        info[comp] = {**write_random_checkpoint(root / comp, cls, config, dtype, prefix), "dtype": dtype}
    return info


def written(engines: Path) -> dict:
    """Each ONNX graph of an engine directory: its weights' bytes and the types they are stored in."""
    import onnx

    out = {}
    for graph in sorted(engines.glob("*.onnx")):
        model = onnx.load(str(graph), load_external_data=False)
        data = graph.with_name(graph.name + ".data")
        types = sorted({onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in model.graph.initializer})
        out[graph.name] = {"weight_bytes": data.stat().st_size if data.exists() else 0, "types": types}
    return out


def to_markdown(r: dict) -> str:
    m = r["machine"]
    parts = ", ".join(f"{c} {i['parameters'] / 1e9:.2f}B stored {i['dtype']} in {i['shards']} shard(s)"
                      for c, i in r["layout"].items())
    lines = [f"### {r['title']}, random weights: export{' and generation' if len(r['commands']) > 1 else ''} on "
             f"the CPU", "",
             f"{parts}. {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB; each command in a fresh process, "
             f"peak = VmHWM; {r['date']}.", "",
             *table("Command", {f"`{name}`": c for name, c in r["commands"].items()}, lambda c: "ok")]
    if r.get("written"):
        lines += ["", "Written: " + ", ".join(f"{name} {w['weight_bytes'] / 1e9:.2f} GB of weights "
                                                f"({'/'.join(w['types'])})" for name, w in r["written"].items()) + "."]
    for name, c in r["commands"].items():
        lines += ["", f"`{name}` printed:", "", "```", *c.get("output", c.get("stderr", [])), "```"]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--layout", type=click.Choice(sorted(LAYOUTS)), default="wan2.1-t2v-1.3b", show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the checkpoint and the engines go (default: a temporary folder; needs about 50 GB for "
                   "the 1.3B layout, 65 GB for the 14B one).")
@click.option("--size", default="128x128x5", show_default=True, help="HEIGHTxWIDTHxFRAMES of the export's defaults "
              "and the generation.")
@click.option("--steps", default=2, show_default=True)
@results_option
def main(layout, workdir, size, steps, results):
    height, width, frames = size.split("x")
    chosen = LAYOUTS[layout]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root, engines = Path(tmp) / f"{layout}-random", Path(tmp) / "engines"
        t0 = time.perf_counter()
        info = write_layout(root, chosen)
        print(f"layout written in {time.perf_counter() - t0:.0f} s: {info}")
        export = ["sora-export", str(root), "-o", str(engines), "--height", height, "--width", width,
                  "--frames", frames, *chosen.export_options]
        run = ["sora-run", "--engines", str(engines), "--prompt", "a red fox runs along the beach", "--low-memory",
               "--steps", str(steps), "-o", str(Path(tmp) / "video.mp4")]
        commands = {" ".join(export[:1] + ["MODEL"] + export[4:]): run_child(root, COMMAND, "export", *export[1:])}
        print(commands)
        exported = not next(iter(commands.values())).get("error")
        files = written(engines) if exported else {}
        if exported and chosen.run:
            commands[" ".join(run[:1] + run[3:-2])] = run_child(root, COMMAND, "run", *run[1:])
            print(commands)
    result = {"title": chosen.title, "layout": info, "size": size, "steps": steps, "commands": commands,
              "written": files, "date": time.strftime("%Y-%m-%d"), "machine": host()}
    scenario = shape_name(layout, int(frames), int(height), int(width))
    save("real_export", scenario, result, to_markdown(result), results)


if __name__ == "__main__":
    main()

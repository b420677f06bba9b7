"""Peak memory of chunked VAE decoding against frame count, with frames streamed to an mp4 as they are decoded.

Builds the real Wan2.1 VAE configuration (AutoencoderKLWan defaults: base_dim 96, dim_mult [1,2,4,4]) with random
weights, exports the chunked decoder at the given size, then decodes each frame count in its own fresh process
(one process per measurement, so each high-water mark is that decode's alone) and reports VmHWM and time.
Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.vae_memory [--height 480 --width 832] [--frames 9 --frames 81]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from .harness import results_option, save

CHILD = """
import sys, time, json, numpy as np
from soraedge.runtime.backends.ort import OrtEngine
from soraedge.runtime.spec import EngineSpec
from soraedge.runtime.validate import latent_grid
from soraedge.runtime.vae_decode import ChunkedVaeDecoder
from soraedge.runtime.video import VideoWriter
d, frames, h, w, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tile = int(sys.argv[6]) or None
specs = json.load(open(d + "/specs.json"))
dec = ChunkedVaeDecoder(*(OrtEngine(__import__("pathlib").Path(d) / (s["name"] + ".onnx"), EngineSpec.from_dict(s),
                                    threads, arena=False) for s in specs), tile=tile)  # as the runtime opens them
z = np.random.default_rng(0).standard_normal((1, 16, *latent_grid(frames, h, w, 4, 8)), dtype=np.float32)
t0 = time.perf_counter()
with VideoWriter(d + f"/out{frames}.mp4", 16) as out:
    for chunk in dec.chunks(z):
        out.write(np.ascontiguousarray(np.clip(chunk[0] / 2 + 0.5, 0, 1).transpose(1, 2, 3, 0)))
sec = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"frames": frames, "seconds": sec, "vm_hwm_mb": hwm / 1024}))
"""


def export_real_vae(tmp: Path, height: int, width: int, log=print, family: str = "wan2.1"):
    """Save AutoencoderKLWan of a real configuration (export/tiny_wan.py's REAL_VAE_CONFIGS[family], seed 0) to
    tmp/vae and export its chunked decoder to tmp/vae_decoder_{first,step}.onnx for sizes up to max(size, 1280).
    Returns (specs, the diffusers VAE)."""
    import torch
    from diffusers import AutoencoderKLWan

    from ..export.onnx_export import export_onnx
    from ..export.tiny_wan import REAL_VAE_CONFIGS
    from ..export.vae import load_vae_decoders, vae_specs
    from ..runtime.spec import Dim

    torch.manual_seed(0)
    AutoencoderKLWan(**REAL_VAE_CONFIGS[family]).save_pretrained(tmp / "vae")
    first, step, slots, vae = load_vae_decoders(tmp)
    s = vae.config.scale_factor_spatial
    lh, lw = height // s, width // s
    specs = vae_specs(vae.config.z_dim, s, vae.config.scale_factor_temporal, slots, Dim("h", 1, lh, max(lh, 1280 // s)),
                      Dim("w", 1, lw, max(lw, 1280 // s)))
    log("exporting the real-configuration VAE decoder ...")
    for module, spec in zip((first, step), specs):
        export_onnx(module, spec, tmp / f"{spec.name}.onnx", 23, {"h": 4, "w": 6})
    return specs, vae


def measure(height: int, width: int, frames: list[int], threads: int, tile: int | None = None, log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        specs, _ = export_real_vae(tmp, height, width, log)
        (tmp / "specs.json").write_text(json.dumps([s.to_dict() for s in specs]))
        rows = []
        for f in frames:
            log(f"decoding {f} frames at {width}x{height} in a fresh process ...")
            out = subprocess.run([sys.executable, "-c", CHILD, str(tmp), str(f), str(height), str(width),
                                  str(threads), str(tile or 0)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["vm_hwm_mb"]
    for r in rows:
        r["vs_first"] = r["vm_hwm_mb"] / base
    from ..runtime.machine import machine

    return {"machine": machine(), "threads": threads, "height": height, "width": width,
            "vae": "AutoencoderKLWan defaults (Wan2.1 VAE configuration), random weights, fp32, ONNX Runtime CPU",
            "method": "VmHWM of one fresh process per decode (engine load included), frames streamed to mp4",
            "tile": tile,
            "rows": rows}


@click.command()
@click.option("--height", default=480, show_default=True)
@click.option("--width", default=832, show_default=True)
@click.option("--frames", multiple=True, type=int, default=(9, 81), show_default=True)
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@click.option("--tile", type=int, help="Spatial tile in pixels (runtime/vae_decode.py); default: untiled.")
@results_option
def main(height, width, frames, threads, tile, results):
    r = measure(height, width, list(frames), threads, tile, log=lambda m: click.echo(m, err=True))
    save("vae_memory", f"wan2.1-vae-{height}x{width}" + (f"-tile{tile}" if tile else ""), r, to_markdown(r), results)


def to_markdown(r: dict) -> str:
    tiles = f"tiles of {r['tile']} px" if r.get("tile") else "untiled"
    lines = [f"### Chunked VAE decode memory: {r['vae']}", "",
             f"{r['machine']['cpu']}, {r['threads']} threads, {r['width']}x{r['height']}, {tiles}; {r['method']}", "",
             "| frames | seconds | peak RSS MB | vs first |", "|---|---|---|---|"]
    lines += [f"| {x['frames']} | {x['seconds']:.1f} | {x['vm_hwm_mb']:.0f} | {x['vs_first']:.2f}x |"
              for x in r["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

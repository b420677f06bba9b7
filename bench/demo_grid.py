"""A picture a person can judge at a glance: frames of the demo's videos for a dozen prompts, one row each.

    python -m soraedge.bench.demo_grid --engines engines/demo -o docs/demo-grid.png [--seed 7] [--steps N]

Generates from the engines alone (the runtime's Pipeline: no PyTorch), every held-out colour x shape x motion
combination (never seen in training), and writes one PNG: per row the prompt, what the probe (demo/probe.py) read
back (colour, shape, motion: the asked value or, where it differs, what was seen), and every third frame, scaled up
without smoothing so that halos and soft edges stay visible.
"""

from __future__ import annotations

import io
from pathlib import Path

import click
import numpy as np

from ..cli.common import cli_errors
from ..runtime.errors import SoraError
from ..runtime.safe_files import atomic_write_bytes

SCALE = 2  # pixels per generated pixel
FRAME_STEP = 3  # every third frame of the clip
LABEL_WIDTH = 430
GAP = 4


def rows(engines: Path, seed: int, steps: int | None, threads: int | None) -> list[tuple[str, np.ndarray]]:
    """[(label, uint8 frames [F, H, W, 3])] for the held-out scenes."""
    from ..runtime.pipeline import Pipeline
    from ..runtime.video import to_uint8
    from ..demo.probe import read_video
    from ..demo.toy_world import HELD_OUT

    pipe = Pipeline.load(engines, threads=threads)
    out = []
    for scene in HELD_OUT:
        frames = to_uint8(pipe(scene.caption, seed=seed, steps=steps).frames)
        v = read_video(frames)
        seen = [want if got == want else f"{got or 'nothing'} (asked {want})"
                for got, want in ((v.colour, scene.colour), (v.shape, scene.shape), (v.motion, scene.motion))]
        out.append((f"{scene.caption.removesuffix(' on a black background')}\nprobe: {', '.join(seen)}", frames))
    return out


def draw(labelled: list[tuple[str, np.ndarray]]):
    from PIL import Image, ImageDraw

    picks = [frames[::FRAME_STEP] for _, frames in labelled]
    n, (h, w) = max(len(p) for p in picks), picks[0].shape[1:3]
    cell_h, cell_w = h * SCALE + GAP, w * SCALE + GAP
    image = Image.new("RGB", (LABEL_WIDTH + n * cell_w, len(labelled) * cell_h), (40, 40, 40))
    pen = ImageDraw.Draw(image)
    for r, ((label, _), frames) in enumerate(zip(labelled, picks)):
        pen.multiline_text((6, r * cell_h + 6), label, fill=(230, 230, 230), spacing=6)
        for c, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((w * SCALE, h * SCALE), Image.NEAREST)
            image.paste(tile, (LABEL_WIDTH + c * cell_w, r * cell_h))
    return image


@click.command()
@click.option("--engines", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="A .png file.")
@click.option("--seed", default=7, show_default=True)
@click.option("--steps", type=int, help="Sampling steps (default: the model's).")
@click.option("--threads", type=int)
@cli_errors
def main(engines, out, seed, steps, threads):
    if out.suffix.lower() != ".png":
        raise SoraError(f"{out}: the grid is written as a .png")
    labelled = rows(engines, seed, steps, threads)
    png = io.BytesIO()
    draw(labelled).save(png, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, png.getvalue())
    click.echo(f"wrote {out} ({len(labelled)} prompts, seed {seed})")


if __name__ == "__main__":
    main()

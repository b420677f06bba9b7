"""Frames out: mp4 (H.264, yuv420p), gif, or npy (float32 [F, H, W, 3] in [0, 1]), each written atomically.

`check_output_path` runs before any compute so a bad path fails in milliseconds, not after minutes of sampling.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import SoraError

FORMATS = (".mp4", ".gif", ".npy")


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise SoraError(f"output {path} has an unknown extension {path.suffix!r} (use one of {', '.join(FORMATS)})")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise SoraError(f"the output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise SoraError(f"the output folder {folder} is not writable")
    if path.is_dir():
        raise SoraError(f"output {path} is a directory")
    return path


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] float in [0, 1] -> uint8, rounding as diffusers' numpy_to_pil."""
    return (frames * 255).round().astype(np.uint8)


def write_video(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """frames: [F, H, W, 3] float32 in [0, 1]."""
    path = check_output_path(path)
    ext = path.suffix.lower()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{ext}")
    try:
        if ext == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, frames.astype(np.float32))
        elif ext == ".gif":
            from PIL import Image

            images = [Image.fromarray(f) for f in to_uint8(frames)]
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        else:
            import imageio_ffmpeg

            data = to_uint8(frames)
            h, w = data.shape[1:3]
            writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                                 quality=8, macro_block_size=1,
                                                 output_params=["-movflags", "+faststart"])
            writer.send(None)
            for frame in data:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

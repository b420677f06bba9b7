"""Frames out: mp4 (H.264, yuv420p), gif, or npy (float32 [F, H, W, 3] in [0, 1]), each written atomically.

`check_output_path` runs before any compute so a bad path fails in milliseconds, not after minutes of sampling.
The file is written to a temporary file created exclusively under a random name in the output's folder (a symlink
planted there is never followed) and renamed over the output only when complete; on any failure,
Ctrl-C or SIGTERM the temporary file is removed and the output is left as it was.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .errors import SoraError
from .safe_files import drop_temp, make_temp_beside

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


class VideoWriter:
    """Frames in as they are decoded, file out atomically on close. mp4 streams each chunk straight to ffmpeg
    (memory stays flat however long the clip); gif and npy need every frame and collect them.

        with VideoWriter(path, fps) as out:
            out.write(chunk)  # [T, H, W, 3] float32 in [0, 1]
    """

    def __init__(self, path: str | Path, fps: int):
        self.path = check_output_path(path)
        self.fps = fps
        self.ext = self.path.suffix.lower()
        self._fd, self.tmp = make_temp_beside(self.path, self.ext)
        self.frames: list[np.ndarray] = []
        self._ffmpeg = None

    def write(self, chunk: np.ndarray) -> None:
        if self.ext != ".mp4":
            self.frames.append(chunk.astype(np.float32))
            return
        data = to_uint8(chunk)
        if self._ffmpeg is None:
            import imageio_ffmpeg

            h, w = data.shape[1:3]
            self._ffmpeg = imageio_ffmpeg.write_frames(
                str(self.tmp), (w, h), fps=self.fps, codec="libx264", pix_fmt_out="yuv420p", quality=8,
                macro_block_size=1, output_params=["-movflags", "+faststart"])
            self._ffmpeg.send(None)
        for frame in data:
            self._ffmpeg.send(np.ascontiguousarray(frame))

    def _finish(self) -> None:
        if self.ext == ".npy":
            with os.fdopen(os.dup(self._fd), "wb") as f:
                np.save(f, np.concatenate(self.frames))
        elif self.ext == ".gif":
            from PIL import Image

            images = [Image.fromarray(f) for f in to_uint8(np.concatenate(self.frames))]
            with os.fdopen(os.dup(self._fd), "wb") as f:
                images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                               duration=int(1000 / self.fps), loop=0)
        else:
            self._ffmpeg.close()
        os.replace(self.tmp, self.path)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                try:
                    self._finish()
                except OSError as e:
                    if e.errno is not None:
                        raise
                    # numpy's tofile reports a short write without an errno: say what it means
                    free = shutil.disk_usage(self.tmp.parent).free
                    raise SoraError(f"could not write {self.path} ({e}): No space left on device "
                                    f"({free} bytes free; nothing was written)" if free < 1 << 20 else
                                    f"could not write {self.path} ({e}; nothing was written)") from None
            elif self._ffmpeg is not None:
                self._ffmpeg.close()
        finally:
            drop_temp(self._fd, self.tmp)  # removes the temporary file unless it was renamed into place


def write_video(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """frames: [F, H, W, 3] float32 in [0, 1]."""
    with VideoWriter(path, fps) as out:
        out.write(frames)
    return out.path

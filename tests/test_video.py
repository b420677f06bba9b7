"""Real files written and read back: mp4 (H.264, yuv420p), gif, npy; and the sora-run CLI end to end."""

import imageio.v3 as iio
import numpy as np
from click.testing import CliRunner

from soraedge.cli.run_cmd import main as run_main
from soraedge.runtime.video import write_video


def _frames(f=9, h=32, w=48):
    g = np.linspace(0, 1, f * h * w * 3, dtype=np.float32).reshape(f, h, w, 3)
    return g


def test_mp4_roundtrip(tmp_path):
    path = write_video(tmp_path / "v.mp4", _frames(), fps=16)
    frames = np.stack(list(iio.imiter(path)))
    assert frames.shape == (9, 32, 48, 3)
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert meta["fps"] == 16 and tuple(meta["size"]) == (48, 32)
    assert "h264" in meta["codec"] and "yuv420p" in meta["pix_fmt"]


def test_gif_and_npy_roundtrip(tmp_path):
    gif = np.stack(list(iio.imiter(write_video(tmp_path / "v.gif", _frames(), fps=8))))
    assert gif.shape[:3] == (9, 32, 48)
    npy = np.load(write_video(tmp_path / "v.npy", _frames(), fps=8))
    assert npy.dtype == np.float32 and npy.shape == (9, 32, 48, 3)


def test_sora_run_writes_mp4(tiny_engines, tmp_path):
    out = tmp_path / "fox.mp4"
    result = CliRunner().invoke(run_main, ["--engines", str(tiny_engines("tiny-a")), "--prompt", "a red fox",
                                           "--steps", "2", "--seed", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "ms/step" in result.output
    frames = np.stack(list(iio.imiter(out)))
    assert frames.shape == (5, 32, 48, 3)

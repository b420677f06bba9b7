"""The runtime never imports torch: import it and generate a video in a fresh interpreter where importing torch
raises."""

import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")

    sys.meta_path.insert(0, BlockTorch())
    from soraedge.runtime.pipeline import Pipeline
    from soraedge.runtime.video import write_video

    pipe = Pipeline.load(sys.argv[1])
    result = pipe("a dog on the beach", steps=2)
    write_video(sys.argv[2], result.frames, pipe.defaults["fps"])
    assert "torch" not in sys.modules
    print("ok", result.frames.shape)
""")


def test_runtime_generates_without_torch(tiny_engines, tmp_path):
    out = tmp_path / "v.npy"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_engines("tiny-a")), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    frames = np.load(out)
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0

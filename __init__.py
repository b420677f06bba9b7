"""soraedge: export Wan-architecture text-to-video pipelines to ONNX and run them without PyTorch.

Subpackages: `runtime` (lean, no torch), `export` (PyTorch -> ONNX, needs the [export] extra),
`cli` (sora-export, sora-run), `kernels`, `calib`, `bench`.
"""

__version__ = "0.1.0"

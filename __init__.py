"""soraedge: export Wan-architecture text-to-video pipelines to ONNX and run them without PyTorch.

Subpackages, in the order the data flows: `export` (PyTorch -> ONNX, needs the [export] extra), `precision`,
`target`, `runtime` (lean, no torch), `serve`; beside them `fused_attention` (Triton kernels), `cli`, `bench`, `demo`.
"""

__version__ = "0.1.0"

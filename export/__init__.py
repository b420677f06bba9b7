"""PyTorch -> ONNX export of Wan-architecture pipelines. Needs the [export] extra; never imported by runtime/."""

"""Targets: the candidates for this machine, the one DiT-step timer, the choice, the ONNX Runtime graph variant,
OpenVINO, TensorRT plans and the plugin node. No torch."""

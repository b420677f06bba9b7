"""Backends: each wraps one engine format beneath the sampler's small interfaces. Only ONNX Runtime so far."""

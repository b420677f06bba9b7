"""Serving: the Triton Inference Server repository and its sampler model. No torch."""

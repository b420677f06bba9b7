"""Fused kernels (Triton) and their references. Empty until the fused-attention issue lands."""

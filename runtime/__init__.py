"""The lean runtime: numpy, onnxruntime, tokenizers and a video writer. Never imports torch.

Entry point for Python users: `soraedge.runtime.pipeline.Pipeline.load(engine_dir)`.
"""

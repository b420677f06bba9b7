"""Precision: ONNX graph conversion (fp16 with fp32 islands, int8 Q/DQ with calibration, int8-dynamic, weight-only)
and the quality gate. No torch."""

"""Calibration and Q/DQ insertion for INT8 engines. Empty until the FP16/INT8 issue lands."""

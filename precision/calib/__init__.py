"""INT8 for the DiT: calibration data from real sampler trajectories, SmoothQuant, explicit Q/DQ insertion.

- config.py: CalibConfig (method, percentile, SmoothQuant alpha, layers kept in float, prompts, steps).
- trajectories.py: run the fp32 engines' own sampler loop over calibration prompts and record every DiT input
  (all timesteps, both CFG branches).
- smoothquant.py: move activation outliers into the weights of the linear layers.
- qdq.py: ONNX Runtime's static quantizer, pinned to the settings that give integer kernels on the CPU.
- prompts.txt: the calibration prompts that ship with the project.
"""

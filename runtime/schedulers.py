"""Flow-matching schedulers in numpy, read from a diffusers scheduler_config.json, matching diffusers step for step.

Supported: `UniPCMultistepScheduler` with flow sigmas and flow prediction (what Wan2.1 ships) and
`FlowMatchEulerDiscreteScheduler`. Any config key this file does not implement, or a value that changes the math
in a way not implemented here, is refused with SoraError instead of silently producing a different trajectory.

`swap_scheduler` changes the class and flow shift at run time as diffusers users swap them
(`FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=5.0)`): a distillation LoRA's recipe
(few steps, Euler, shift 5) runs as published on engines exported with the checkpoint's UniPC.

Interface (used by runtime/sampler.py): `set_timesteps(n)`, `.timesteps` (what the DiT is fed, float32; UniPC
truncates to integers exactly like diffusers' int64 cast), and `step(model_output, sample) -> prev_sample`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import SoraError

# Keys that carry no math (diffusers bookkeeping), present in saved configs.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def _check_config(name: str, cfg: dict, defaults: dict, required: dict, ranges: dict) -> dict:
    """Merge with defaults; refuse unknown keys, values that change the math in unsupported ways, and numbers
    outside `ranges` ({key: (type, low, high)}, bounds inclusive; low exclusive for floats: a shift of 0 divides by
    zero) that would give NaN or nonsense trajectories."""
    unknown = sorted(k for k in cfg if k not in defaults and k not in _IGNORED)
    if unknown:
        raise SoraError(f"{name}: unsupported scheduler config keys {unknown}; supported: {sorted(defaults)}")
    merged = {**defaults, **{k: v for k, v in cfg.items() if k not in _IGNORED}}
    for key, allowed in required.items():
        if merged[key] not in allowed:
            raise SoraError(f"{name}: {key}={merged[key]!r} is not supported (supported: {allowed})")
    for key, (kind, low, high) in ranges.items():
        v = merged[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high
        ok = ok and (isinstance(v, int) and v >= low if kind is int else v > low)
        if not ok:
            bound = f"a whole number from {low} to {high}" if kind is int else f"a finite number > {low} and <= {high}"
            raise SoraError(f"{name}: {key}={v!r} is invalid (need {bound})")
    return merged


class FlowMatchEuler:
    """diffusers.FlowMatchEulerDiscreteScheduler (deterministic, static shift)."""

    DEFAULTS = {
        "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
        "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "invert_sigmas": False,
        "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "time_shift_type": "exponential", "stochastic_sampling": False,
    }
    REQUIRED = {
        "use_dynamic_shifting": [False], "invert_sigmas": [False], "use_karras_sigmas": [False],
        "use_exponential_sigmas": [False], "use_beta_sigmas": [False], "stochastic_sampling": [False],
    }

    RANGES = {"num_train_timesteps": (int, 2, 10**6), "shift": (float, 0.0, 1000.0)}

    def __init__(self, config: dict):
        self.config = _check_config("FlowMatchEulerDiscreteScheduler", config, self.DEFAULTS, self.REQUIRED,
                                    self.RANGES)
        terminal = self.config["shift_terminal"]
        if terminal is not None and not (isinstance(terminal, (int, float)) and 0 <= terminal < 1):
            raise SoraError(f"FlowMatchEulerDiscreteScheduler: shift_terminal={terminal!r} is invalid (need None or "
                            f"a number in [0, 1))")
        n, shift = self.config["num_train_timesteps"], self.config["shift"]
        # As diffusers' __init__: float32 training sigmas, shifted once; sigma_min/max are read from them.
        train = (np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)).astype(np.float32)
        train = (shift * train / (1 + (shift - 1) * train)).astype(np.float32)
        self.sigma_min, self.sigma_max = float(train[-1]), float(train[0])

    def _stretch_to_terminal(self, s: np.ndarray) -> np.ndarray:
        one_minus = 1 - s
        scale = one_minus[-1] / (1 - self.config["shift_terminal"])
        return 1 - one_minus / scale

    def set_timesteps(self, num_steps: int) -> None:
        n, shift = self.config["num_train_timesteps"], self.config["shift"]
        ts = np.linspace(self.sigma_max * n, self.sigma_min * n, num_steps)
        sigmas = ts / n
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)  # diffusers applies the shift again here
        if self.config["shift_terminal"]:
            sigmas = self._stretch_to_terminal(sigmas)
        sigmas = sigmas.astype(np.float32)
        self.timesteps = (sigmas * np.float32(n)).astype(np.float32)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        self.step_index = 0

    def step(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self.step_index
        dt = self.sigmas[i + 1] - self.sigmas[i]  # float32 scalar, as diffusers
        self.step_index += 1
        return (sample.astype(np.float32) + dt * model_output).astype(model_output.dtype)


class UniPCFlow:
    """diffusers.UniPCMultistepScheduler with use_flow_sigmas=True, prediction_type='flow_prediction', predict_x0."""

    DEFAULTS = {
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
        "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": [], "solver_p": None, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
        "timestep_spacing": "linspace", "steps_offset": 0, "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False, "use_dynamic_shifting": False, "time_shift_type": "exponential",
        "sigma_min": None, "sigma_max": None, "shift_terminal": None,
    }
    # beta_* / timestep_spacing / steps_offset are read by diffusers but overwritten on the flow-sigma path.
    REQUIRED = {
        "use_flow_sigmas": [True], "prediction_type": ["flow_prediction"], "predict_x0": [True],
        "thresholding": [False], "solver_type": ["bh1", "bh2", "midpoint", "heun", "logrho"], "solver_p": [None],
        "use_karras_sigmas": [False], "use_exponential_sigmas": [False], "use_beta_sigmas": [False],
        "use_dynamic_shifting": [False], "final_sigmas_type": ["zero", "sigma_min"],
        "rescale_betas_zero_snr": [False], "shift_terminal": [None],
    }

    RANGES = {"num_train_timesteps": (int, 2, 10**6), "flow_shift": (float, 0.0, 1000.0), "solver_order": (int, 1, 3)}

    def __init__(self, config: dict):
        self.config = _check_config("UniPCMultistepScheduler", config, self.DEFAULTS, self.REQUIRED, self.RANGES)
        skip = self.config["disable_corrector"]
        if not isinstance(skip, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
            raise SoraError(f"UniPCMultistepScheduler: disable_corrector={skip!r} is invalid (need a list of step "
                            f"indices)")
        if self.config["solver_type"] not in ("bh1", "bh2"):  # diffusers maps the DPM-Solver names to bh2
            self.config["solver_type"] = "bh2"
        self.order = int(self.config["solver_order"])

    def set_timesteps(self, num_steps: int) -> None:
        c = self.config
        n = c["num_train_timesteps"]
        sigmas = np.linspace(1, 1 / n, num_steps + 1)[:-1]
        sigmas = c["flow_shift"] * sigmas / (1 + (c["flow_shift"] - 1) * sigmas)
        if abs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6
        timesteps = sigmas * n
        last = sigmas[-1] if c["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        # diffusers casts to int64 (truncation) before the DiT sees them; the engine takes float32.
        self.timesteps = timesteps.astype(np.int64).astype(np.float32)
        self.num_steps = len(timesteps)
        self.model_outputs: list[np.ndarray | None] = [None] * self.order
        self.lower_order_nums = 0
        self.last_sample: np.ndarray | None = None
        self.this_order = 0
        self.step_index = 0

    # Scalar coefficient math runs in float64 here (float32 in diffusers): a ~1e-7 relative difference.
    def _lambda(self, i: int) -> float:
        s = float(self.sigmas[i])
        with np.errstate(divide="ignore"):
            return float(np.log(np.float64(1 - s)) - np.log(np.float64(s)))

    def _coefficients(self, t_idx: int, s0_idx: int, prev_idx: list[int]):
        """h, rks, hh, h_phi_1, B_h, R, b as in diffusers' multistep_uni_{p,c}_bh_update."""
        with np.errstate(all="ignore"):  # a zero or repeated final sigma gives inf/nan, exactly as in torch
            return self._coefficients_unchecked(t_idx, s0_idx, prev_idx)

    def _coefficients_unchecked(self, t_idx: int, s0_idx: int, prev_idx: list[int]):
        lam_t, lam_s0 = np.float64(self._lambda(t_idx)), np.float64(self._lambda(s0_idx))
        h = lam_t - lam_s0
        rks = [(self._lambda(si) - lam_s0) / h for si in prev_idx] + [1.0]
        hh = -h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.config["solver_type"] == "bh1" else h_phi_1
        factorial_i = 1
        R, b = [], []
        for i in range(1, len(rks) + 1):
            R.append([r ** (i - 1) for r in rks])
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return np.array(rks), h_phi_1, b_h, np.array(R), np.array(b)

    def _base(self, t_idx: int, s0_idx: int, x: np.ndarray, m0: np.ndarray, h_phi_1: float) -> np.ndarray:
        sigma_t, sigma_s0 = float(self.sigmas[t_idx]), float(self.sigmas[s0_idx])
        alpha_t = 1 - sigma_t
        return np.float32(sigma_t / sigma_s0) * x - np.float32(alpha_t * h_phi_1) * m0, alpha_t

    def _predictor(self, x: np.ndarray, order: int) -> np.ndarray:
        i = self.step_index
        m0 = self.model_outputs[-1]
        prev = [i - k for k in range(1, order)]
        rks, h_phi_1, b_h, R, b = self._coefficients(i + 1, i, prev)
        x_t, alpha_t = self._base(i + 1, i, x, m0, h_phi_1)
        if order >= 2:
            d1s = [(self.model_outputs[-(k + 1)] - m0) / np.float32(rks[k - 1]) for k in range(1, order)]
            rhos = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
            pred_res = sum(np.float32(r) * d for r, d in zip(rhos, d1s))
            x_t = x_t - np.float32(alpha_t * b_h) * pred_res
        return x_t.astype(x.dtype)

    def _corrector(self, model_t: np.ndarray, last: np.ndarray, this: np.ndarray, order: int) -> np.ndarray:
        i = self.step_index
        m0 = self.model_outputs[-1]
        prev = [i - (k + 1) for k in range(1, order)]
        rks, h_phi_1, b_h, R, b = self._coefficients(i, i - 1, prev)
        x_t, alpha_t = self._base(i, i - 1, last, m0, h_phi_1)
        rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
        d1s = [(self.model_outputs[-(k + 1)] - m0) / np.float32(rks[k - 1]) for k in range(1, order)]
        corr = sum((np.float32(r) * d for r, d in zip(rhos[:-1], d1s)), np.zeros_like(m0))
        x_t = x_t - np.float32(alpha_t * b_h) * (corr + np.float32(rhos[-1]) * (model_t - m0))
        return x_t.astype(last.dtype)

    def step(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self.step_index
        x0_pred = sample - self.sigmas[i] * model_output  # flow prediction -> data prediction
        use_corrector = i > 0 and (i - 1) not in self.config["disable_corrector"] and self.last_sample is not None
        if use_corrector:
            sample = self._corrector(x0_pred, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        order = min(self.order, self.num_steps - i) if self.config["lower_order_final"] else self.order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predictor(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        self.step_index += 1
        return prev


SCHEDULERS = {"UniPCMultistepScheduler": UniPCFlow, "FlowMatchEulerDiscreteScheduler": FlowMatchEuler}
KINDS = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler"}  # sora-run --scheduler


def swap_scheduler(config: dict, kind: str | None = None, flow_shift: float | None = None) -> dict:
    """The config of scheduler `kind` (unipc | euler; None: the same class) made from `config` as diffusers'
    `Cls.from_config(config, ...)` makes it: the keys the new class takes carried over, its flow settings set (UniPC
    on flow sigmas with flow prediction, as Wan ships it). The shift is `flow_shift`, or else the model's own under
    either name (`flow_shift` for UniPC, `shift` for Euler): swapping the class alone keeps the trajectory's shift."""
    if kind is not None and kind not in KINDS:
        raise SoraError(f"scheduler {kind!r} unknown (known: {', '.join(KINDS)})")
    name = KINDS[kind] if kind else config.get("_class_name")
    if name not in SCHEDULERS:
        raise SoraError(f"scheduler class {name!r} is not supported (supported: {sorted(SCHEDULERS)})")
    shift = config.get("flow_shift", config.get("shift", 1.0)) if flow_shift is None else flow_shift
    carried = {k: v for k, v in config.items() if k in SCHEDULERS[name].DEFAULTS}
    if name == "UniPCMultistepScheduler":
        carried.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    else:
        carried.update(shift=shift)
    return {"_class_name": name, **carried}


def scheduler_from_config(config: dict):
    """Build the scheduler named by `_class_name`; refuse unknown classes."""
    if not isinstance(config, dict):
        raise SoraError(f"a scheduler config must be a JSON object, not {type(config).__name__}")
    cls = config.get("_class_name")
    if cls not in SCHEDULERS:
        raise SoraError(f"scheduler class {cls!r} is not supported (supported: {sorted(SCHEDULERS)})")
    return SCHEDULERS[cls](config)


def read_scheduler_config(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SoraError(f"{path}: not a readable scheduler config ({type(e).__name__})") from None


def load_scheduler(path: str | Path):
    return scheduler_from_config(read_scheduler_config(path))

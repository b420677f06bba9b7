"""The numpy schedulers against diffusers, every step, several configs (runtime/schedulers.py)."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from soraedge.runtime.errors import SoraError
from soraedge.runtime.schedulers import scheduler_from_config

UNIPC = [
    dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, solver_order=3),
    dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_type="bh1",
         lower_order_final=False, final_sigmas_type="sigma_min"),  # bh1 with a zero final sigma is NaN in diffusers
    dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0, final_sigmas_type="sigma_min",
         disable_corrector=[1]),
]
EULER = [dict(shift=1.0), dict(shift=3.0), dict(shift=5.0, shift_terminal=0.1)]


def _ours(ref):
    """Our scheduler from the config diffusers itself would save."""
    return scheduler_from_config({"_class_name": type(ref).__name__, **dict(ref.config)})


def _run_pair(ref, ours, steps, seed=0):
    """Drive both schedulers with the same deterministic pseudo-model; compare timesteps and every sample."""
    rng = np.random.default_rng(seed)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy().astype(np.float32), rtol=0, atol=1e-3)
    x_ref = torch.from_numpy(rng.standard_normal((1, 4, 2, 3, 5)).astype(np.float32))
    x_ours = x_ref.numpy().copy()
    w = torch.from_numpy(rng.standard_normal((1, 4, 2, 3, 5)).astype(np.float32))
    for t in ref.timesteps:
        out = torch.tanh(x_ref * 0.7 + w * (float(t) / 1000.0))  # a smooth "model" of the sample
        x_ref = ref.step(out, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(torch.tanh(torch.from_numpy(x_ours) * 0.7 + w * (float(t) / 1000.0)).numpy(), x_ours)
        err = np.abs(x_ours - x_ref.numpy()).max() / (np.abs(x_ref.numpy()).max() + 1e-8)
        assert err < 1e-5, f"step at t={float(t)}: relative error {err}"


@pytest.mark.parametrize("cfg", UNIPC)
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
def test_unipc_matches_diffusers(cfg, steps):
    ref = UniPCMultistepScheduler(**cfg)
    _run_pair(ref, _ours(ref), steps)


@pytest.mark.parametrize("cfg", EULER)
@pytest.mark.parametrize("steps", [2, 5, 20])
def test_flow_euler_matches_diffusers(cfg, steps):
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    _run_pair(ref, _ours(ref), steps)


def test_refuses_what_changes_the_math():
    with pytest.raises(SoraError, match="use_karras_sigmas"):
        _ours(UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", use_karras_sigmas=True))
    with pytest.raises(SoraError, match="unsupported scheduler config keys"):
        scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "magic_knob": 1})
    with pytest.raises(SoraError, match="not supported"):
        scheduler_from_config({"_class_name": "DDIMScheduler"})


SWAPS = [  # (the exported scheduler's class and config, our swap, diffusers' swap of the same)
    (UniPCMultistepScheduler, UNIPC[0], ("euler", 5.0),
     lambda c: FlowMatchEulerDiscreteScheduler.from_config(c, shift=5.0)),
    (UniPCMultistepScheduler, UNIPC[0], (None, 5.0), lambda c: UniPCMultistepScheduler.from_config(c, flow_shift=5.0)),
    (FlowMatchEulerDiscreteScheduler, EULER[1], ("unipc", None),
     lambda c: UniPCMultistepScheduler.from_config(c, prediction_type="flow_prediction", use_flow_sigmas=True,
                                                   flow_shift=3.0)),
    (UniPCMultistepScheduler, UNIPC[1], ("euler", None), lambda c: FlowMatchEulerDiscreteScheduler.from_config(
        c, shift=5.0)),  # the class alone: the model's shift (5) kept
]


@pytest.mark.parametrize("cls, cfg, swap, theirs", SWAPS)
def test_a_swapped_scheduler_and_shift_match_diffusers_same_swap(cls, cfg, swap, theirs):
    """swap_scheduler on the exported config against diffusers' from_config of the same swap, every step."""
    from soraedge.runtime.schedulers import swap_scheduler

    exported = cls(**cfg)
    ours = scheduler_from_config(swap_scheduler({"_class_name": cls.__name__, **dict(exported.config)}, *swap))
    _run_pair(theirs(exported.config), ours, 4)


def test_bad_swaps_are_refused():
    from soraedge.runtime.schedulers import swap_scheduler

    config = {"_class_name": "UniPCMultistepScheduler", **UNIPC[0]}
    with pytest.raises(SoraError, match="scheduler 'ddim' unknown"):
        swap_scheduler(config, "ddim")
    for shift in (0.0, -1.0, float("nan")):
        with pytest.raises(SoraError, match="is invalid"):
            scheduler_from_config(swap_scheduler(config, "euler", shift))

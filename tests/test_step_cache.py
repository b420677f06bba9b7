"""Step caching: the probe engine matches diffusers' first-block modulated input; threshold 0 changes nothing; a
threshold skips DiT evaluations; CFG as two calls keeps the branches apart; old engine directories are refused."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from soraedge.cli.run_cmd import main as run_main
from soraedge.runtime.backends import EngineDenoiser
from soraedge.runtime.errors import SoraError
from soraedge.runtime.manifest import load_manifest
from soraedge.runtime.pipeline import Pipeline
from soraedge.runtime.sampler import sample
from soraedge.runtime.step_cache import StepCache

from conftest import TEST_SIZE

STEPS = 12


def _run(engines, name, **kw):
    pipe = Pipeline.load(engines(name))
    size = TEST_SIZE[name]
    noise = np.random.default_rng(0).standard_normal(pipe.latent_shape(size["height"], size["width"],
                                                                       size["frames"]), dtype=np.float32)
    return pipe("a red fox runs in the snow", **size, steps=STEPS, latents=noise, **kw)


@pytest.mark.parametrize("name", ["tiny-a", "tiny-b"])
def test_probe_matches_diffusers(name, tiny_engines):
    parity = load_manifest(tiny_engines(name)).data["engines"]["dit_probe"]["parity"]
    assert parity["max_rel"] < 1e-4, parity


def test_threshold_zero_is_no_cache(tiny_engines):
    plain = _run(tiny_engines, "tiny-a")
    cached = _run(tiny_engines, "tiny-a", step_cache=0.0)
    assert cached.dit_evaluations == plain.dit_evaluations == STEPS
    np.testing.assert_array_equal(cached.frames, plain.frames)


def test_threshold_skips_evaluations(tiny_engines):
    cached = _run(tiny_engines, "tiny-a", step_cache=0.3)
    assert 1 <= cached.dit_evaluations < STEPS and np.isfinite(cached.frames).all()
    everything = _run(tiny_engines, "tiny-a", step_cache=1e9)
    assert everything.dit_evaluations == 1  # only the first step runs


def test_cfg_as_two_calls_keeps_branches_apart(tiny_engines):
    """Batch-1 CFG (cond and uncond as separate calls) must make the same decisions as batch 2."""
    pipe = Pipeline.load(tiny_engines("tiny-a"))
    size = TEST_SIZE["tiny-a"]
    emb = pipe.encode(["a red fox", ""])
    noise = np.random.default_rng(1).standard_normal(pipe.latent_shape(size["height"], size["width"],
                                                                       size["frames"]), dtype=np.float32)
    results = []
    for max_batch in (2, 1):
        inner = EngineDenoiser(pipe.engine("transformer"))
        inner.max_batch = max_batch
        cache = StepCache(inner, pipe.engine("dit_probe"), 0.3)
        latents = sample(cache, pipe.scheduler, noise, emb[:1], emb[1:], 5.0, STEPS)
        results.append((latents, cache.evaluations))
    (two, n2), (one, n1) = results
    assert n1 == 2 * n2 and n2 < STEPS
    np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-5)


def test_step_cache_cli_and_old_engine_dirs(engine_copy, tmp_path):
    r = CliRunner().invoke(run_main, ["--engines", str(engine_copy), "--prompt", "a fox", "--steps", "6",
                                      "--height", "32", "--width", "48", "--frames", "5", "--step-cache",
                                      "-o", str(tmp_path / "a.npy")])
    assert r.exit_code == 0, r.output
    assert "DiT evaluations for 6 steps" in r.output
    manifest = engine_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["engines"]["dit_probe"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(SoraError, match="no step-cache probe"):
        Pipeline.load(engine_copy)("a fox", height=32, width=48, frames=5, steps=2, step_cache=0.1)

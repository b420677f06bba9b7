"""--low-memory (one stage resident at a time) and the on-disk prompt-embedding cache give the same video."""

import numpy as np

from soraedge.runtime.pipeline import Pipeline
from soraedge.runtime.prompt_cache import PromptCache


def _noise(pipe):
    d = pipe.defaults
    return np.random.default_rng(0).standard_normal(pipe.latent_shape(d["height"], d["width"], d["frames"]),
                                                    dtype=np.float32)


def test_low_memory_same_frames_and_nothing_kept(tiny_engines):
    normal = Pipeline.load(tiny_engines("tiny-a"), backend="ort")
    lean = Pipeline.load(tiny_engines("tiny-a"), backend="ort", low_memory=True)
    a = normal("a cat", steps=2, latents=_noise(normal))
    b = lean("a cat", steps=2, latents=_noise(lean))
    np.testing.assert_array_equal(a.frames, b.frames)
    assert lean._engines == {} and set(normal._engines) >= {"text_encoder", "transformer"}
    assert set(b.memory_mb) == {"encode", "denoise", "decode"} and all(v > 0 for v in b.memory_mb.values())


def _live_engines() -> set[str]:
    import gc

    from soraedge.runtime.backends.ort import OrtEngine

    gc.collect()
    return {o.spec.name for o in gc.get_objects() if type(o) is OrtEngine}  # type(): no lazy-module warnings


def test_low_memory_releases_each_stage_before_the_next(tiny_engines):
    """While the VAE decodes, no text encoder or DiT session is alive anywhere in the process."""
    alive_during_decode = []
    for step_cache in (None, 0.1):
        lean = Pipeline.load(tiny_engines("tiny-a"), backend="ort", low_memory=True)
        lean("a cat", steps=3, latents=_noise(lean), step_cache=step_cache,
             sink=lambda chunk: alive_during_decode.append(_live_engines()))
        assert alive_during_decode and all(not ({"text_encoder", "transformer", "dit_probe"} & names)
                                           for names in alive_during_decode), alive_during_decode


def test_prompt_cache_skips_the_text_encoder(tiny_engines, tmp_path):
    first = Pipeline.load(tiny_engines("tiny-a"), backend="ort", prompt_cache=tmp_path)
    a = first("a dog on a bridge", negative_prompt="blurry", steps=2, latents=_noise(first))
    assert len(list(tmp_path.rglob("*.npy"))) == 2  # prompt and negative prompt
    second = Pipeline.load(tiny_engines("tiny-a"), backend="ort", prompt_cache=tmp_path)
    b = second("a dog on a bridge", negative_prompt="blurry", steps=2, latents=_noise(second))
    assert "text_encoder" not in second._engines  # never loaded
    np.testing.assert_array_equal(a.frames, b.frames)


def test_prompt_cache_ignores_corrupt_entries_and_stays_bounded(tmp_path):
    cache = PromptCache(tmp_path, "k", (4, 3), max_bytes=3 * 300)
    emb = np.ones((4, 3), np.float32)
    cache.put("x", emb)
    path = next((tmp_path / "k").glob("*.npy"))
    path.write_bytes(b"garbage")
    assert cache.get("x") is None  # corrupt: ignored
    cache.put("x", emb)
    np.testing.assert_array_equal(cache.get("x"), emb)  # rewritten
    for i in range(10):
        cache.put(f"p{i}", emb)
    assert sum(p.stat().st_size for p in (tmp_path / "k").glob("*.npy")) <= 3 * 300
    assert not list((tmp_path / "k").glob("*.tmp"))


def test_a_dropped_pipeline_frees_its_engines_without_the_cyclic_collector(tiny_engines):
    """A Pipeline holds no reference cycle: dropping it releases its sessions at once (a server replacing pipelines,
    a bench loading one after another), not whenever Python's cyclic collector next runs."""
    import gc
    import weakref

    gc.disable()
    try:
        pipe = Pipeline.load(tiny_engines("tiny-a"))
        pipe("a cat", steps=1)
        engine = weakref.ref(pipe.engine("transformer"))
        del pipe
        assert engine() is None
    finally:
        gc.enable()

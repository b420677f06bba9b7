"""The Python API: `Pipeline.load(engine_dir)` then `pipe(prompt, ...)` -> frames. No torch anywhere.

Stages: prompt -> text embeddings (runtime/text.py; cached on disk by runtime/prompt_cache.py) -> sampler loop
over the DiT engine (runtime/sampler.py) -> latent de-normalisation -> chunked VAE decoder (runtime/vae_decode.py)
-> frames [F, H, W, 3] in [0, 1]. Every argument is validated before any compute.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from .backends import EngineDenoiser, open_engine
from .backends.trt import refittable
from .choices import BACKENDS, EXECUTIONS, GPU_BACKENDS, LORA_BACKENDS, Backend, Execution
from .errors import SoraError
from .experts import HIGH, LOW, PROBES, ExpertSwitch
from .gpu_target import check_target
from .manifest import Manifest, load_manifest
from .memory import PeakDevice, PeakRss
from .prompt_cache import PromptCache
from .sampler import sample
from .lora import LoraSet, cached_weights, fused_initializers, read_lora
from .schedulers import read_scheduler_config, scheduler_from_config, swap_scheduler
from .spec import EngineSpec
from .step_cache import StepCache
from .text import PromptEncoder
from .user_cache import check_settings, compiled_cache, compiled_used
from .vae_decode import ChunkedVaeDecoder
from .validate import (check_finite, check_frames, check_guidance, check_seed, check_size, check_steps, check_text,
                       check_threads, latent_grid)


log = logging.getLogger("soraedge")
_NO_DEVICE = SimpleNamespace(peak_mb=None)  # what _peak_device yields where no GPU backend runs


def _openvino_available() -> bool:
    from .backends.openvino import available

    return available()


@dataclass
class Generation:
    frames: np.ndarray | None  # [F, H, W, 3] float32 in [0, 1]; None for output_type="latent" or with a sink
    latents: np.ndarray  # [1, C, f, h, w] final latents (before de-normalisation)
    timings: dict[str, float] = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)
    memory_mb: dict[str, float | None] = field(default_factory=dict)  # peak RSS per stage (sampled)
    device_memory_mb: dict[str, float | None] = field(default_factory=dict)  # peak GPU memory per stage (NVML)
    dit_evaluations: int = 0  # DiT calls made (fewer than steps x branches with step caching)


class Pipeline:
    """Engines of one engine directory on one backend. backend/precision default to what export chose.

    Engines open on first use. With `low_memory`, each stage opens its engines and releases them when it ends, so
    only one stage is resident at a time. With a `prompt_cache` folder, embeddings of prompts seen before are read
    from disk and the text encoder is not even loaded. `open_with(name, spec)`, when given, supplies the engines
    instead of a local backend (the Triton model runs them as BLS calls to the server's models: serve/bls.py).
    A GPU backend runs only a directory built for this GPU (runtime/gpu_target.py). `cuda_graph` replays the DiT
    step as a CUDA graph there; `cfg_batch=False` runs the two guidance branches as two DiT calls instead of one
    batch of 2 (less activation memory, usually slower). `loras` ([(safetensors file, scale)]) are applied to the DiT
    at load, without re-export (runtime/lora.py): what an export with them fused computes.
    """

    def __init__(self, manifest: Manifest, threads: int | None = None, backend: str | None = None,
                 precision: str | None = None, low_memory: bool = False, prompt_cache: Path | None = None,
                 open_with: Callable[[str, EngineSpec], object] | None = None, cuda_graph: bool = True,
                 cfg_batch: bool = True, loras: tuple[tuple[str | Path, float], ...] = ()):
        self.manifest = manifest
        self.open_with = open_with
        self.cuda_graph = cuda_graph
        self.cfg_batch = cfg_batch
        self.config = manifest.config
        self.defaults = self.config["defaults"]
        check_threads(threads)
        check_settings()
        self.threads = threads
        self.low_memory = low_memory
        chosen = manifest.runtime
        if backend is None and chosen["backend"] == "openvino" and not _openvino_available():
            log.warning("these engines were tuned for OpenVINO, which is not installed; running on ONNX Runtime")
            chosen = {"backend": Backend.ORT, "precision": Execution.FP32}
        self.backend = backend or chosen["backend"]
        self.precision = precision or (chosen["precision"] if self.backend == chosen["backend"] else Execution.FP32)
        if self.backend not in BACKENDS:
            raise SoraError(f"unknown backend {self.backend!r} (known: {', '.join(BACKENDS)})")
        if self.precision not in EXECUTIONS:
            raise SoraError(f"unknown precision {self.precision!r} (known: {', '.join(EXECUTIONS)})")
        if loras and (self.backend not in LORA_BACKENDS or open_with is not None):
            raise SoraError(f"LoRAs are applied to built engines on {', '.join(LORA_BACKENDS)}, not "
                            f"{'a Triton server' if open_with else self.backend}: export with --lora to fuse them "
                            f"into the engines")
        if loras and self.backend == Backend.TENSORRT and not refittable(manifest):
            raise SoraError(f"{manifest.root}: its TensorRT DiT plan was built without --trt-refittable: rebuild it "
                            f"with that flag (sora-build ... --backend tensorrt --trt-refittable) to apply LoRAs at "
                            f"load, or export with --lora to fuse them")
        if self.backend in GPU_BACKENDS and open_with is None:
            check_target(manifest.data.get("gpu"), self.backend, manifest.root)
        self._engines: dict[str, object] = {}
        me = weakref.ref(self)  # not a reference cycle: a dropped Pipeline frees its engines at once, not at a GC
        self.text = PromptEncoder(str(manifest.file(self.config["tokenizer"])),
                                  lambda **feeds: me().engine("text_encoder")(**feeds),
                                  self.config["max_sequence_length"], self.config["pad_token_id"])
        self.lora_set = self._read_loras(loras) if loras else None
        self.loras = self.lora_set.describe() if loras else []  # the LoRAs applied at load: file, hash, scale
        self.scheduler_config = read_scheduler_config(manifest.file(self.config["scheduler"]))
        self.scheduler = scheduler_from_config(self.scheduler_config)
        self.prompt_cache = None
        if prompt_cache is not None:
            key = hashlib.sha256((manifest.content_key("text_encoder") + manifest.data["files"][
                self.config["tokenizer"]]["sha256"] + str(self.config["max_sequence_length"])).encode()).hexdigest()
            self.prompt_cache = PromptCache(prompt_cache, key[:16],
                                            (self.config["max_sequence_length"], self.config["text_dim"]))

    @classmethod
    def load(cls, engine_dir, threads: int | None = None, verify: bool = True, backend: str | None = None,
             precision: str | None = None, low_memory: bool = False, prompt_cache: Path | None = None,
             cuda_graph: bool = True, cfg_batch: bool = True, loras: tuple = ()) -> Pipeline:
        """`engine_dir`: a directory, read and verified here, or a Manifest already read (or being built)."""
        manifest = engine_dir if isinstance(engine_dir, Manifest) else load_manifest(engine_dir, verify=verify)
        return cls(manifest, threads, backend, precision, low_memory, prompt_cache,
                   cuda_graph=cuda_graph, cfg_batch=cfg_batch, loras=loras)

    def _read_loras(self, loras) -> LoraSet:
        """The LoRAs, read and checked against the DiT's record of its weights (one line for what they cannot
        change). They go into the first DiT only, as diffusers loads LoRAs (Wan2.2 A14B: the high-noise expert)."""
        entry = self.manifest.data["engines"]["transformer"]
        if "lora_targets" not in entry:
            raise SoraError(f"{self.manifest.root}: its DiT is {entry.get('precision', 'fp32')} or was exported "
                            f"without a record of its weights: LoRAs change fp32 and fp16 DiT graphs at load; export "
                            f"with --lora to fuse them")
        lora_set = LoraSet([read_lora(Path(path), scale) for path, scale in loras])
        lora_set.check({tensor: tuple(t["shape"]) for tensor, t in entry["lora_targets"].items()})
        return lora_set

    def _lora_weights(self) -> dict[str, np.ndarray]:
        """The DiT's weights the LoRAs change, with them added ({initializer: values}), for the backend to take in
        place of the file's; computed when the DiT opens, so a released DiT (low_memory) holds none of them, and kept
        in this user's cache by the DiT's content and the LoRAs' (runtime/lora.py's cached_weights): a second load
        with the same LoRAs maps them."""
        entry = self.manifest.data["engines"][HIGH]
        targets = entry["lora_targets"]

        def stored(target: dict) -> np.ndarray:
            shape = target["shape"] if not target["transpose"] else [target["shape"][i] for i in target["transpose"]]
            if "values" in target:
                return np.asarray(target["values"], target["dtype"]).reshape(shape)
            return np.fromfile(self.manifest.file(target["file"]), target["dtype"], int(np.prod(shape)),
                               offset=target["offset"]).reshape(shape)

        key = f"{self.manifest.content_key(HIGH)}-{self.lora_set.digest()}"
        folder = compiled_cache("lora", HIGH, key, entry.get("precision", "fp32"))
        weights = cached_weights(folder, lambda: fused_initializers(targets, self.lora_set, stored))
        if folder is not None:
            compiled_used(folder)
        return weights

    def _open(self, name: str):
        if self.open_with is not None:
            return self.open_with(name, self.manifest.spec(name))
        cache = None  # compiled models: this user's, keyed by content (runtime/user_cache.py)
        lora_weights = self._lora_weights() if name == HIGH and self.lora_set else None
        if self.backend != Backend.ORT:  # with LoRAs: keyed by their content and scales too
            key = self.manifest.content_key(name)
            if lora_weights:
                key += "-lora" + self.lora_set.digest()
            cache = compiled_cache(self.backend, name, key, self.precision)
        spec = self.manifest.spec(name)
        run = spec.run  # this engine's settings, recorded at export (runtime/spec.py's RunSettings)
        engine = open_engine(self.backend, self.manifest.path_for(name, self.backend), spec,
                             1 if run.one_thread else self.threads, self.precision, cache, arena=run.arena,
                             cuda_graph=self.cuda_graph and run.cuda_graph, static_shapes=run.static_shapes,
                             initializers=lora_weights)
        if cache is not None:
            compiled_used(cache)
        return engine

    def engine(self, name: str):
        """The engine `name`, opened on first use; kept open unless low_memory."""
        if name in self._engines:
            return self._engines[name]
        engine = self._open(name)
        if not self.low_memory:
            self._engines[name] = engine
        return engine

    def release(self, *names: str) -> None:
        """Close the named engines (all, without names); they reopen on next use. Memory comes back once the last
        reference goes: sessions, device buffers and captured CUDA graphs with them."""
        for name in names or list(self._engines):
            self._engines.pop(name, None)

    def open_all(self) -> Pipeline:
        """Open every engine now (session creation / compilation), e.g. to time loading apart from running."""
        if not self.low_memory:
            names = ["text_encoder", "transformer", self.config["vae"]["first"], self.config["vae"]["step"]]
            for name in names + [n for n in (LOW, *PROBES.values()) if n in self.manifest.engine_names]:
                self.engine(name)
        return self

    @property
    def experts(self) -> bool:
        """Whether this is Wan2.2 A14B's layout: a low-noise expert below the boundary."""
        return LOW in self.manifest.engine_names

    @property
    def boundary(self) -> float | None:
        """Wan2.2 A14B: the timestep below which the low-noise expert runs (None: one DiT)."""
        return self.config["boundary_ratio"] * self.scheduler.config["num_train_timesteps"] if self.experts else None

    def dit(self, name: str = HIGH, observe=None, step_cache: float | None = None):
        """The Denoiser of one DiT engine; with `step_cache` (a threshold), behind its own probe (step_cache.py)."""
        denoiser = EngineDenoiser(self.engine(name), observe, self.cfg_batch)
        return denoiser if step_cache is None else StepCache(denoiser, self.engine(PROBES[name]), step_cache)

    def expert_switch(self, guidance: float, guidance_2: float, observe=None,
                      step_cache: float | None = None) -> ExpertSwitch:
        """The Denoiser over both experts (runtime/experts.py), switching where WanPipeline does; with `step_cache`,
        each expert's calls are skipped by its own probe, from a fresh state at the switch."""
        max_batch = self.manifest.spec(HIGH).dim_map["b"].max if self.cfg_batch else 1
        return ExpertSwitch(lambda name: self.dit(name, observe, step_cache), max_batch, self.boundary, guidance,
                            guidance_2)

    def decoder(self, tile: int | None = None) -> ChunkedVaeDecoder:
        return ChunkedVaeDecoder(self.engine(self.config["vae"]["first"]), self.engine(self.config["vae"]["step"]),
                                 tile, self.config["vae_scale_spatial"])

    def encode(self, texts: list[str]) -> np.ndarray:
        """[B, L, D] embeddings; cached ones are read from disk, the rest encoded in one batch and stored."""
        for t in texts:
            check_text(t)
        cached = [self.prompt_cache.get(t) if self.prompt_cache else None for t in texts]
        hits = [t for t, c in zip(texts, cached) if c is not None]
        if hits:
            self.text.tokenize(hits)  # cheap; keeps the over-long-prompt warning on cache hits
        missing = [t for t, c in zip(texts, cached) if c is None]
        if missing:
            encoded = self.text(missing)
            check_finite(encoded, "the text encoder's embeddings")
            fresh = iter(encoded)
            for i, c in enumerate(cached):
                if c is None:
                    cached[i] = next(fresh)
                    if self.prompt_cache:
                        self.prompt_cache.put(texts[i], cached[i])
        return np.stack(cached)

    # -- validation ------------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int, frames: int) -> tuple[int, ...]:
        s, t = self.config["vae_scale_spatial"], self.config["vae_scale_temporal"]
        return (1, self.config["latent_channels"], *latent_grid(frames, height, width, t, s))

    def resolve(self, height=None, width=None, frames=None, steps=None, guidance=None, negative_prompt=None,
                guidance_2=None):
        """Fill defaults and validate every argument; raises SoraError naming the nearest valid values.
        `guidance_2`: the low-noise expert's scale (Wan2.2 A14B), `guidance` where not given, as WanPipeline."""
        d = self.defaults

        def given(value, key):
            return d[key] if value is None else value

        h, w, f = given(height, "height"), given(width, "width"), given(frames, "frames")
        steps, guidance = given(steps, "steps"), given(guidance, "guidance")
        negative_prompt = given(negative_prompt, "negative_prompt")
        check_size(h, w, self.config["vae_scale_spatial"] * max(self.config["patch_size"][1:]))
        check_frames(f, self.config["vae_scale_temporal"])
        check_steps(steps)
        check_guidance(guidance)
        if guidance_2 is not None and not self.experts:
            raise SoraError("guidance_2 is the low-noise expert's scale: these engines have one DiT (Wan2.2 A14B "
                            "has two)")
        guidance_2 = guidance if guidance_2 is None else guidance_2
        check_guidance(guidance_2)
        spec = self.manifest.spec("transformer")
        lat = self.latent_shape(h, w, f)
        bad = [m for name, v in zip("fhw", lat[2:]) if (m := spec.dim_map[name].check(v))]
        if bad:
            raise SoraError(f"{h}x{w}x{f} is outside the exported range: {', '.join(bad)} (latent units)")
        return h, w, f, steps, guidance, negative_prompt, guidance_2

    def check_latents(self, latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if not isinstance(latents, np.ndarray) or latents.dtype != np.float32 or latents.shape != shape:
            got = f"{latents.dtype} {tuple(latents.shape)}" if isinstance(latents, np.ndarray) else type(latents)
            raise SoraError(f"latents must be float32 of shape {shape} (as WanPipeline's), got {got}")
        if not np.isfinite(latents).all():
            raise SoraError("latents hold NaN or inf values: initial noise must be finite")
        return latents

    # -- generation ------------------------------------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, frames: int | None = None, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, latents: np.ndarray | None = None,
                 output_type: str = "np", on_step=None, sink=None, observe=None,
                 step_cache: float | None = None, vae_tile: int | None = None,
                 guidance_2: float | None = None, scheduler: str | None = None,
                 flow_shift: float | None = None) -> Generation:
        """Generate. With `sink` (a callable taking [T, H, W, 3] float32 chunks, e.g. VideoWriter.write), frames
        are handed over as each latent frame is decoded and not kept: Generation.frames is then None.
        `observe(feeds, noise_pred)` sees every DiT call (see EngineDenoiser). `step_cache` (a threshold, e.g.
        runtime.step_cache.DEFAULT_THRESHOLD) skips DiT calls whose input barely changed (runtime/step_cache.py).
        `vae_tile` (pixels, a multiple of 4 x the VAE's scale) decodes in overlapping spatial tiles of that size to
        bound the decoder's memory at large sizes (runtime/vae_decode.py). `guidance_2`: Wan2.2 A14B's low-noise
        expert's guidance scale (default: `guidance`). `scheduler` (unipc | euler) and `flow_shift` replace the
        exported scheduler for this call (runtime/schedulers.py's swap_scheduler), as a distilled recipe asks."""
        h, w, f, steps, guidance, negative_prompt, guidance_2 = self.resolve(height, width, frames, steps,
                                                                             guidance, negative_prompt, guidance_2)
        check_seed(seed)
        sampler_scheduler = self.scheduler if scheduler is None and flow_shift is None else scheduler_from_config(
            swap_scheduler(self.scheduler_config, scheduler, flow_shift))
        probes = [PROBES[HIGH], *([PROBES[LOW]] if self.experts else [])]
        if step_cache is not None and (step_cache < 0 or not set(probes) <= set(self.manifest.engine_names)):
            raise SoraError(f"step cache threshold {step_cache} must be >= 0" if step_cache < 0 else
                            f"{self.manifest.root} has no step-cache probe engine: re-export it with this version")
        unit = 4 * self.config["vae_scale_spatial"]
        if vae_tile is not None and (vae_tile < 2 * unit or vae_tile % unit):
            raise SoraError(f"vae tile {vae_tile}: use a multiple of {unit} pixels, at least {2 * unit} (e.g. 256)")
        shape = self.latent_shape(h, w, f)
        if latents is None:
            latents = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        latents = self.check_latents(latents, shape)
        timings: dict[str, float] = {}

        memory: dict[str, float | None] = {}
        device_memory: dict[str, float | None] = {}
        t0 = time.perf_counter()
        cfg = guidance > 1.0
        with PeakRss() as mem, self._peak_device() as dev:
            emb = self.encode([prompt, negative_prompt] if cfg else [prompt])  # [1 or 2, L, D]
        memory["encode"], device_memory["encode"] = mem.peak_mb, dev.peak_mb
        cond, uncond = emb[:1], (emb[1:] if cfg else None)
        timings["encode"] = time.perf_counter() - t0

        step_times: list[float] = []

        def _on_step(i, dt):
            step_times.append(dt)
            if on_step:
                on_step(i, dt)

        t0 = time.perf_counter()
        with PeakRss() as mem, self._peak_device() as dev:
            evaluations = 0

            def counted(feeds, out):  # every DiT call (a step cache's skips never get here)
                nonlocal evaluations
                evaluations += 1
                if observe:
                    observe(feeds, out)

            if self.experts:
                denoiser = self.expert_switch(guidance, guidance_2, counted, step_cache)
                scale = denoiser.guidance
            else:
                denoiser, scale = self.dit(HIGH, counted, step_cache), guidance
            latents = sample(denoiser, sampler_scheduler, latents, cond, uncond, scale, steps, _on_step)
            del denoiser, scale  # with low_memory they held the only references (the two-expert switch's scale is
            # its bound method): the DiT is released here, before the VAE opens
        memory["denoise"], device_memory["denoise"] = mem.peak_mb, dev.peak_mb
        timings["denoise"] = time.perf_counter() - t0
        check_finite(latents, "the denoised latents")
        if output_type == "latent":
            return Generation(None, latents, timings, step_times, memory, device_memory, evaluations)

        t0 = time.perf_counter()
        c = self.config["latent_channels"]
        mean = np.asarray(self.config["latents_mean"], np.float32).reshape(1, c, 1, 1, 1)
        std = np.asarray(self.config["latents_std"], np.float32).reshape(1, c, 1, 1, 1)
        # WanPipeline: latents / (1 / std) + mean
        z = (latents / (np.float32(1.0) / std) + mean).astype(np.float32)
        kept = []
        with PeakRss() as mem, self._peak_device() as dev:
            for video in self.decoder(vae_tile).chunks(z):  # [1, 3, T, H, W] in [-1, 1]
                check_finite(video, "the decoded frames")
                chunk = np.ascontiguousarray(np.clip(video[0] / 2 + 0.5, 0, 1).transpose(1, 2, 3, 0))  # [T, H, W, 3]
                if sink:
                    sink(chunk)
                else:
                    kept.append(chunk)
        memory["decode"], device_memory["decode"] = mem.peak_mb, dev.peak_mb
        timings["decode"] = time.perf_counter() - t0
        frames_out = np.concatenate(kept).astype(np.float32, copy=False) if kept else None
        return Generation(frames_out, latents, timings, step_times, memory, device_memory, evaluations)

    def _peak_device(self):
        """GPU memory is sampled only when a GPU backend runs (None otherwise)."""
        return PeakDevice() if self.backend in GPU_BACKENDS else contextlib.nullcontext(_NO_DEVICE)

"""sora-run: prompt in, video out, on the exported engines alone (no PyTorch)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ..runtime.choices import BACKENDS, EXECUTIONS
from ..runtime.schedulers import KINDS as SCHEDULER_KINDS
from ..runtime.step_cache import DEFAULT_THRESHOLD
from .common import choice, cli_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engines", required=True, type=click.Path(path_type=Path), help="Engine directory from sora-export.")
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default=None, help="Default: the one recorded at export.")
@click.option("--steps", type=int, help="Denoising steps (default recorded at export).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale; <= 1 skips the negative branch.")
@click.option("--guidance-2", "guidance_2", type=float,
              help="Wan2.2 A14B: the low-noise expert's guidance scale (default: --guidance, as diffusers).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for the initial noise (numpy PCG64: deterministic here, but not equal to torch's "
                   "generator; pass --latents to reproduce a PyTorch run).")
@click.option("--height", type=int)
@click.option("--width", type=int)
@click.option("--frames", type=int, help="Pixel frames, 4k+1; must be one exported.")
@click.option("--latents", "latents_file", type=click.Path(path_type=Path),
              help="Initial noise as .npy: float32 [1, C, (F-1)//4+1, H//8, W//8], as WanPipeline's latents.")
@click.option("--threads", type=int, help="Backend threads (default: all cores).")
@click.option("--backend", type=choice(*BACKENDS),
              help="Default: the one chosen at export. The GPU backends run only engines built for this GPU.")
@click.option("--cfg", "cfg_mode", type=click.Choice(["batch", "split"]), default="batch", show_default=True,
              help="Guidance branches as one DiT batch of 2, or as two calls (less activation memory).")
@click.option("--no-cuda-graph", is_flag=True, help="GPU backends: launch the DiT's kernels one by one instead of "
              "replaying a captured CUDA graph.")
@click.option("--precision", type=choice(*EXECUTIONS), help="Default: the one chosen at export.")
@click.option("--low-memory", is_flag=True,
              help="Keep one stage resident at a time: load each engine for its stage and release it after.")
@click.option("--prompt-cache", "prompt_cache", type=click.Path(path_type=Path),
              help="Folder for cached prompt embeddings (default: ~/.cache/soraedge/prompts).")
@click.option("--no-prompt-cache", is_flag=True, help="Always run the text encoder.")
@click.option("--step-cache", type=float, is_flag=False, flag_value=DEFAULT_THRESHOLD, default=None,
              help=f"Skip DiT steps whose input barely changed (TeaCache-style); optional threshold, "
                   f"{DEFAULT_THRESHOLD} if given alone (kept >= 30 dB on the demo at 30 steps). Off by default.")
@click.option("--vae-tile", type=int, help="Decode in overlapping spatial tiles of this many pixels (multiple of 32, "
              "e.g. 256) to bound the VAE's memory at large sizes. Off by default.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A LoRA (safetensors) applied to the DiT at load, at SCALE (default 1); repeat to stack them. "
                   "fp32/fp16 engines on ONNX Runtime; no re-export.")
@click.option("--scheduler", type=click.Choice(list(SCHEDULER_KINDS)),
              help="Sample with this scheduler instead of the exported one (a distilled recipe's, e.g. euler).")
@click.option("--flow-shift", type=float, help="The flow shift to sample with (default: the model's).")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output .mp4, .gif or .npy")
@cli_errors
def main(engines, prompt, negative_prompt, steps, guidance, guidance_2, seed, height, width, frames, latents_file,
         threads,
         backend, cfg_mode, no_cuda_graph, precision, low_memory, prompt_cache, no_prompt_cache, step_cache, vae_tile,
         loras, scheduler, flow_shift, out):
    """Generate a video for PROMPT with the engines in ENGINES."""
    import time

    from tqdm import tqdm

    from ..runtime.errors import SoraError
    from ..runtime.lora import parse_lora
    from ..runtime.pipeline import Pipeline
    from ..runtime.prompt_cache import default_cache_dir
    from ..runtime.video import VideoWriter, check_output_path

    out = check_output_path(out)
    latents = None
    if latents_file is not None:
        try:
            latents = np.load(latents_file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SoraError(f"--latents {latents_file}: not a readable .npy array ({e})") from None
    t0 = time.perf_counter()
    cache_dir = None if no_prompt_cache else (prompt_cache or default_cache_dir())
    pipe = Pipeline.load(engines, threads=threads, backend=backend, precision=precision, low_memory=low_memory,
                         prompt_cache=cache_dir, cuda_graph=not no_cuda_graph, cfg_batch=cfg_mode == "batch",
                         loras=tuple(map(parse_lora, loras)))
    load_s = time.perf_counter() - t0
    h, w, f, n_steps, g, _, g2 = pipe.resolve(height, width, frames, steps, guidance, negative_prompt, guidance_2)
    if latents is not None:
        pipe.check_latents(latents, pipe.latent_shape(h, w, f))
    with VideoWriter(out, pipe.defaults["fps"]) as writer:  # mp4: frames stream to ffmpeg as they are decoded
        with tqdm(total=n_steps, desc="denoise", unit="step", leave=False) as bar:
            result = pipe(prompt, negative_prompt, h, w, f, n_steps, g, seed, latents,
                          on_step=lambda i, dt: bar.update(), sink=writer.write, step_cache=step_cache,
                          vae_tile=vae_tile, guidance_2=g2 if pipe.experts else None, scheduler=scheduler,
                          flow_shift=flow_shift)
        t0 = time.perf_counter()
    write_s = time.perf_counter() - t0  # finishing the file; encoding overlapped the decode
    tm = result.timings
    per_step = tm["denoise"] / max(len(result.step_times), 1)
    graphs = ", ".join(f"{c} {p}" for c, p in pipe.manifest.precision.items())
    scales = f"guidance {g}" + (f", low-noise expert {g2}" if pipe.experts else "")
    click.echo(f"wrote {out} ({f} frames, {w}x{h}, {n_steps} steps, {scales}; engines {graphs}; "
               f"running on {pipe.backend} {pipe.precision})")
    if step_cache is not None:
        click.echo(f"step cache (threshold {step_cache}): {result.dit_evaluations} DiT evaluations for {n_steps} steps")
    click.echo(f"time: load {load_s:.2f}s | tokenize+encode {tm['encode']:.2f}s | denoise {tm['denoise']:.2f}s "
               f"({per_step * 1000:.0f} ms/step) | decode {tm['decode']:.2f}s | write {write_s:.2f}s")
    mem = result.memory_mb
    if all(v is not None for v in mem.values()):
        click.echo("peak RSS: " + " | ".join(f"{k} {v:.0f} MB" for k, v in mem.items())
                   + (" (one stage resident at a time)" if low_memory else ""))
    dev = result.device_memory_mb
    if dev and all(v is not None for v in dev.values()):
        click.echo("peak GPU memory (whole device, NVML): " + " | ".join(f"{k} {v:.0f} MB" for k, v in dev.items()))


if __name__ == "__main__":
    main()

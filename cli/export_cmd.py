"""sora-export MODEL -o DIR: a diffusers Wan directory (or `demo`) -> an engine directory (fp32/fp16/int8).

The runtime target of an already exported directory is sora-build's job (cli/build_cmd.py).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..precision.convert import OFFERED
from ..runtime.choices import AUTO, BACKENDS, PRECISION_REQUESTS
from ..target.choose import BF16_MIN_SPEEDUP
from .common import choice, cli_errors, sectioned, trt_options, written

FIRST_LAST = {"auto": None, "keep": True, "quantize": False}  # --int8-first-last-blocks -> CalibConfig
_PRECISION = "Per-component precision and the quality gate"
_CALIB = "INT8 calibration (--precision int8)"
_TRT = "TensorRT (--backend tensorrt)"
_DETAIL = "Export details"
SECTIONS = {"dit_precision": _PRECISION, "text_encoder_precision": _PRECISION, "vae_precision": _PRECISION,
            "min_psnr": _PRECISION, **{n: _CALIB for n in ("calib_method", "calib_percentile", "calib_prompts",
                                                         "calib_prompt_count", "calib_steps", "smooth_alpha",
                                                         "smooth_unfoldable", "int8_first_last_blocks",
                                                         "int8_activations")},
            **{n: _TRT for n in ("trt_attention", "trt_workspace_mb", "trt_tactic_memory_mb", "trt_opt_level",
                                 "trt_version_compatible", "trt_hardware_compatible", "trt_refittable")},
            "attention": _DETAIL, "max_sequence_length": _DETAIL, "skip_parity": _DETAIL}


@click.command(cls=sectioned(SECTIONS), context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Engine directory to write.")
@click.option("--frames", type=int, help="Default frame count (4k+1) recorded for sora-run.")
@click.option("--max-frames", type=int, default=81, show_default=True,
              help="Most frames (4k+1) the engines accept; the chunked VAE decodes any count up to it.")
@click.option("--height", type=int, help="Default height recorded for sora-run (multiple of 16).")
@click.option("--width", type=int, help="Default width recorded for sora-run (multiple of 16).")
@click.option("--attention", type=click.Choice(["onnx-attention", "decomposed"]),
              help="The DiT's ONNX attention: one ONNX Attention node (opset 23; the default) or MatMul-Softmax-"
                   "MatMul (opset 20). With --backend tensorrt the default is what that TensorRT parses "
                   "(decomposed before 10.14).")
@click.option("--max-sequence-length", type=click.IntRange(2, 4096),
              help="Text tokens per prompt. Default: the model's (512 for Wan2.1, 32 for the demo).")
@click.option("--overwrite", is_flag=True, help="Replace an existing, different engine directory.")
@click.option("--skip-parity", is_flag=True,
              help="Skip the parity gate (each ONNX graph against its PyTorch module, refused above 1e-3 relative "
                   "error; a model too large to hold twice in memory is checked on a copy with its first 2 "
                   "layers).")
@click.option("--backend", type=choice(AUTO, *BACKENDS),
              default="auto", show_default=True,
              help="Runtime target. CPU: auto times one DiT step on ort and openvino and keeps the fastest. GPU, "
                   "built for this machine's GPU and recorded in the manifest (sora-run refuses another): ort-cuda "
                   "(ONNX Runtime CUDA), ort-trt (ONNX Runtime's TensorRT provider), tensorrt (native plans).")
@click.option("--onnx-only", is_flag=True,
              help="Stop after the portable ONNX (precision conversion and quality gate included); build the target "
                   "later, e.g. on the device: sora-build ONNX_DIR -o ENGINE_DIR --backend ort-cuda.")
@click.option("--precision", type=choice(*PRECISION_REQUESTS),
              default="auto", show_default=True,
              help="Default precision of every component (fp16/int8 live in the ONNX graphs; bf16 = fp32 graphs run "
              f"in bf16 by OpenVINO; auto = fp32 graphs, run in bf16 where that is measured at least "
              f"{BF16_MIN_SPEEDUP}x faster on this CPU and passes the quality gate, else fp32). Reduced precision "
              f"must pass the quality gate.")
@click.option("--dit-precision", type=choice(*OFFERED["transformer"]),
              help="Override for the DiT. int8-dynamic: int8 weights, activations quantized at run time by OpenVINO "
              "(CPU targets; no calibration; combines with --precision bf16).")
@click.option("--text-encoder-precision", type=choice(*OFFERED["text_encoder"]),
              help="Override for the text encoder (int8/int4: weight-only).")
@click.option("--vae-precision", type=choice(*OFFERED["vae"]), help="Override for the VAE decoder.")
@click.option("--min-psnr", type=float,
              help="Quality gate: least final-frame PSNR against fp32, in dB [default: 30 with 8-bit or bf16, 40 "
                   "with fp16].")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="INT8 activation ranges.")
@click.option("--calib-percentile", type=float, default=99.999, show_default=True,
              help="For --calib-method percentile.")
@click.option("--calib-prompts", type=click.Path(path_type=Path), help="Calibration prompts, one per line "
              "[default: the shipped precision/calib/prompts.txt].")
@click.option("--calib-prompt-count", type=int, default=4, show_default=True, help="Prompts of the file to run.")
@click.option("--calib-steps", type=int, default=8, show_default=True, help="Sampler steps per calibration prompt.")
@click.option("--smooth-alpha", type=float, default=0.8, show_default=True,
              help="SmoothQuant migration strength for INT8 linears; 0 turns smoothing off.")
@click.option("--smooth-unfoldable", type=click.Choice(["mul", "skip"]), default="mul", show_default=True,
              help="Linear inputs SmoothQuant's scale cannot fold into (the FFN's second linear): a Mul pass on the "
                   "activation, or no smoothing there (faster; check the gate).")
@click.option("--int8-first-last-blocks", type=click.Choice(["auto", "keep", "quantize"]), default="auto",
              show_default=True, help="Keep the first and last DiT blocks float (auto: when the DiT has 8+ blocks).")
@click.option("--int8-activations", type=click.Choice(["u8", "s8"]), default="u8", show_default=True,
              help="u8: asymmetric, ONNX Runtime CPU's integer fast path; s8: symmetric, what TensorRT requires.")
@click.option("--threads", type=int, help="Threads for calibration, backend timing and gate (default: all cores).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A LoRA (safetensors: diffusers/PEFT or Wan's own layout) fused into the DiT at SCALE (default 1); "
                   "repeat to stack them in order.")
@trt_options
@cli_errors
def main(model, out, frames, max_frames, height, width, attention, max_sequence_length, overwrite, skip_parity, backend,
         trt, onnx_only, precision, dit_precision, text_encoder_precision, vae_precision, min_psnr,
         calib_method, calib_percentile, calib_prompts, calib_prompt_count, calib_steps, smooth_alpha,
         smooth_unfoldable,
         int8_first_last_blocks, int8_activations, threads, loras):
    """Export MODEL (a diffusers-format Wan directory: Wan2.1 T2V, Wan2.2 A14B or TI2V-5B; or the built-in `demo`) to
    OUT."""
    from ..runtime.errors import SoraError
    from ..runtime.lora import parse_lora
    from ..runtime.manifest import MANIFEST

    if (Path(model) / MANIFEST).is_file():
        raise SoraError(f"{model} is an engine directory, already exported: build its runtime target with "
                        f"sora-build {model} -o DIR --backend ... (export from the model to change its graphs)")
    try:
        from ..precision.calib.config import CalibConfig
        from ..export.build import ExportConfig, run_export
        from ..export.dit import AttentionForm
    except ImportError as e:
        raise SoraError(f"the export toolchain is not installed ({e.name}): pip install 'soraedge[export]'") from None
    cfg = ExportConfig(model=model, out=out, frames=frames, max_frames=max_frames, height=height, width=width,
                       attention=AttentionForm(attention) if attention else None,
                       max_sequence_length=max_sequence_length, trt=trt,
                       overwrite=overwrite, check_parity=not skip_parity, backend=backend, onnx_only=onnx_only,
                       precision=precision,
                       component_precision=tuple((c, p) for c, p in (("transformer", dit_precision),
                                                                      ("text_encoder", text_encoder_precision),
                                                                      ("vae", vae_precision)) if p),
                       min_psnr=min_psnr, threads=threads,
                       loras=tuple((str(path), scale) for path, scale in map(parse_lora, loras)),
                       calib=CalibConfig(method=calib_method, percentile=calib_percentile,
                                         smooth_alpha=smooth_alpha or None, smooth_unfoldable=smooth_unfoldable,
                                         prompts_file=calib_prompts,
                                         prompts=calib_prompt_count, steps=calib_steps,
                                         keep_first_last_blocks=FIRST_LAST[int8_first_last_blocks],
                                         activations=int8_activations))
    written(run_export(cfg, log=click.echo))


if __name__ == "__main__":
    main()

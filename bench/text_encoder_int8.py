"""The real umT5-XXL text encoder (5.7B parameters, random weights, stored bf16 in shards like Wan2.1's release) on
this CPU: streamed export, weight-only int8 (and int4) converted one tensor at a time, one prompt encoded, and the
embeddings against PyTorch run block by block from the same checkpoint.

Each step runs in its own fresh process, so each peak (VmHWM) is that step's alone:

- export: traced weightless, the fp32 ONNX written from the checkpoint one tensor at a time (export/streaming.py);
- quantize: precision/weight_only.py on that ONNX (the fp32 graph is then deleted: 22.8 GB of disk);
- encode: ONNX Runtime (CPU) loads the weight-only graph and encodes one prompt at the pipeline's 512 tokens;
- reference: UMT5EncoderModel in fp32, its 24 blocks' weights read as each block runs (`blocks_streamed`), so
  the reference needs the embedding table plus one block, not 22.8 GB.

Writes bench/results/ (JSON + Markdown).

    python -m soraedge.bench.text_encoder_int8 [--bits int8,int4] [--workdir DIR]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from ..export.tiny_wan import REAL_TEXT_ENCODER_CONFIGS
from ..precision.quality_gate import token_cosines
from .children import run_child, table
from .export_memory import write_random_checkpoint
from .harness import host, results_option, save

PROMPT_TOKENS = 24  # real tokens of the prompt; the rest of the 512 is padding, as the pipeline encodes

STEPS = """
import json, sys, time
import numpy as np
from pathlib import Path
root, step, arg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
result = {}
ids = np.load(root / "ids.npy"); mask = np.load(root / "mask.npy")
if step == "export":
    from soraedge.export.onnx_export import export_onnx
    from soraedge.export.streaming import CheckpointTensors
    from soraedge.export.text_encoder import load_text_encoder, text_encoder_spec
    te = load_text_encoder(root, "UMT5EncoderModel", weights=False)
    spec = text_encoder_spec(te.encoder.config.d_model, 512)
    export_onnx(te, spec, root / "fp32" / "text_encoder.onnx", 23, {"b": 2, "s": 8},
                CheckpointTensors(root / "text_encoder"))
    result["onnx_bytes"] = sum(p.stat().st_size for p in (root / "fp32").iterdir())
elif step == "quantize":
    from soraedge.precision.weight_only import quantize_weights
    (root / arg).mkdir(exist_ok=True)
    result["detail"] = quantize_weights(root / "fp32" / "text_encoder.onnx", root / arg / "text_encoder.onnx", arg)
elif step == "encode":
    import onnxruntime as ort
    sess = ort.InferenceSession(str(root / arg / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    result["load_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    result["encode_seconds"] = time.perf_counter() - t1
    np.save(root / f"{arg}.npy", out)
elif step == "reference":
    import torch
    from soraedge.export.streaming import blocks_streamed
    from soraedge.export.text_encoder import load_text_encoder
    te = load_text_encoder(root, "UMT5EncoderModel", weights=False)
    with blocks_streamed(te, root / "text_encoder", te.encoder.encoder.block), torch.no_grad():
        out = te(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.save(root / "reference.npy", out)
from soraedge.bench.children import peak_gb
print(json.dumps({**result, "seconds": time.perf_counter() - t0, "vm_hwm_gb": peak_gb()}))
"""


def _result(step: dict) -> str:
    if "onnx_bytes" in step:
        return f"{step['onnx_bytes'] / 2**30:.1f} GiB fp32 ONNX"
    if "detail" in step:
        return f"{step['detail']['weight_bytes'] / 2**30:.2f} GiB of weights"
    if "cosine_min" in step:
        return (f"load {step['load_seconds']:.0f} s, encode {step['encode_seconds']:.1f} s; cosine per token vs "
                f"PyTorch: min {step['cosine_min']:.5f}, mean {step['cosine_mean']:.5f}")
    return ""


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"### umT5-XXL text encoder on the CPU ({r['parameters'] / 1e9:.2f}B parameters, random weights stored "
             f"{r['dtype']} in {r['shards']} shards)", "",
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB; one prompt of {PROMPT_TOKENS} tokens padded "
             f"to 512; ONNX Runtime CPU; each step in a fresh process, peak = VmHWM; {r['date']}.", "",
             *table("Step", r["steps"], _result)]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--model", type=click.Choice(sorted(REAL_TEXT_ENCODER_CONFIGS)), default="umt5-xxl",
              show_default=True)
@click.option("--bits", default="int8,int4", show_default=True, help="Weight-only precisions to measure.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the checkpoint and the graphs go (default: a temporary folder; needs about 40 GB).")
@results_option
def main(model, bits, workdir, results):
    from transformers import UMT5EncoderModel

    config = REAL_TEXT_ENCODER_CONFIGS[model]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        info = write_random_checkpoint(root / "text_encoder", UMT5EncoderModel, config, "bf16", "model")
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s: {info}")
        rng = np.random.default_rng(0)
        ids = np.zeros((1, 512), np.int64)
        ids[0, :PROMPT_TOKENS] = rng.integers(1, config["vocab_size"], PROMPT_TOKENS)
        mask = (np.arange(512) < PROMPT_TOKENS).astype(np.int64)[None]
        np.save(root / "ids.npy", ids), np.save(root / "mask.npy", mask)
        (root / "fp32").mkdir()
        steps = {"export (fp32, streamed)": run_child(root, STEPS, "export", "")}
        print(steps)
        precisions = bits.split(",")
        for p in precisions:
            steps[f"quantize {p}"] = run_child(root, STEPS, "quantize", p)
            print(steps)
        shutil.rmtree(root / "fp32")
        steps["reference (PyTorch fp32, block by block)"] = run_child(root, STEPS, "reference", "")
        for p in precisions:
            s = steps[f"encode {p}"] = run_child(root, STEPS, "encode", p)
            if "error" not in s and (root / "reference.npy").exists():
                c = token_cosines(np.load(root / f"{p}.npy"), np.load(root / "reference.npy"), mask)
                s.update(cosine_min=float(c.min()), cosine_mean=float(c.mean()))
            print(steps)
    result = {"model": model, "dtype": "bf16", **info, "prompt_tokens": PROMPT_TOKENS, "steps": steps,
              "date": time.strftime("%Y-%m-%d"), "machine": host()}
    save("text_encoder_int8", model, result, to_markdown(result), results)


if __name__ == "__main__":
    main()

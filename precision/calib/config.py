"""CalibConfig: how INT8 DiT engines are calibrated, as one frozen value recorded in the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METHODS = ("minmax", "percentile", "entropy")
SHIPPED_PROMPTS = Path(__file__).with_name("prompts.txt")

# DiT modules kept in float by default (module paths inside WanTransformer3DModel): the input and output
# projections and the condition embedders carry the timestep and text signal everything else is modulated by.
DIT_KEEP_MODULES = ("patch_embedding", "condition_embedder", "norm_out", "proj_out")
FIRST_LAST_MIN_BLOCKS = 8


@dataclass(frozen=True)
class CalibConfig:
    method: str = "minmax"  # activation range: minmax | percentile | entropy
    percentile: float = 99.999  # for method="percentile"
    smooth_alpha: float | None = 0.8  # SmoothQuant migration strength; None turns smoothing off
    # inputs whose 1/s folds into no producer (the FFN's second linear): "mul" (a Mul pass on the activation) or
    # "skip" (not smoothed: faster, and measured 10.5 dB worse on the trained demo)
    smooth_unfoldable: str = "mul"
    keep_modules: tuple[str, ...] = DIT_KEEP_MODULES
    # blocks.0 and the last block stay float: True, False, or None = when the DiT has at least
    # FIRST_LAST_MIN_BLOCKS blocks (Wan2.1 has 30 or 40; in a 2-block model nothing would be left to quantize)
    keep_first_last_blocks: bool | None = None
    activations: str = "u8"  # u8: asymmetric (ONNX Runtime CPU's fast path) | s8: symmetric (TensorRT's form)
    prompts_file: Path | None = None  # default: precision/calib/prompts.txt
    prompts: int = 4  # how many prompts of the file to run
    steps: int = 8  # sampler steps per prompt: the schedule from t=1000 to 0, every step recorded

    def __post_init__(self):
        from ...runtime.errors import SoraError

        if self.method not in METHODS:
            raise SoraError(f"calibration method {self.method!r} unknown (known: {', '.join(METHODS)})")
        if not 0 < self.percentile <= 100:
            raise SoraError(f"calibration percentile {self.percentile} must be in (0, 100]")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise SoraError(f"SmoothQuant alpha {self.smooth_alpha} must be in [0, 1]")
        if self.smooth_unfoldable not in ("mul", "skip"):
            raise SoraError(f"smooth_unfoldable {self.smooth_unfoldable!r} unknown (mul or skip)")
        if self.activations not in ("u8", "s8"):
            raise SoraError(f"activation type {self.activations!r} unknown (u8 or s8)")
        if self.prompts < 1 or self.steps < 1:
            raise SoraError("calibration needs at least 1 prompt and 1 step")

    def read_prompts(self) -> list[str]:
        from ...runtime.errors import SoraError

        path = Path(self.prompts_file) if self.prompts_file else SHIPPED_PROMPTS
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SoraError(f"cannot read calibration prompts {path} ({type(e).__name__})") from None
        prompts = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
        if not prompts:
            raise SoraError(f"{path} holds no calibration prompts (one per line, # for comments)")
        return prompts[: self.prompts]

    def to_dict(self) -> dict:
        return {"method": self.method, "percentile": self.percentile, "smooth_alpha": self.smooth_alpha,
                "smooth_unfoldable": self.smooth_unfoldable,
                "keep_modules": list(self.keep_modules), "keep_first_last_blocks": self.keep_first_last_blocks,
                "activations": self.activations, "prompts_file": str(self.prompts_file or SHIPPED_PROMPTS.name),
                "prompts": self.prompts, "steps": self.steps}

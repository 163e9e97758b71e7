"""Validated options of a shrink run (every check names the CLI option it comes from).

A leaf: imports neither torch nor any pipeline stage (only the preprocessing options and errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from onnxbits.data.preprocess import Preprocess
from onnxbits.errors import ConfigError

#: ``--objective``: what the bit cost measures (:mod:`onnxbits.quant.cost`).
OBJECTIVES = ("bits", "memory", "bops")
#: ``--target``: how the emitted graph carries the learned bits (:mod:`onnxbits.emit.targets`).
TARGETS = ("ort", "exact-sim", "pack")
LOSSES = ("auto", "kd", "ce", "kd+ce")
GRANULARITIES = ("layer", "channel")
AMP_CHOICES = ("off", "bf16", "fp16")
AUGMENTS = ("none", "flip")
# Activations below 3 bits cost more accuracy than the bits they free (README, recipe ablation).
DEFAULT_ACT_FLOOR = 3
#: ``--recipe``: named sets of ShrinkConfig values that replace the defaults (options given
#: explicitly still win). ``finetune``: the defaults (learn the bits, freeze, then 30 % of the
#: steps at frozen bits; best on CIFAR-10 with 5000 labelled images). ``reconstruct``:
#: distillation only at a 10x lower learning rate, every step learns the bits, then each block
#: is trained for 600 steps to reproduce the float block's output instead of the frozen-bit
#: fine-tune (best measured with about 1000 images: ImageNet MobileNetV2 / EfficientNet-Lite).
RECIPES: dict[str, dict[str, object]] = {
    "finetune": {},
    "reconstruct": {"lr": 1e-5, "loss": "kd", "frozen_steps": 0, "reconstruct": 600},
}


@dataclass(frozen=True)
class ShrinkConfig:
    """Everything ``onnxbits shrink`` needs besides the model path."""

    data: Path
    preprocess: Preprocess = field(default_factory=Preprocess)
    output: Path | None = None
    eval_data: Path | None = None
    classes: Path | None = None
    include: str | None = None
    eval_include: str | None = None
    steps: int = 300
    frozen_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-4
    bias_lr: float | None = None
    alpha_lr: float = 1e-2
    augment: str = "none"
    bits_lr: float | None = None
    lam: float = 0.05
    target_bits: float | None = None
    target_size_mb: float | None = None
    target_bops_g: float | None = None
    max_drop: float | None = None
    objective: str = "bits"
    loss: str = "auto"
    temperature: float = 1.0
    reconstruct: int = 0
    reconstruct_lr: float = 1e-4
    min_bits: int = 2
    min_act_bits: int | None = None
    max_bits: int = 8
    granularity: str = "layer"
    target: str = "ort"
    device: str = "cpu"
    amp: str = "off"
    seed: int = 0
    eval_fraction: float = 0.2
    verify_batches: int = 2
    max_train_images: int | None = None
    threads: int | None = None
    checkpoint_every: int = 50
    resume: bool = False
    skip_unsupported: bool = True

    def task_loss(self, has_labels: bool) -> str:
        """The task loss used: ``--loss``, where ``auto`` is ``kd+ce`` with labels, else ``kd``."""
        if self.loss == "auto":
            return "kd+ce" if has_labels else "kd"
        return self.loss

    def budget_objective(self) -> str | None:
        """The objective a budget option implies (None without a budget)."""
        if self.target_bits is not None:
            return "bits"
        if self.target_size_mb is not None:
            return "memory"
        if self.target_bops_g is not None:
            return "bops"
        return None

    @property
    def act_floor(self) -> int:
        """Smallest activation bitlength: ``--min-act-bits``, else
        ``min(max(min_bits, DEFAULT_ACT_FLOOR), max_bits)``."""
        if self.min_act_bits is not None:
            return self.min_act_bits
        return min(max(self.min_bits, DEFAULT_ACT_FLOOR), self.max_bits)

    def amp_dtype(self) -> str | None:
        """``bf16`` / ``fp16`` for :func:`onnxbits.train.device.autocast`, None for ``off``."""
        return None if self.amp == "off" else self.amp

    def __post_init__(self) -> None:
        for name in ("data", "output", "eval_data", "classes"):   # accept str paths from the API
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.frozen_steps is None or 0 <= self.frozen_steps <= self.steps,
             f"--frozen-steps must be between 0 and --steps ({self.steps}), "
             f"got {self.frozen_steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr >= 0, f"--lr must be >= 0, got {self.lr}"),
            (self.bits_lr is None or self.bits_lr >= 0,
             f"--bits-lr must be >= 0, got {self.bits_lr}"),
            (self.alpha_lr >= 0, f"--alpha-lr must be >= 0, got {self.alpha_lr}"),
            (self.bias_lr is None or self.bias_lr >= 0,
             f"--bias-lr must be >= 0, got {self.bias_lr}"),
            (self.augment in AUGMENTS,
             f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}"),
            (self.lam >= 0, f"--lambda must be >= 0, got {self.lam}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.reconstruct >= 0, f"--reconstruct must be >= 0, got {self.reconstruct}"),
            (self.reconstruct_lr >= 0,
             f"--reconstruct-lr must be >= 0, got {self.reconstruct_lr}"),
            (self.objective in OBJECTIVES,
             f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (2 <= self.min_bits <= 16, f"--min-bits must be between 2 and 16, got {self.min_bits}"),
            (2 <= self.max_bits <= 8,
             f"--max-bits must be between 2 and 8 (int8 containers), got {self.max_bits}"),
            (self.min_bits <= self.max_bits,
             f"--min-bits ({self.min_bits}) cannot be larger than --max-bits ({self.max_bits})"),
            (self.min_act_bits is None or 2 <= self.min_act_bits <= self.max_bits,
             f"--min-act-bits must be between 2 and --max-bits ({self.max_bits}), "
             f"got {self.min_act_bits}"),
            (self.granularity in GRANULARITIES,
             f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"),
            (self.target in TARGETS,
             f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}"),
            (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"),
             f"--device must be cpu, cuda, cuda:N or auto, got {self.device!r}"),
            (self.amp in AMP_CHOICES,
             f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}"),
            (0 < self.eval_fraction < 1,
             f"--eval-fraction must be in (0, 1), got {self.eval_fraction}"),
            (self.checkpoint_every >= 0,
             f"--checkpoint-every must be >= 0 steps (0: only on Ctrl-C), "
             f"got {self.checkpoint_every}"),
        ]
        budgets = [n for n, v in (("--target-bits", self.target_bits),
                                  ("--target-size", self.target_size_mb),
                                  ("--target-bops", self.target_bops_g)) if v is not None]
        checks += [
            (len(budgets) <= 1,
             f"{' and '.join(budgets)} cannot be used together; give one budget"),
            (self.target_bits is None or self.min_bits <= self.target_bits <= self.max_bits,
             f"--target-bits must lie between --min-bits ({self.min_bits}) and --max-bits "
             f"({self.max_bits}), got {self.target_bits}"),
            (self.max_drop is None or self.max_drop >= 0,
             f"--max-drop must be >= 0 points, got {self.max_drop}"),
            (self.target_size_mb is None or self.target_size_mb > 0,
             f"--target-size must be > 0 MB, got {self.target_size_mb}"),
            (self.target_bops_g is None or self.target_bops_g > 0,
             f"--target-bops must be > 0 G, got {self.target_bops_g}"),
        ]
        checks.append((not (self.amp == "fp16" and self.device == "cpu"),
                       "--amp fp16 needs a CUDA device (float16 autocast with a gradient scaler); "
                       "use --amp bf16 or --amp off on CPU"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

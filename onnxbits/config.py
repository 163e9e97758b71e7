"""Validated options of a shrink run (every check names the CLI option it comes from).

A leaf: imports neither torch nor any pipeline stage (only the preprocessing options and errors).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxbits.data.preprocess import Preprocess
from onnxbits.errors import ConfigError

#: ``--objective``: what the bit cost measures (:mod:`onnxbits.quant.cost`).
OBJECTIVES = ("bits", "memory", "bops")
#: ``--target``: how the emitted graph carries the learned bits (:mod:`onnxbits.emit.targets`).
TARGETS = ("ort", "exact-sim", "pack")
LOSSES = ("auto", "kd", "ce", "kd+ce")
AMP_CHOICES = ("off", "bf16", "fp16")
AUGMENTS = ("none", "flip")
EVAL_FRACTION = 0.2
# Activations below 3 bits cost more accuracy than the bits they free (README, recipe ablation).
DEFAULT_ACT_FLOOR = 3
DEFAULT_STEPS = 300
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


#: The groups ``onnxbits shrink --help`` lists its options in, in order.
GROUPS = ("data and preprocessing", "budget and accuracy", "training", "output", "hardware",
          "advanced")


def option(default: Any, group: str, help: str, *, flag: str | None = None,  # noqa: A002
           metavar: str | None = None, choices: tuple[str, ...] | None = None,
           path: str | None = None, secondary: str | None = None) -> Any:
    """A :class:`ShrinkConfig` field that is also a ``shrink`` option.

    The CLI builds its options from these fields (:mod:`onnxbits.cli.shrink`): the flag is
    ``--<name with dashes>`` unless ``flag`` says otherwise; ``path`` is ``dir`` (an existing
    folder), ``file`` (an existing file) or ``out`` (a file to write); ``secondary`` is the
    ``--no-...`` flag of a boolean that defaults to True.
    """
    return field(default=default, metadata={
        "group": group, "help": help, "flag": flag, "metavar": metavar, "choices": choices,
        "path": path, "secondary": secondary})


_DATA, _BUDGET, _TRAIN, _OUT, _HW, _ADV = GROUPS


@dataclass(frozen=True)
class ShrinkConfig:
    """Everything ``onnxbits shrink`` needs besides the model path.

    Every field but ``data``, ``classes`` and ``preprocess`` (the data options the commands
    share) is a ``shrink`` option of the same name: ``target_bits`` is ``--target-bits``.
    """

    data: Path
    preprocess: Preprocess = field(default_factory=Preprocess)
    classes: Path | None = None
    eval_data: Path | None = option(
        None, _DATA, "Separate labelled folder (or tensor data, as --data) for measuring; "
        "default: DATA/val if it exists, else a seeded held-out share of DATA (never trained "
        "on).", path="data")
    include: str | None = option(
        None, _DATA, "Fine-tune only on images whose path relative to DATA matches GLOB "
        "(e.g. '*/0[0-4]*.jpg').", metavar="GLOB")
    eval_include: str | None = option(
        None, _DATA, "Measure only on images of the eval folder whose relative path matches "
        "GLOB.", metavar="GLOB")
    eval_fraction: float = option(
        EVAL_FRACTION, _DATA, "Share of DATA held out for measuring when there is no separate "
        "eval set (at most 10000 images).")
    max_train_images: int | None = option(
        None, _DATA, "Use at most this many fine-tune images (a seeded sample).")
    augment: str = option(
        "none", _DATA, "flip: fine-tune on each image and its horizontal mirror. For natural "
        "images, not text or digits.", choices=AUGMENTS)
    target_bits: float | None = option(
        None, _BUDGET, "Budget mode: land on this average per-layer bitlength (lambda adapts).")
    target_size_mb: float | None = option(
        None, _BUDGET, "Budget mode: weight bytes at the learned bits, in MB (objective memory).",
        flag="--target-size")
    target_bops_g: float | None = option(
        None, _BUDGET, "Budget mode: bit operations per image, in G (objective bops).",
        flag="--target-bops")
    max_drop: float | None = option(
        None, _BUDGET, "Accuracy guard: after freezing, raise the bits of the most sensitive "
        "layers until top-1 on the evaluation split is at most this many points below float "
        "(without labels: 100 - agreement with the float model).")
    lam: float = option(
        0.05, _BUDGET, "Weight of the bit cost in the loss: loss = task + lambda * cost (the "
        "starting value in budget mode).", flag="--lambda")
    objective: str = option(
        "bits", _BUDGET, "Bit cost without a budget option: bits = average per-layer bitlength, "
        "memory = bits per weight (size-weighted), bops = MACs x weight bits x activation bits.",
        choices=OBJECTIVES)
    min_bits: int = option(2, _BUDGET, "Smallest bitlength.")
    min_act_bits: int | None = option(
        None, _BUDGET, "Smallest activation bitlength [default: the larger of --min-bits and 3, "
        "at most --max-bits]; weights keep --min-bits.")
    max_bits: int = option(8, _BUDGET, "Largest (and starting) bitlength.")
    steps: int | None = option(
        None, _TRAIN, "Fine-tune steps in total (learning phase + frozen-bit phase) "
        f"[default: {DEFAULT_STEPS}].")
    epochs: float | None = option(
        None, _TRAIN, "Instead of --steps: E passes over the fine-tune images, steps = "
        "ceil(E x images / --batch-size) (e.g. 1 on a full ImageNet train/).", metavar="E")
    frozen_steps: int | None = option(
        None, _TRAIN, "Steps at frozen integer bits at the end [default: 30% of --steps].")
    batch_size: int = option(64, _TRAIN, "Images per step.")
    lr: float = option(1e-4, _TRAIN, "Adam learning rate of the weights and biases.")
    loss: str = option(
        "auto", _TRAIN, "Task loss: kd = distillation from the float model (no labels needed), "
        "ce = cross-entropy on labels, kd+ce = both; auto = kd+ce when the data has labels, "
        "else kd.", choices=LOSSES)
    reconstruct: int = option(
        0, _TRAIN, "At the start of the frozen-bit phase, train each block of the network "
        "(residual blocks whole, at least 3 layers) for K steps to reproduce the float model's "
        "block output on the fine-tune images (BRECQ-style; 0: off). With --frozen-steps 0 it "
        "replaces the frozen-bit fine-tune.", metavar="K")
    seed: int = option(0, _TRAIN, "Random seed.")
    output: Path | None = option(
        None, _OUT, "Output model [default: MODEL.bits.onnx]; the report goes next to it as "
        ".json.", path="out")
    target: str = option(
        "ort", _OUT, "ort = fastest in ONNX Runtime (k-bit weights in int8, activations executed "
        "in 8 bits over the learned range); exact-sim = exact k-bit weights and activations "
        "(QuantizeLinear -> Clip -> DequantizeLinear); pack = smallest file (k-bit weight "
        "streams; onnxbits unpack gives the ort model).", choices=TARGETS)
    checkpoint_every: int = option(
        50, _OUT, "Save the fine-tune to OUT.ckpt every N steps (0: only on Ctrl-C); the file is "
        "deleted when the run succeeds.", metavar="N")
    resume: bool = option(
        False, _OUT, "Continue an interrupted run from OUT.ckpt; the options and the model must "
        "be the same, and the result is the one the uninterrupted run would have given.")
    device: str = option(
        "cpu", _HW, "Where the fine-tune runs: cpu, cuda, cuda:N or auto (CUDA when available). "
        "Under torchrun each process uses cuda:LOCAL_RANK (or the CPU with --device cpu) and "
        "--batch-size is the global batch.")
    amp: str = option(
        "off", _HW, "Mixed precision of the fine-tune's forward pass: bf16 (CPU or CUDA) or fp16 "
        "(CUDA, with a gradient scaler); the quantizers compute in float32.", choices=AMP_CHOICES)
    threads: int | None = option(None, _HW, "CPU threads for torch and ONNX Runtime.")
    skip_unsupported: bool = option(
        True, _ADV, "Keep layers that cannot be quantized in float with a warning, instead of "
        "failing on them.", secondary="--no-skip-unsupported")

    def total_steps(self, n_train: int) -> int:
        """Fine-tune steps: ``--steps``, else ``ceil(epochs x n_train / batch)``, else 300."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_train / min(self.batch_size, n_train)))
        return self.steps if self.steps is not None else DEFAULT_STEPS

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
            if isinstance(value, str | os.PathLike) and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
            elif name in ("data", "eval_data") and value is not None and \
                    not isinstance(value, Path):      # the API's {input name: array} records
                object.__setattr__(self, name, tuple(value))
        checks = [
            (self.steps is None or self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.epochs is None or self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.steps is None or self.epochs is None,
             "--steps and --epochs both set the length of the fine-tune; drop one of them"),
            (self.frozen_steps is None or self.epochs is not None
             or 0 <= self.frozen_steps <= (self.steps or DEFAULT_STEPS),
             f"--frozen-steps must be between 0 and --steps ({self.steps or DEFAULT_STEPS}), "
             f"got {self.frozen_steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr >= 0, f"--lr must be >= 0, got {self.lr}"),
            (self.augment in AUGMENTS,
             f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}"),
            (self.lam >= 0, f"--lambda must be >= 0, got {self.lam}"),
            (self.reconstruct >= 0, f"--reconstruct must be >= 0, got {self.reconstruct}"),
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
        implied = self.budget_objective()
        checks += [     # combinations where one option has no effect: refused, naming both
            (implied is None or self.objective in ("bits", implied),
             f"--objective {self.objective} has no effect with {budgets[0] if budgets else ''}: "
             f"the budget sets the objective ({implied}); drop --objective"),
            (self.min_bits < self.max_bits or not budgets,
             f"--min-bits {self.min_bits} --max-bits {self.max_bits} fix every bitlength, so "
             f"{budgets[0] if budgets else ''} has no effect; drop one of them"),
            (self.eval_data is None or self.eval_fraction == EVAL_FRACTION,
             "--eval-fraction has no effect with --eval-data (the eval folder is measured "
             "whole); drop one of them"),
        ]
        checks.append((not (self.amp == "fp16" and self.device == "cpu"),
                       "--amp fp16 needs a CUDA device (float16 autocast with a gradient scaler); "
                       "use --amp bf16 or --amp off on CPU"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

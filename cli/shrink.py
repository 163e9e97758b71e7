"""``onnxbits shrink``: learn per-layer bitlengths and write MODEL.bits.onnx + MODEL.bits.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from onnxbits.cli.errors import handle_errors
from onnxbits.cli.options import preprocess_from_options, preprocess_options
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from onnxbits.config import (
    AMP_CHOICES,
    AUGMENTS,
    GRANULARITIES,
    LOSSES,
    OBJECTIVES,
    RECIPES,
    TARGETS,
    ShrinkConfig,
)


def _as_options(values: dict[str, object]) -> str:
    """``{"frozen_steps": 0}`` -> ``--frozen-steps 0``."""
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in values.items())


class _ProgressView:
    """Render pipeline events as a rich progress bar on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.task: Any = None

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "stage":
            self._finish()
            self.task = self.progress.add_task(info["name"], total=info.get("total") or 1, info="")
            if not self.progress.live.is_started:
                self.progress.start()
        elif kind == "decode":
            self.progress.advance(self.task, info["n"])
        elif kind == "step":
            r = info["record"]
            self.progress.update(self.task, advance=1, info=(
                f"{r.phase} loss {r.task:.4f} bits {r.avg_bits:.2f}"))
        elif kind == "block":
            r = info["result"]
            self.progress.update(self.task, info=(
                f"reconstructed block {r.block} ({len(r.layers)} layers): "
                f"mse {r.loss_before:.4g} -> {r.loss_after:.4g}"))

    def _finish(self) -> None:
        if self.task is not None:
            total = self.progress.tasks[-1].total
            self.progress.update(self.task, completed=total)

    def close(self) -> None:
        self._finish()
        if self.progress.live.is_started:
            self.progress.stop()


@click.command("shrink")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@preprocess_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model (default MODEL.bits.onnx); the report goes next to it as .json.")
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Separate labelled folder for measuring; default: DATA/val if it exists, else a "
                   "seeded held-out share of DATA (never trained on).")
@click.option("--include", metavar="GLOB",
              help="Fine-tune only on images whose path relative to DATA matches GLOB "
                   "(e.g. '*/0[0-4]*.jpg').")
@click.option("--eval-include", metavar="GLOB",
              help="Measure only on images of the eval folder whose relative path matches GLOB.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default="finetune",
              show_default=True,
              help="Defaults for the training options: finetune = learn the bits, freeze, "
                   "fine-tune at frozen bits (best with thousands of images); reconstruct = "
                   f"{_as_options(RECIPES['reconstruct'])} (best measured with about 1000 "
                   "images, e.g. ImageNet mobile networks). Options given explicitly win.")
@click.option("--steps", type=int, default=300, show_default=True,
              help="Fine-tune steps in total (learning phase + frozen-bit phase).")
@click.option("--frozen-steps", type=int, default=None,
              help="Steps at frozen integer bits at the end (default 30%% of --steps).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per step.")
@click.option("--lr", type=float, default=1e-4, show_default=True,
              help="Adam learning rate of the weights and biases.")
@click.option("--bias-lr", type=float, default=None,
              help="Adam learning rate of the biases [default: --lr].")
@click.option("--augment", type=click.Choice(AUGMENTS), default="none", show_default=True,
              help="flip: fine-tune on each image and its horizontal mirror (teacher logits of "
                   "both computed once). For natural images, not text or digits.")
@click.option("--alpha-lr", type=float, default=1e-2, show_default=True,
              help="Adam learning rate of the clip values (log-parametrised); 0 keeps the "
                   "calibrated min-max values.")
@click.option("--bits-lr", type=float, default=None,
              help="Adam learning rate of the bitlengths (default 2 (max-min) / learning steps).")
@click.option("--lambda", "lam", type=float, default=0.05, show_default=True,
              help="Weight of the bit cost in the loss: loss = task + lambda * cost.")
@click.option("--target-bits", type=float, default=None,
              help="Budget mode: land on this average per-layer bitlength (lambda adapts).")
@click.option("--target-size", "target_size_mb", type=float, default=None,
              help="Budget mode: weight bytes at the learned bits, in MB (objective memory).")
@click.option("--target-bops", "target_bops_g", type=float, default=None,
              help="Budget mode: bit operations per image, in G (objective bops).")
@click.option("--max-drop", type=float, default=None,
              help="Accuracy guard: after freezing, raise the bits of the most sensitive layers "
                   "until top-1 on the evaluation split is at most this many points below float "
                   "(without labels: 100 - agreement with the float model).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="bits", show_default=True,
              help="Bit cost: bits = average per-layer bitlength, memory = bits per weight "
                   "(size-weighted), bops = MACs x weight bits x activation bits.")
@click.option("--loss", type=click.Choice(LOSSES), default="auto", show_default=True,
              help="Task loss: kd = distillation from the float model (no labels needed), "
                   "ce = cross-entropy on labels, kd+ce = both; auto = kd+ce when the data "
                   "has labels, else kd.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Distillation temperature T: kd = T^2 KL(softmax(teacher/T) || "
                   "softmax(student/T)).")
@click.option("--reconstruct", type=int, default=0, show_default=True, metavar="K",
              help="At the start of the frozen-bit phase, train each block of the network "
                   "(residual blocks whole, at least 3 layers) for K steps to reproduce the "
                   "float model's block output on the fine-tune images (BRECQ-style; 0: off). "
                   "With --frozen-steps 0 it replaces the frozen-bit fine-tune.")
@click.option("--reconstruct-lr", type=float, default=1e-4, show_default=True,
              help="Adam learning rate of weights and biases during --reconstruct.")
@click.option("--min-bits", type=int, default=2, show_default=True, help="Smallest bitlength.")
@click.option("--min-act-bits", type=int, default=None,
              help="Smallest activation bitlength [default: the larger of --min-bits and 3, at "
                   "most --max-bits]; weights keep --min-bits.")
@click.option("--max-bits", type=int, default=8, show_default=True,
              help="Largest (and starting) bitlength.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default="layer",
              show_default=True, help="One weight bitlength per layer or per output channel.")
@click.option("--target", type=click.Choice(TARGETS), default="ort", show_default=True,
              help="ort = fastest in ONNX Runtime (k-bit weights in int8, activations executed in "
                   "8 bits over the learned range); exact-sim = exact k-bit weights and "
                   "activations (QuantizeLinear -> Clip -> DequantizeLinear).")
@click.option("--device", default="cpu", show_default=True,
              help="Where the fine-tune runs: cpu, cuda, cuda:N or auto (CUDA when available). "
                   "Under torchrun each process uses cuda:LOCAL_RANK (or the CPU with --device "
                   "cpu) and --batch-size is the global batch.")
@click.option("--amp", type=click.Choice(AMP_CHOICES), default="off", show_default=True,
              help="Mixed precision of the fine-tune's forward pass: bf16 (CPU or CUDA) or fp16 "
                   "(CUDA, with a gradient scaler); the quantizers compute in float32.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--eval-fraction", type=float, default=0.2, show_default=True,
              help="Share of DATA held out for measuring when there is no separate eval set.")
@click.option("--max-train-images", type=int, default=None,
              help="Use at most this many fine-tune images (a seeded sample).")
@click.option("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True, metavar="N",
              help="Save the fine-tune to OUT.ckpt every N steps (0: only on Ctrl-C); the file is "
                   "deleted when the run succeeds.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from OUT.ckpt; the options and the model must be "
                   "the same, and the result is the one the uninterrupted run would have given.")
@click.option("--skip-unsupported/--no-skip-unsupported", default=True, show_default=True,
              help="Keep layers that cannot be quantized in float with a warning, instead of "
                   "failing on them.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def shrink_command(model: Path, data: Path, classes: Path | None, output: Path | None,
                   eval_data: Path | None, as_json: bool, quiet: bool, **options: Any) -> None:
    """Learn a bitlength for every layer of MODEL and write MODEL.bits.onnx plus a JSON report.

    Example: onnxbits shrink resnet20.onnx --data cifar/ --preset cifar10 --steps 400

    \b
    On several GPUs (data parallel; only rank 0 writes and prints):
    torchrun --nproc_per_node=4 -m onnxbits.cli.main shrink MODEL --data DIR --device cuda
    """
    from onnxbits.pipeline.run import shrink
    from onnxbits.train.distributed import world_size

    pre = preprocess_from_options(**options)
    context = click.get_current_context()
    for key, value in RECIPES[options["recipe"]].items():
        if context.get_parameter_source(key) is ParameterSource.DEFAULT:
            options[key] = value
    keys = ("steps", "frozen_steps", "batch_size", "lr", "bias_lr", "augment", "alpha_lr",
            "bits_lr", "lam", "objective", "loss", "temperature", "reconstruct", "reconstruct_lr",
            "min_bits", "min_act_bits", "max_bits", "granularity", "target", "device", "amp",
            "seed",
            "eval_fraction", "max_train_images", "threads", "include", "eval_include",
            "target_bits", "target_size_mb", "target_bops_g", "max_drop", "checkpoint_every",
            "resume", "skip_unsupported")
    cfg = ShrinkConfig(data=data, preprocess=pre, output=output, eval_data=eval_data,
                       classes=classes, **{k: options[k] for k in keys})
    console = Console(stderr=True)
    worker = world_size() > 1 and os.environ.get("RANK", "0") != "0"
    view = None if (quiet or as_json or worker) else _ProgressView(console)
    try:
        result = shrink(model, cfg, on_event=view)
    except KeyboardInterrupt:
        from onnxbits.cli.errors import fail

        from onnxbits.pipeline.run import default_output
        from onnxbits.train.checkpoint import checkpoint_path

        if view is not None:
            view.close()
            view = None
        if worker:            # rank 0 saves the checkpoint and says so
            sys.exit(130)
        ckpt = checkpoint_path(output if output is not None else default_output(model))
        if ckpt.is_file():
            fail(f"interrupted; the fine-tune is saved in {ckpt}: rerun the same command with "
                 "--resume to continue", 130)
        fail("interrupted before the fine-tune started; nothing was saved: rerun the command", 130)
        return
    finally:
        if view is not None:
            view.close()
    if not result.main:       # a torchrun process other than rank 0: rank 0 reports
        return
    for warning in result.report.get("warnings", []):
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result.report))
        return
    from onnxbits.cli.report import print_report

    from onnxbits.report.model import analyze_model

    out = Console(width=None if sys.stdout.isatty() else 160)
    print_report(analyze_model(result.output), out)
    acc = result.report["accuracy"]
    for name in ("float", "quantized", "torch_sim_k_bit"):
        a = acc[name]
        top = f"top-1 {a['top1']:.2f}  top-5 {a['top5']:.2f}  " if "top1" in a else ""
        out.print(f"{name:>16}: {top}agreement with float {a['agreement']:.2f}%")
    v = result.report["verification"]
    out.print(f"verified in ONNX Runtime: max {v['max_steps']:.2f} quantization steps "
              f"over {v['tensors']} tensors")
    guard = result.report.get("guard") or {}
    if guard and not guard.get("held"):
        click.echo(f"Warning: --max-drop {guard['max_drop']} did not hold: the drop is "
                   f"{guard['final_drop']:.2f} points after raising {len(guard['raised'])} "
                   "group(s); see 'guard' in the JSON report", err=True)
    out.print("wrote " + ", ".join(map(str, [result.output, result.report_path, *result.outputs])))

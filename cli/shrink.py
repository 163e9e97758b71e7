"""``onnxbits shrink``: learn per-layer bitlengths and write MODEL.bits.onnx + MODEL.bits.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from onnxbits.cli.errors import handle_errors
from onnxbits.cli.groups import GroupedCommand, GroupedOption
from onnxbits.cli.options import preprocess_from_options, preprocess_options
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from onnxbits.config import GROUPS, RECIPES, ShrinkConfig


def _as_options(values: dict[str, object]) -> str:
    """``{"frozen_steps": 0}`` -> ``--frozen-steps 0``."""
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in values.items())


class _ProgressView:
    """Render pipeline events as a rich progress bar on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"),
                                 TimeRemainingColumn(elapsed_when_finished=True),
                                 console=console, transient=False)
        self.task: Any = None

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "stage":
            self._complete()
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

    def _complete(self) -> None:
        """Mark the current stage done (it ended: the next one started or the run finished)."""
        if self.task is not None:
            total = self.progress.tasks[-1].total
            self.progress.update(self.task, completed=total)

    def close(self, finished: bool = True) -> None:
        """Stop the display; an interrupted or failed run leaves its bar where it stopped."""
        if finished:
            self._complete()
        if self.progress.live.is_started:
            self.progress.stop()


def _click_type(f: dataclasses.Field) -> Any:
    meta = f.metadata
    if meta["choices"]:
        return click.Choice(meta["choices"])
    if meta["path"] is not None:
        exists = meta["path"] in ("dir", "file", "data")
        return click.Path(exists=exists, file_okay=meta["path"] != "dir",
                          dir_okay=meta["path"] in ("dir", "data"), path_type=Path)
    base = str(f.type).replace("| None", "").strip()
    return {"int": int, "float": float, "str": str}[base]


def _config_option(f: dataclasses.Field) -> Callable[[Any], Any]:
    """The click option of a :class:`ShrinkConfig` field (:func:`onnxbits.config.option`)."""
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    decls = ["-o", flag] if f.name == "output" else [flag]
    kwargs: dict[str, Any] = {"help": meta["help"], "cls": GroupedOption, "group": meta["group"],
                              "default": f.default, "show_default": f.default is not None}
    if str(f.type) == "bool":
        if meta["secondary"]:
            decls = [f"{flag}/{meta['secondary']}"]
        else:
            kwargs.update(is_flag=True, show_default=False)
    else:
        kwargs.update(type=_click_type(f), metavar=meta["metavar"])
    return click.option(*decls, f.name, **kwargs)


#: The ShrinkConfig fields that are ``shrink`` options (all but data, classes, preprocess).
CONFIG_FIELDS = [f for f in dataclasses.fields(ShrinkConfig) if "group" in f.metadata]
_TRAIN, _OUTPUT = "training", "output"


def config_options(func: Any) -> Any:
    """Add one option per :data:`CONFIG_FIELDS` entry, in the config's order."""
    for f in reversed(CONFIG_FIELDS):
        func = _config_option(f)(func)
    return func


@click.command("shrink", cls=GroupedCommand, groups=GROUPS)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@preprocess_options
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default="finetune",
              show_default=True, cls=GroupedOption, group=_TRAIN,
              help="Defaults for the training options: finetune = learn the bits, freeze, "
                   "fine-tune at frozen bits (best with thousands of images); reconstruct = "
                   f"{_as_options(RECIPES['reconstruct'])} (best measured with about 1000 "
                   "images, e.g. ImageNet mobile networks). Options given explicitly win.")
@config_options
@click.option("--json", "as_json", is_flag=True, cls=GroupedOption, group=_OUTPUT,
              help="Print the report as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, cls=GroupedOption, group=_OUTPUT,
              help="No progress bar.")
@handle_errors
def shrink_command(model: Path, data: Path, classes: Path | None, as_json: bool, quiet: bool,
                   **options: Any) -> None:
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
    cfg = ShrinkConfig(data=data, preprocess=pre, classes=classes,
                       **{f.name: options[f.name] for f in CONFIG_FIELDS})
    output = cfg.output
    console = Console(stderr=True)
    worker = world_size() > 1 and os.environ.get("RANK", "0") != "0"
    view = None if (quiet or as_json or worker) else _ProgressView(console)
    finished = False
    try:
        result = shrink(model, cfg, on_event=view)
        finished = True
    except KeyboardInterrupt:
        from onnxbits.cli.errors import fail

        from onnxbits.pipeline.run import default_output
        from onnxbits.train.checkpoint import checkpoint_path

        if view is not None:
            view.close(finished=False)
            view = None
        if worker:            # rank 0 saves the checkpoint and says so
            sys.exit(130)
        ckpt = checkpoint_path(output if output is not None else default_output(model))
        if ckpt.is_file():
            fail(f"interrupted; the fine-tune is saved in {ckpt}: rerun the same command with "
                 "--resume to continue", 130)
        fail("interrupted before the fine-tune started; nothing was saved: rerun the command", 130)
        return
    finally:     # a failed run leaves its bar where it stopped
        if view is not None:
            view.close(finished=finished)
    if not result.main:       # a torchrun process other than rank 0: rank 0 reports
        return
    for warning in result.report.get("warnings", []):
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result.report))
        return
    from onnxbits.cli.report import print_report

    from onnxbits.report.measured import measured_lines
    from onnxbits.report.model import analyze_model

    out = Console(width=None if sys.stdout.isatty() else 160)
    print_report(analyze_model(result.output), out)
    for line in measured_lines(result.report):
        out.print(line)
    guard = result.report.get("guard") or {}
    if guard and not guard.get("held"):
        click.echo(f"Warning: --max-drop {guard['max_drop']} did not hold: the drop is "
                   f"{guard['final_drop']:.2f} points after raising {len(guard['raised'])} "
                   "group(s); see 'guard' in the JSON report", err=True)
    out.print("wrote " + ", ".join(map(str, [result.output, result.report_path, *result.outputs])))

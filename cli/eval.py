"""``onnxbits eval``: top-1/top-5 accuracy of an ONNX model in ONNX Runtime."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np
from onnxbits.cli.errors import handle_errors
from onnxbits.cli.options import preprocess_from_options, preprocess_options

from onnxbits.data.files import load_image_set, select_files, split_data_dir
from onnxbits.data.stream import open_images
from onnxbits.errors import DataError
from onnxbits.report.evaluate import evaluate_model


@contextmanager
def progress_bar(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(k)`` driving a rich progress bar on stderr.

    The bar is a no-op when disabled or when stderr is not a terminal.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda k: None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k: bar.advance(task, k)


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """Return ``limit`` row indices spread evenly over ``range(n)`` (all when limit >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return (np.arange(limit) * n) // limit


@click.command("eval")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@preprocess_options
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per ONNX Runtime run (a model with a fixed batch uses its own).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads. Default: all cores.")
@click.option("--include", metavar="GLOB",
              help="Measure only images whose path relative to the data folder matches GLOB "
                   "(e.g. '*/0[5-9]*.jpg').")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Measure only N images, spread evenly over the sorted set.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@handle_errors
def eval_command(model: Path, data: Path, classes: Path | None, batch_size: int,
                 threads: int | None, include: str | None, limit: int | None, as_json: bool,
                 quiet: bool,
                 **options: Any) -> None:
    """Measure top-1/top-5 accuracy of MODEL (ONNX) on the labelled images in --data.

    \b
    onnxbits eval resnet20.onnx --data cifar10/test --preset cifar10
    onnxbits eval mobilenet_v2.onnx --data val/ --preset tf-mobilenet --json
    """
    pre = preprocess_from_options(**options)
    train_dir, val_dir = split_data_dir(data)
    eval_dir = val_dir or train_dir
    image_set = load_image_set(eval_dir, classes)
    if not image_set.has_labels:
        raise DataError(f"eval needs labels, but '{eval_dir}' has no labels.csv and no class "
                        "folders; add labels.csv (file,label) or sort the images into "
                        "<class>/ folders")
    image_set = select_files(image_set, include, "--include")
    image_set = image_set.subset(evenly_spaced(len(image_set), limit))
    show = not (quiet or as_json)
    start = time.perf_counter()
    # one pass over the images: decoded batch by batch while the model runs, never all held
    tensors, skipped = open_images(image_set, pre, budget=0, workers=min(8, os.cpu_count() or 1))
    with progress_bar("evaluating", len(tensors), show) as advance:
        result = evaluate_model(model, tensors, batch_size=batch_size, threads=threads,
                                progress=advance)
    skipped += len(getattr(tensors, "bad", ()))     # met while streaming
    seconds = time.perf_counter() - start
    if as_json:
        record = {"model": str(model), "data": str(eval_dir), **result.to_dict(),
                  "skipped": skipped, "preprocess": dataclasses.asdict(pre),
                  "seconds": round(seconds, 3)}
        click.echo(json.dumps(record))
        return
    click.echo(f"model   {model}")
    click.echo(f"data    {eval_dir}  ({result.n} images"
               + (f", {skipped} unreadable skipped)" if skipped else ")"))
    click.echo(f"top-1   {result.top1:.2f} %")
    click.echo(f"top-5   {result.top5:.2f} %")

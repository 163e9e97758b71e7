"""``onnxbits eval``: top-1/top-5 accuracy of an ONNX model in ONNX Runtime, and the fidelity of
every output to a reference (float) model on any data."""

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
from onnxbits.data.tensors import input_specs, is_tensor_data, load_tensor_set
from onnxbits.errors import DataError
from onnxbits.graph.io import load_model
from onnxbits.report.evaluate import evaluate_fidelity, evaluate_model
from onnxbits.report.fidelity import Fidelity


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
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="FLOAT.onnx", help="Also measure every output's fidelity to this model "
              "(the float one MODEL came from): SQNR, cosine, relative L2, argmax agreement. "
              "Needs no labels.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@handle_errors
def eval_command(model: Path, data: Path, classes: Path | None, batch_size: int,
                 threads: int | None, include: str | None, limit: int | None,
                 reference: Path | None, as_json: bool, quiet: bool,
                 **options: Any) -> None:
    """Measure top-1/top-5 accuracy of MODEL (ONNX) on the labelled images in --data, and with
    --reference the fidelity of every output to the float model (any data, tensors included).

    \b
    onnxbits eval resnet20.onnx --data cifar10/test --preset cifar10
    onnxbits eval mobilenet_v2.onnx --data val/ --preset tf-mobilenet --json
    onnxbits eval detector.bits.onnx --data val.npz --reference detector.onnx
    """
    if is_tensor_data(data):
        _eval_tensors(model, data, reference, batch_size, threads, limit, as_json, quiet,
                      include)
        return
    pre = preprocess_from_options(**options)
    train_dir, val_dir = split_data_dir(data)
    eval_dir = val_dir or train_dir
    image_set = load_image_set(eval_dir, classes)
    if not image_set.has_labels and reference is None:
        raise DataError(f"eval needs labels, but '{eval_dir}' has no labels.csv and no class "
                        "folders; add labels.csv (file,label) or sort the images into "
                        "<class>/ folders, or give --reference FLOAT.onnx to measure fidelity")
    image_set = select_files(image_set, include, "--include")
    image_set = image_set.subset(evenly_spaced(len(image_set), limit))
    show = not (quiet or as_json)
    start = time.perf_counter()
    # one pass over the images: decoded batch by batch while the model runs, never all held
    tensors, skipped = open_images(image_set, pre, budget=0, workers=min(8, os.cpu_count() or 1))
    result, metrics = None, []
    with progress_bar("evaluating", len(tensors), show) as advance:
        if image_set.has_labels:
            result = evaluate_model(model, tensors, batch_size=batch_size, threads=threads,
                                    progress=advance)
        if reference is not None:
            metrics = evaluate_fidelity(model, reference, tensors, batch_size, threads)
    skipped += len(getattr(tensors, "bad", ()))     # met while streaming
    seconds = time.perf_counter() - start
    n = result.n if result is not None else len(tensors) - len(getattr(tensors, "bad", ()))
    if as_json:
        record = {"model": str(model), "data": str(eval_dir),
                  **(result.to_dict() if result is not None else {"n": n}),
                  "skipped": skipped, "preprocess": dataclasses.asdict(pre),
                  "seconds": round(seconds, 3)}
        if reference is not None:
            record.update(reference=str(reference), fidelity=[m.to_dict() for m in metrics])
        click.echo(json.dumps(record))
        return
    click.echo(f"model   {model}")
    click.echo(f"data    {eval_dir}  ({n} images"
               + (f", {skipped} unreadable skipped)" if skipped else ")"))
    if result is not None:
        click.echo(f"top-1   {result.top1:.2f} %")
        click.echo(f"top-5   {result.top5:.2f} %")
    _echo_fidelity(reference, metrics)


def _echo_fidelity(reference: Path | None, metrics: list[Fidelity]) -> None:
    if reference is None:
        return
    click.echo(f"fidelity to {reference}:")
    for m in metrics:
        agree = f"  argmax agreement {m.agreement:.2f} %" if m.agreement is not None else ""
        click.echo(f"  {m.output}: SQNR {m.sqnr_db:.1f} dB  cosine {m.cosine:.4f}  "
                   f"relative L2 {m.rel_l2:.4f}{agree}")


def _eval_tensors(model: Path, data: Path, reference: Path | None, batch_size: int,
                  threads: int | None, limit: int | None, as_json: bool, quiet: bool,
                  include: str | None) -> None:
    """``eval`` on tensor data (:mod:`onnxbits.data.tensors`): fidelity to ``reference``."""
    if reference is None:
        raise click.UsageError(f"--data {data} is tensor data, which has no labels: give "
                               "--reference FLOAT.onnx to measure fidelity to the float model")
    if include is not None:
        raise click.UsageError("--include selects image files; it does not apply to tensor data")
    tensors = load_tensor_set(data, input_specs(load_model(model)))
    tensors = tensors.subset(evenly_spaced(len(tensors), limit))
    start = time.perf_counter()
    with progress_bar("evaluating", len(tensors), not (quiet or as_json)) as advance:
        metrics = evaluate_fidelity(model, reference, tensors, batch_size, threads, advance)
    seconds = time.perf_counter() - start
    if as_json:
        click.echo(json.dumps({"model": str(model), "data": str(data), "n": len(tensors),
                               "reference": str(reference),
                               "fidelity": [m.to_dict() for m in metrics],
                               "seconds": round(seconds, 3)}))
        return
    click.echo(f"model   {model}")
    click.echo(f"data    {data}  ({len(tensors)} samples)")
    _echo_fidelity(reference, metrics)

"""``onnxbits compare``: per-layer bits, totals and accuracy of two models side by side."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from onnxbits.cli.errors import handle_errors
from onnxbits.cli.eval import evenly_spaced, progress_bar
from onnxbits.cli.options import PREPROCESS_KEYS, preprocess_from_options, preprocess_options

from onnxbits.data.files import load_image_set, split_data_dir
from onnxbits.data.stream import open_images
from onnxbits.report.compare import compare_models

_MODEL = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("compare")
@click.argument("model_a", type=_MODEL, metavar="A.onnx")
@click.argument("model_b", type=_MODEL, metavar="B.onnx")
@preprocess_options(data_required=False)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per ONNX Runtime run (a model with a fixed batch uses its own).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads. Default: all cores.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Measure on only N images, spread evenly over the sorted set (needs --data).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the comparison as one JSON object on stdout (nothing else on stdout).")
@click.option("--markdown", is_flag=True,
              help="Print the layer and totals tables as Markdown.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@handle_errors
def compare_command(model_a: Path, model_b: Path, data: Path | None, classes: Path | None,
                    batch_size: int, threads: int | None, limit: int | None, as_json: bool,
                    markdown: bool, quiet: bool, **options: Any) -> None:
    """Compare bits, bytes, BOPs and (with --data) top-1/top-5 of two models of one network.

    Layers are matched by node name, else in graph order. With --data the images are decoded
    once and both models run in ONNX Runtime on them.

    \b
    onnxbits compare mobilenet.bits.onnx mobilenet.int8.onnx
    onnxbits compare a.bits.onnx b.int8.onnx --data val/ --preset tf-mobilenet --markdown
    """
    if as_json and markdown:
        raise click.UsageError("--json cannot be used with --markdown")
    if data is None:
        given = [key for key in PREPROCESS_KEYS if options.get(key) is not None]
        given += [key for key, value in (("classes", classes), ("limit", limit))
                  if value is not None]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} needs --data DIR")
    show = not (quiet or as_json)
    tensors, record = None, {}
    if data is not None:
        pre = preprocess_from_options(**options)
        train_dir, val_dir = split_data_dir(data)
        eval_dir = val_dir or train_dir
        image_set = load_image_set(eval_dir, classes)
        image_set = image_set.subset(evenly_spaced(len(image_set), limit))
        with progress_bar("decoding", len(image_set), show) as advance:
            tensors, skipped = open_images(image_set, pre, workers=min(8, os.cpu_count() or 1),
                                           progress=advance)
        record = {"data": str(eval_dir), "skipped": skipped,
                  "preprocess": dataclasses.asdict(pre)}
    with progress_bar("evaluating A and B", 2 * len(tensors) if tensors else 0,
                      show and tensors is not None) as advance:
        result = compare_models(model_a, model_b, tensors, batch_size=batch_size,
                                threads=threads, progress=advance)
    if record:
        record["skipped"] += len(getattr(tensors, "bad", ()))     # met while streaming
    if as_json:
        click.echo(json.dumps({**result.to_dict(), **record}))
    elif markdown:
        click.echo(result.to_markdown(), nl=False)
    else:
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 160)
        console.print(result.to_rich_table())
        console.print(result.to_rich_totals())
        if record:
            console.print(f"data: {record['data']}"
                          + (f" ({record['skipped']} unreadable images skipped)"
                             if record["skipped"] else ""))

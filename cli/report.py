"""``onnxbits report``: per-layer bits, params, MACs and sizes of any ONNX model."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from onnxbits.cli.errors import handle_errors

from onnxbits.graph.io import write_bytes_atomic
from onnxbits.report.measured import measured_lines, run_report_of
from onnxbits.report.model import ModelReport, analyze_model
from onnxbits.report.plot import plot, to_html


def print_report(result: ModelReport, console: object | None = None) -> None:
    """Print the per-layer table (its caption holds the totals) with rich."""
    from rich.console import Console

    out = console if isinstance(console, Console) else Console(
        width=None if sys.stdout.isatty() else 160)
    out.print(result.to_rich_table())


@click.command("report")
@click.argument("model", type=click.Path(dir_okay=True, path_type=Path), metavar="MODEL.onnx")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as one JSON object on stdout (nothing else on stdout).")
@click.option("--markdown", is_flag=True, help="Print the report as a Markdown table and totals.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE.png", help="Write a PNG of bits, params and MACs per layer.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE.html", help="Write a self-contained HTML page (table + embedded plot).")
@handle_errors
def report_command(model: Path, as_json: bool, markdown: bool, plot_path: Path | None,
                   html_path: Path | None) -> None:
    """Show learned weight/activation bits, params, MACs and sizes per layer of MODEL.onnx.

    Works on float models, onnxbits outputs (every target, pack included) and ONNX Runtime QDQ
    models. Bits come from the onnxbits metadata when present, else from the
    QuantizeLinear/DequantizeLinear nodes. Each quantized tensor shows three precisions: learned
    (W bits, A bits), stored in the file (W stored, A stored) and executed by ONNX Runtime
    (A exec; weights execute at their learned bits). Next to the shrink run's MODEL.json, the
    accuracy, per-output fidelity and verification it measured are shown too.
    """
    if as_json and markdown:
        raise click.UsageError("--json cannot be used with --markdown")
    result = analyze_model(model)
    run = run_report_of(model) if model.is_file() else None
    measured = measured_lines(run) if run is not None else []
    png = plot(result, plot_path) if plot_path or html_path else None
    if html_path:
        write_bytes_atomic(to_html(result, png, measured).encode("utf-8"), html_path)
    if as_json:
        click.echo(result.to_json())
    elif markdown:
        click.echo(result.to_markdown(), nl=False)
    else:
        print_report(result)
        for line in measured:
            click.echo(line)
    for path, what in ((plot_path, "plot"), (html_path, "HTML report")):
        if path:
            click.echo(f"wrote {what}: {path}", err=True)

"""``onnxbits`` command group: shrink, report, eval."""

from __future__ import annotations

import click

from onnxbits import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxbits")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Learn per-layer bitlengths for a pretrained ONNX network and emit a smaller ONNX model.

    \b
    onnxbits shrink model.onnx --data images/      learn bitlengths, write model.bits.onnx + report
    onnxbits report model.bits.onnx                per-layer bitlength table, sizes, BOPs
    onnxbits eval model.bits.onnx --data val/      top-1/top-5 in ONNX Runtime
    onnxbits compare a.bits.onnx b.int8.onnx --data val/   side by side: bits, bytes, BOPs, accuracy
    """
    from onnxbits.cli.errors import show_library_warnings

    show_library_warnings()
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from onnxbits.cli.compare import compare_command
    from onnxbits.cli.eval import eval_command
    from onnxbits.cli.report import report_command
    from onnxbits.cli.shrink import shrink_command

    main.add_command(shrink_command)
    main.add_command(report_command)
    main.add_command(eval_command)
    main.add_command(compare_command)
    from onnxbits.cli.emit import pack_command, unpack_command

    main.add_command(pack_command)
    main.add_command(unpack_command)


_register()

if __name__ == "__main__":
    main()

"""``onnxbits pack`` / ``onnxbits unpack``: move an emitted model between the ``ort`` and ``pack``
targets without re-running the fine-tune."""

from __future__ import annotations

from pathlib import Path

import click
from onnxbits.cli.errors import handle_errors

from onnxbits.errors import ConfigError


def _output(model: Path, output: Path | None, suffix: str) -> Path:
    stem = model.name[:-5] if model.name.endswith(".onnx") else model.name
    for old in (".pack", ".ort"):
        if stem.endswith(old):
            stem = stem[: -len(old)]
    out = output if output is not None else model.with_name(f"{stem}{suffix}.onnx")
    if out.resolve() == model.resolve():
        raise ConfigError(f"output {out} is the input model; choose another -o/--output path")
    return out


@click.command("unpack")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                metavar="PACKED.onnx")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model (default: PACKED with .pack replaced by .ort).")
@handle_errors
def unpack_command(model: Path, output: Path | None) -> None:
    """Turn a --target pack model into the --target ort model (fast in ONNX Runtime).

    The result is byte for byte the model `onnxbits shrink --target ort` would have written:
    int2/int4/bit-stream weights become int8 again, the opset is restored.

    Example: onnxbits unpack resnet20.pack.onnx -o resnet20.ort.onnx
    """
    from onnxbits.emit.pack import unpack_model
    from onnxbits.graph.io import load_model, save_model_atomic

    out = _output(model, output, ".ort")
    result = unpack_model(load_model(model))
    save_model_atomic(result, out)
    click.echo(f"wrote {out} ({out.stat().st_size:,} bytes; packed {model.stat().st_size:,})")


@click.command("pack")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                metavar="MODEL.onnx")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model (default: MODEL.pack.onnx).")
@click.option("--bitpack/--no-bitpack", default=True, show_default=True,
              help="Store 2-, 3-, 5-, 6- and 7-bit weights as bit streams (else in int4/int8).")
@handle_errors
def pack_command(model: Path, output: Path | None, bitpack: bool) -> None:
    """Store the weights of a --target ort model in as few bits as they have (--target pack).

    `onnxbits unpack` restores the ort model byte for byte.

    Example: onnxbits pack resnet20.bits.onnx -o resnet20.pack.onnx
    """
    from onnxbits.emit.pack import pack_model
    from onnxbits.graph.io import load_model, save_model_atomic

    out = _output(model, output, ".pack")
    result = pack_model(load_model(model), bitpack=bitpack)
    save_model_atomic(result, out)
    click.echo(f"wrote {out} ({out.stat().st_size:,} bytes; was {model.stat().st_size:,})")

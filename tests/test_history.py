"""Tests for onnxbits.train.history: JSON/CSV round trips, the history plot and the run outputs."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from onnxbits.errors import InvalidModelError
from onnxbits.pipeline.outputs import run_output_paths, write_run_outputs
from onnxbits.report.history import plot_history
from onnxbits.report.model import analyze_model
from onnxbits.train.history import (
    FIELDS,
    StepRecord,
    history_from_csv,
    history_from_json,
    history_to_csv,
    history_to_json,
)
from tests import builders

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_history(steps: int = 40, frozen: int = 12, lam_step: float = 0.0) -> list[StepRecord]:
    """Bits fall from 8 during the learn phase and stay put after; the task loss is noisy."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(steps):
        learn = step < steps - frozen
        bits = 8.0 - 3.0 * min(step, steps - frozen) / steps
        bits = bits if learn else float(math.floor(bits))
        task = float(abs(0.5 * math.exp(-step / 10) + 0.02 * rng.standard_normal()))
        lam = 0.05 + lam_step * min(step, steps - frozen)
        records.append(StepRecord(step, "learn" if learn else "frozen", task + lam * bits, task,
                                  bits, bits, lam))
    return records


def png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def same(a: list[StepRecord], b: list[StepRecord]) -> bool:
    def key(r: StepRecord) -> tuple[object, ...]:
        return tuple("nan" if isinstance(v, float) and math.isnan(v) else v
                     for v in (getattr(r, f) for f in FIELDS))

    return [key(r) for r in a] == [key(r) for r in b]


def test_json_round_trip() -> None:
    records = fake_history()
    text = history_to_json(records)
    assert history_from_json(text) == records
    lines = text.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == len(records) + 2
    assert json.loads(lines[1].rstrip(","))["phase"] == "learn"


def test_csv_round_trip_is_exact() -> None:
    records = fake_history()
    records[3].task = 0.1 + 0.2  # not representable in few digits: repr keeps every bit
    text = history_to_csv(records)
    assert text.splitlines()[0] == "step,phase,loss,task,cost,avg_bits,lam"
    assert len(text.splitlines()) == len(records) + 1
    assert history_from_csv(text) == records


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_values(value: float) -> None:
    records = [StepRecord(0, "learn", value, 0.5, 8.0, 8.0, 0.05)]
    text = history_to_json(records)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert math.isnan(history_from_json(text)[0].loss)  # written as null, read back as NaN
    assert same(history_from_csv(history_to_csv(records)), records)  # CSV keeps nan and inf


def test_empty_history() -> None:
    assert history_from_json(history_to_json([])) == []
    assert history_from_csv(history_to_csv([])) == []


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="must be a list"):
        history_from_json('{"step": 0}')
    with pytest.raises(ValueError, match="needs exactly the keys"):
        history_from_json('[{"step": 0}]')
    with pytest.raises(ValueError, match="must start with the header"):
        history_from_csv("a,b\n1,2\n")


@pytest.mark.parametrize("kwargs", [
    {}, {"eval_points": [(39, 91.5)], "reference_top1": 93.0}, {"reference_top1": 93.0}],
    ids=["plain", "accuracy", "reference-only"])
def test_plot_history_png(kwargs: dict[str, object], tmp_path: Path) -> None:
    path = tmp_path / "h.png"
    data = plot_history(fake_history(), path, **kwargs)  # type: ignore[arg-type]
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert path.read_bytes() == data and png_size(data) == (1000, 750)


@pytest.mark.parametrize("records", [[], fake_history(3, 0), fake_history(5, 5),
                                     fake_history(400, 100, lam_step=1e-3)],
                         ids=["empty", "learn-only", "frozen-only", "budget-lambda"])
def test_plot_history_edge_cases(records: list[StepRecord]) -> None:
    assert plot_history(records).startswith(PNG_MAGIC)


def test_run_output_paths() -> None:
    paths = run_output_paths(Path("out/m.bits.onnx"))
    assert {k: p.as_posix() for k, p in paths.items()} == {
        "plot": "out/m.bits.png", "json": "out/m.bits.history.json",
        "csv": "out/m.bits.history.csv", "history_plot": "out/m.bits.history.png"}


def test_write_run_outputs_from_report(tmp_path: Path) -> None:
    out = tmp_path / "m.bits.onnx"
    records = fake_history()
    written = write_run_outputs(out, analyze_model(builders.conv_relu_gemm()), records)
    assert [p.name for p in written] == ["m.bits.png", "m.bits.history.json",
                                         "m.bits.history.csv", "m.bits.history.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert history_from_json(written[1].read_text()) == records
    assert history_from_csv(written[2].read_text()) == records
    assert all(written[i].read_bytes().startswith(PNG_MAGIC) for i in (0, 3))


def test_write_run_outputs_from_shrink_report_dict(tmp_path: Path) -> None:
    report = analyze_model(builders.conv_relu_gemm()).to_dict()
    report.update(output="m.bits.onnx", accuracy={"float": {"top1": 93.0, "agreement": 100.0},
                                                   "quantized": {"top1": 91.0}})
    written = write_run_outputs(tmp_path / "m.bits.onnx", report, fake_history())
    assert len(written) == 4 and all(p.stat().st_size > 0 for p in written)


def test_write_run_outputs_rejects_a_non_report(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="not an onnxbits report"):
        write_run_outputs(tmp_path / "m.onnx", {"accuracy": {}}, fake_history())
    assert list(tmp_path.iterdir()) == []

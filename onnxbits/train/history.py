"""Training history of a fine-tune (one :class:`StepRecord` per step) as JSON and CSV.

The plot: :func:`onnxbits.report.history.plot_history`.

Formats (columns ``step, phase, loss, task, cost, avg_bits, lam`` in both):

- JSON: a list of objects, one line per step; a non-finite number is written as ``null`` and
  read back as NaN.
- CSV: a header line, then one row per step; floats are written with ``repr`` so that they read
  back exactly.

Imports neither torch nor another stage (the records are plain numbers). Nothing here prints.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class StepRecord:
    """One row of the training history."""

    step: int
    phase: str
    loss: float
    task: float
    cost: float
    avg_bits: float
    lam: float

    def to_dict(self) -> dict[str, float | int | str]:
        """The record as a plain dict (JSON, checkpoints)."""
        return asdict(self)


#: The columns of every history format, in order.
FIELDS = ("step", "phase", "loss", "task", "cost", "avg_bits", "lam")
_FLOATS = ("loss", "task", "cost", "avg_bits", "lam")


def _row(record: StepRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS}


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def history_to_json(records: Sequence[StepRecord]) -> str:
    """Return the history as a JSON list of objects, one step per line.

    >>> from onnxbits.train.history import StepRecord
    >>> text = history_to_json([StepRecord(0, "learn", 1.5, 0.5, 8.0, 8.0, float("nan"))])
    >>> text.splitlines()[1][:43], json.loads(text)[0]["lam"]
    ('{"step": 0, "phase": "learn", "loss": 1.5, ', None)
    """
    lines = []
    for record in records:
        row = _row(record)
        row["step"] = int(row["step"])
        row.update({k: _finite_or_none(float(row[k])) for k in _FLOATS})
        lines.append(json.dumps(row, allow_nan=False))
    return "[\n" + ",\n".join(lines) + ("\n]" if lines else "]")


def history_from_json(text: str) -> list[StepRecord]:
    """Parse :func:`history_to_json` output back into StepRecords (``null`` -> NaN).

    Raises:
        ValueError: The text is not a JSON list of history rows.
    """
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("a history JSON must be a list of step objects")
    return [_record(row) for row in data]


def history_to_csv(records: Sequence[StepRecord]) -> str:
    """Return the history as CSV with the header ``step,phase,loss,task,cost,avg_bits,lam``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FIELDS)
    for record in records:
        row = _row(record)
        writer.writerow([int(row["step"]), row["phase"], *(repr(float(row[k])) for k in _FLOATS)])
    return buffer.getvalue()


def history_from_csv(text: str) -> list[StepRecord]:
    """Parse :func:`history_to_csv` output back into StepRecords.

    Raises:
        ValueError: The header is not the history header or a value is not a number.
    """
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != FIELDS:
        raise ValueError(f"a history CSV must start with the header {','.join(FIELDS)}")
    return [_record(row) for row in reader]


def _record(row: Any) -> StepRecord:
    if not isinstance(row, dict) or set(row) != set(FIELDS):
        raise ValueError(f"a history row needs exactly the keys {', '.join(FIELDS)}, got {row!r}")
    numbers = [math.nan if row[k] in (None, "") else float(row[k]) for k in _FLOATS]
    return StepRecord(int(row["step"]), str(row["phase"]), *numbers)

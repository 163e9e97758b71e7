"""The onnxbits metadata of an emitted model: ``metadata_props["onnxbits"]``, one JSON object.

``{"format": 1, "target": "ort" | "exact-sim" | "pack", "layers": {node name: {"weight_bits",
"act_bits", "act_tensor", "act_signed", "weight_container_bits", "act_exec_bits"}}, "source":
{...}, ...}``: written by :func:`onnxbits.emit.targets.emit`, rewritten by
:mod:`onnxbits.emit.pack`, read by :mod:`onnxbits.report`. Imports onnx only (no torch).
"""

from __future__ import annotations

import json
from typing import Any

import onnx

from onnxbits.errors import InvalidModelError

METADATA_KEY = "onnxbits"
METADATA_FORMAT = 1


def read_metadata(model: onnx.ModelProto, source: str = "model") -> dict[str, Any]:
    """Return the parsed onnxbits metadata of ``model`` ({} when absent)."""
    text = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidModelError(f"{source}: metadata '{METADATA_KEY}' is not valid JSON ({exc}); "
                                "re-emit the model with onnxbits or delete the entry") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("layers", {}), dict):
        raise InvalidModelError(f"{source}: metadata '{METADATA_KEY}' is not a JSON object with a "
                                "'layers' object; re-emit the model with onnxbits")
    return meta


def write_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Set (or replace) ``metadata_props["onnxbits"]`` of ``model`` to ``meta``, in place."""
    text = json.dumps(meta, separators=(",", ":"))
    entry = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        model.metadata_props.add(key=METADATA_KEY, value=text)
    else:
        entry.value = text

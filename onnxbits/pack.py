"""The ``pack`` target: the ``ort`` model with every weight stored in as few bits as it has.

Rules (per quantized layer, from the learned bits ``k`` in the onnxbits metadata and checked
against the stored integers):

* ``k == 4``: int4 (opset 21). ONNX Runtime 1.32 runs a Conv on int4 weights unfused (a
  DequantizeLinear and a float Conv): correct, not fast; :func:`unpack_model` is the way to
  the fast ``ort`` model.
* ``k in {2, 3, 5, 6, 7}``: a uint8 bit stream of exactly ``k`` bits per weight, read back by
  the model-local function ``onnxbits.Unpack<k>`` (standard ops only: Cast, Gather, Mul, Add,
  Div, Mod, Sub, Reshape, ReduceProd, Slice) into the int8 tensor the ``ort`` model holds.
  ONNX Runtime inlines the function and folds it into a constant when the session is created,
  so these layers still run on its integer kernels. ``bitpack=False`` stores them in int4
  (2-3 bits) or int8 (5-7 bits) instead. ONNX has no 3-bit type, and int4 would cost 4/3 of
  the learned bits.
* ``k <= 2`` with ``int2=True``: int2 (opset 25). Off by default: ONNX Runtime 1.32 fuses
  ``DQ(int2) -> Conv`` into a QLinearConv that it then rejects ("Type 'tensor(int2)' ... is
  invalid"), so the model does not load with the default optimizations.
* ``k == 8``: int8, unchanged.

Zero points follow their weight's type. The opset is raised only when the ONNX version converter
leaves every node unchanged (all ops keep their meaning), so :func:`unpack_model` can restore
the ``ort`` model byte for byte: it turns every packed weight back into the same int8
initializer at the same position, removes the decoders, restores the opset, IR version and
metadata. ``unpack_model(pack_model(m))`` serialises to exactly the bytes of ``m``.

Bit stream layout: weights in C order, shifted to ``u = q + 2^(k-1) - 1`` (so ``0 <= u < 2^k``),
padded with ``u = 0`` to a multiple of 8; value ``i`` occupies bits ``k i .. k i + k - 1`` of the
little-endian stream; the stream is stored as ``[groups, k]`` bytes (8 values per k bytes).
"""

from __future__ import annotations

import json
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxbits.errors import InvalidModelError

METADATA_KEY = "onnxbits"
PACK_KEY = "pack"
DECODER_PREFIX = "onnxbits_unpack"
FUNCTION_DOMAIN = "onnxbits"
INT4_OPSET, INT2_OPSET = 21, 25
IR_FOR_OPSET = {21: 10, 25: 11}


# ---- bit stream (pure numpy) --------------------------------------------------------------


def pack_bits(q: np.ndarray, k: int) -> np.ndarray:
    """Pack narrow-range signed ``k``-bit integers into a ``[groups, k]`` uint8 stream.

    >>> pack_bits(np.array([-3, 3, 0, 1], np.int8), 3).tolist()
    [[240, 8, 0]]
    >>> unpack_bits(pack_bits(np.array([-3, 3, 0, 1], np.int8), 3), 3, 4).tolist()
    [-3, 3, 0, 1]
    """
    offset = 2 ** (k - 1) - 1
    u = q.reshape(-1).astype(np.int64) + offset
    if u.size and (u.min() < 0 or u.max() >= 2**k):
        raise ValueError(f"values outside the {k}-bit range")
    groups = -(-u.size // 8)
    padded = np.zeros(groups * 8, np.int64)
    padded[:u.size] = u
    bits = (padded[:, None] >> np.arange(k)) & 1            # [n, k] little-endian bits
    stream = bits.reshape(groups, k, 8)
    return (stream << np.arange(8)).sum(axis=2).astype(np.uint8)


def _decoder_tables(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte index of the low byte, of the high byte (clamped) and the shift of each of 8 values."""
    start = np.arange(8) * k
    lo = start // 8
    hi = np.minimum(lo + 1, k - 1)
    return lo.astype(np.int64), hi.astype(np.int64), (2 ** (start % 8)).astype(np.int32)


def unpack_bits(stream: np.ndarray, k: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`, computed as the decoder subgraph does."""
    lo, hi, div = _decoder_tables(k)
    b = stream.astype(np.int32)
    word = b[:, lo] + b[:, hi] * 256
    u = (word // div) % (2**k)
    return (u - (2 ** (k - 1) - 1)).astype(np.int8).reshape(-1)[:count]


# ---- graph edits ---------------------------------------------------------------------------


def _meta(model: onnx.ModelProto) -> dict[str, Any]:
    entry = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        raise InvalidModelError("model has no onnxbits metadata; emit it with onnxbits first")
    return json.loads(entry.value)


def _set_meta(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    entry.value = json.dumps(meta)


def _opset(model: onnx.ModelProto) -> onnx.OperatorSetIdProto:
    return next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))


def can_raise_opset(model: onnx.ModelProto, version: int) -> bool:
    """True when moving ``model`` to ``version`` changes no node (ONNX version converter)."""
    if _opset(model).version >= version:
        return True
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception:  # the converter raises many types for ops it cannot adapt
        return False
    return len(converted.graph.node) == len(model.graph.node) and all(
        a.SerializeToString() == b.SerializeToString()
        for a, b in zip(model.graph.node, converted.graph.node, strict=True))


def _weight_format(k: int, int2: bool, int4: bool, bitpack: bool) -> tuple[str, int]:
    """(format, stored bits) for learned bits ``k``."""
    if k <= 2 and int2:
        return "int2", 2
    if k == 4 and int4:
        return "int4", 4
    if k < 8 and bitpack:
        return "bits", max(k, 2)
    if k <= 4 and int4:
        return "int4", 4
    return "int8", 8


def _layer_weights(model: onnx.ModelProto, meta: dict[str, Any]
                   ) -> list[tuple[str, onnx.NodeProto, int]]:
    """(layer name, weight DQ node, max learned bits) of every layer with an int8 weight."""
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for name, info in meta.get("layers", {}).items():
        node = nodes.get(name)
        dq = producer.get(node.input[1]) if node is not None and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        if inits[dq.input[0]].data_type != TensorProto.INT8:
            continue
        out.append((name, dq, int(info["weight_bits"])))
    return out


def pack_model(model: onnx.ModelProto, *, bitpack: bool = True,
               int2: bool = False) -> onnx.ModelProto:
    """Return the ``pack`` form of an ``ort`` model emitted by onnxbits (see module docstring)."""
    meta = _meta(model)
    if meta.get("target") != "ort":
        raise InvalidModelError(f"pack needs an onnxbits 'ort' model, got target "
                                f"{meta.get('target')!r}; emit with --target ort first")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    layers = _layer_weights(out, meta)
    inits = {t.name: t for t in out.graph.initializer}
    arrays = {dq.input[0]: numpy_helper.to_array(inits[dq.input[0]]) for _, dq, _ in layers}
    # the stored integers decide when they need more bits than the metadata says
    layers = [(name, dq, max(k, 2, int(np.abs(arrays[dq.input[0]].astype(np.int64))
                                        .max(initial=0)).bit_length() + 1))
              for name, dq, k in layers]
    want2 = int2 and any(k <= 2 for _, _, k in layers)
    use2 = want2 and can_raise_opset(model, INT2_OPSET)
    use4 = any(_weight_format(k, use2, True, bitpack)[0] == "int4" for _, _, k in layers) and \
        (use2 or can_raise_opset(model, INT4_OPSET))
    pack_info: dict[str, Any] = {"opset": _opset(out).version, "ir_version": out.ir_version,
                                 "weights": {}}
    users: dict[str, int] = {}
    for n in out.graph.node:
        for t in n.input:
            users[t] = users.get(t, 0) + 1
    index = {t.name: i for i, t in enumerate(out.graph.initializer)}
    decoders: dict[str, list[onnx.NodeProto]] = {}
    tables: set[int] = set()
    for layer, dq, k in layers:
        fmt, stored = _weight_format(k, use2, use4, bitpack)
        q_name, z_name = dq.input[0], dq.input[2] if len(dq.input) > 2 else ""
        if fmt == "int8" or users.get(q_name, 0) != 1 or (z_name and users.get(z_name, 0) != 1):
            continue
        q = arrays[q_name]
        if fmt in ("int4", "int2"):
            kind = ml_dtypes.int4 if fmt == "int4" else ml_dtypes.int2
            out.graph.initializer[index[q_name]].CopyFrom(
                numpy_helper.from_array(q.astype(kind), q_name))
            if z_name:
                zero = numpy_helper.to_array(inits[z_name])
                out.graph.initializer[index[z_name]].CopyFrom(
                    numpy_helper.from_array(zero.astype(kind), z_name))
        else:
            packed = f"{DECODER_PREFIX}/{q_name}"
            out.graph.initializer[index[q_name]].CopyFrom(
                numpy_helper.from_array(pack_bits(q, stored), packed))
            shape = f"{packed}/shape"
            out.graph.initializer.append(numpy_helper.from_array(np.array(q.shape, np.int64),
                                                                 shape))
            decoders[dq.name] = [helper.make_node(
                f"Unpack{stored}", [packed, shape], [q_name], name=packed,
                domain=FUNCTION_DOMAIN)]
            tables.add(stored)
        pack_info["weights"][q_name] = {"layer": layer, "format": fmt, "bits": stored}
        meta["layers"][layer]["weight_container_bits"] = stored
    if decoders:
        ordered = []
        for node in out.graph.node:
            ordered.extend(decoders.get(node.name, []))
            ordered.append(node)
        del out.graph.node[:]
        out.graph.node.extend(ordered)
    target = INT2_OPSET if use2 and any(
        w["format"] == "int2" for w in pack_info["weights"].values()) else \
        INT4_OPSET if any(w["format"] in ("int4", "int2") for w in pack_info["weights"].values()) \
        else None
    if target is not None and _opset(out).version < target:
        _opset(out).version = target
        out.ir_version = max(out.ir_version, IR_FOR_OPSET[target])
    if tables:
        opset = _opset(out).version
        out.functions.extend(_function(k, opset) for k in sorted(tables))
        out.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
    meta["target"] = "pack"
    meta[PACK_KEY] = pack_info
    _set_meta(out, meta)
    onnx.checker.check_model(out)
    return out


def _function(k: int, opset: int) -> onnx.FunctionProto:
    """``onnxbits.Unpack<k>(stream uint8 [groups, k], shape int64 [rank]) -> int8 weights``."""
    lo, hi, div = _decoder_tables(k)

    def const(name: str, array: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))

    nodes = [
        const("lo_idx", lo), const("hi_idx", hi), const("div", div),
        const("mod", np.array(2**k, np.int32)),
        const("offset", np.array(2 ** (k - 1) - 1, np.int32)),
        const("byte", np.array(256, np.int32)), const("flat_shape", np.array([-1], np.int64)),
        const("start", np.array([0], np.int64)),
        helper.make_node("Cast", ["stream"], ["b"], to=TensorProto.INT32),
        helper.make_node("Gather", ["b", "lo_idx"], ["lo"], axis=1),
        helper.make_node("Gather", ["b", "hi_idx"], ["hi"], axis=1),
        helper.make_node("Mul", ["hi", "byte"], ["hi_shifted"]),
        helper.make_node("Add", ["lo", "hi_shifted"], ["word"]),
        helper.make_node("Div", ["word", "div"], ["shifted"]),
        helper.make_node("Mod", ["shifted", "mod"], ["u"]),
        helper.make_node("Sub", ["u", "offset"], ["q32"]),
        helper.make_node("Cast", ["q32"], ["q8"], to=TensorProto.INT8),
        helper.make_node("Reshape", ["q8", "flat_shape"], ["flat"]),
        helper.make_node("ReduceProd", ["shape"], ["count"], keepdims=1),
        helper.make_node("Slice", ["flat", "start", "count"], ["values"]),
        helper.make_node("Reshape", ["values", "shape"], ["weights"]),
    ]
    return helper.make_function(FUNCTION_DOMAIN, f"Unpack{k}", ["stream", "shape"], ["weights"],
                                nodes, [helper.make_opsetid("", opset)],
                                doc_string=f"{k}-bit stream -> int8 (onnxbits.pack)")


def graph_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ``ort`` graph of a ``pack`` model with the ``pack`` metadata kept (for reports:
    every weight is a DequantizeLinear of an int8 initializer again, while the metadata still
    says which container each is stored in). Other models are returned unchanged."""
    meta = _meta(model) if any(p.key == METADATA_KEY for p in model.metadata_props) else {}
    if meta.get("target") != "pack":
        return model
    out = unpack_model(model)
    _set_meta(out, meta)
    return out


def unpack_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn a ``pack`` model back into the ``ort`` model it was packed from (byte-identical)."""
    meta = _meta(model)
    if meta.get("target") != "pack" or PACK_KEY not in meta:
        raise InvalidModelError(f"unpack needs an onnxbits 'pack' model, got target "
                                f"{meta.get('target')!r}")
    info = meta.pop(PACK_KEY)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: i for i, t in enumerate(out.graph.initializer)}
    zero_points = {n.input[0]: n.input[2] for n in out.graph.node
                   if n.op_type == "DequantizeLinear" and len(n.input) > 2}
    for q_name, entry in info["weights"].items():
        fmt, k = entry["format"], int(entry["bits"])
        if fmt in ("int4", "int2"):
            for name in (q_name, zero_points.get(q_name, "")):
                if name:
                    tensor = out.graph.initializer[inits[name]]
                    array = numpy_helper.to_array(tensor).astype(np.int8)
                    tensor.CopyFrom(numpy_helper.from_array(array, name))
        else:
            packed = f"{DECODER_PREFIX}/{q_name}"
            tensor = out.graph.initializer[inits[packed]]
            shape = tuple(int(d) for d in numpy_helper.to_array(
                out.graph.initializer[inits[f"{packed}/shape"]]))
            values = unpack_bits(numpy_helper.to_array(tensor), k, int(np.prod(shape)))
            tensor.CopyFrom(numpy_helper.from_array(values.reshape(shape), q_name))
        meta["layers"][entry["layer"]]["weight_container_bits"] = 8
    keep_nodes = [n for n in out.graph.node if not n.name.startswith(DECODER_PREFIX + "/")]
    del out.graph.node[:]
    out.graph.node.extend(keep_nodes)
    keep = [t for t in out.graph.initializer if not t.name.startswith(DECODER_PREFIX + "/")]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    del out.functions[:]
    kept = [o for o in out.opset_import if o.domain != FUNCTION_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    _opset(out).version = int(info["opset"])
    out.ir_version = int(info["ir_version"])
    meta["target"] = "ort"
    _set_meta(out, meta)
    return out

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

Zero points follow their weight's type. An int32 bias scale that equals ``s_in * s_w`` (float32,
as the ``ort`` target writes it) is not stored: a ``Mul(s_in, s_w)`` computes it, which ONNX
Runtime folds into the same constant before fusing. :func:`weight_storage` measures what each
layer's weight costs in the file. The opset is raised only when the ONNX version converter
leaves every node unchanged (all ops keep their meaning), so :func:`unpack_model` can restore
the ``ort`` model byte for byte: it turns every packed weight back into the same int8
initializer at the same position, removes the decoders, restores the opset, IR version and
metadata. ``unpack_model(pack_model(m))`` serialises to exactly the bytes of ``m``.

The bit stream layout and its decoder are in :mod:`onnxbits.emit.bitstream`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxbits.emit.bitstream import FUNCTION_DOMAIN, decoder_function, pack_bits, unpack_bits
from onnxbits.emit.metadata import METADATA_KEY, read_metadata, write_metadata
from onnxbits.errors import InvalidModelError

__all__ = ["WeightStorage", "graph_view", "is_packed", "pack_bits", "pack_model", "unpack_bits",
           "unpack_model", "weight_storage"]

PACK_KEY = "pack"
DECODER_PREFIX = "onnxbits_unpack"
INT4_OPSET, INT2_OPSET = 21, 25
IR_FOR_OPSET = {21: 10, 25: 11}


# ---- graph edits ---------------------------------------------------------------------------


def _meta(model: onnx.ModelProto) -> dict[str, Any]:
    meta = read_metadata(model)
    if not meta:
        raise InvalidModelError("model has no onnxbits metadata; emit it with onnxbits first")
    return meta


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
    pack_info["bias_scales"] = _derive_bias_scales(out, meta, users, decoders)
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
        out.functions.extend(decoder_function(k, opset) for k in sorted(tables))
        out.opset_import.append(helper.make_opsetid(FUNCTION_DOMAIN, 1))
    meta["target"] = "pack"
    meta[PACK_KEY] = pack_info
    write_metadata(out, meta)
    onnx.checker.check_model(out)
    return out


def _derive_bias_scales(model: onnx.ModelProto, meta: dict[str, Any], users: dict[str, int],
                        decoders: dict[str, list[onnx.NodeProto]]) -> dict[str, int]:
    """Replace each int32 bias scale that equals ``s_in * s_w`` (float32) by that ``Mul``.

    Returns ``{scale name: its index among the initializers}`` (for :func:`unpack_model`).
    ONNX Runtime folds the Mul into the same constant before it fuses the layer.
    """
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    index = {t.name: i for i, t in enumerate(model.graph.initializer)}
    arrays = {t.name: t for t in model.graph.initializer}
    done: dict[str, int] = {}
    for name, info in meta["layers"].items():
        node = nodes.get(name)
        if info.get("bias") != "int32" or node is None:
            continue
        bias = node.input[2] if len(node.input) > 2 else next(
            (t for t in consumers.get(node.output[0], [None])[0].input  # type: ignore[union-attr]
             if t != node.output[0]), "") if node.op_type == "MatMul" else ""
        dqs = [producer.get(t) for t in (bias, node.input[0], node.input[1])]
        if any(d is None or d.op_type != "DequantizeLinear" for d in dqs):
            continue
        s_b, s_in, s_w = (d.input[1] for d in dqs)  # type: ignore[union-attr]
        if users.get(s_b) != 1 or not all(t in arrays for t in (s_b, s_in, s_w)):
            continue
        product = numpy_helper.to_array(arrays[s_in]) * numpy_helper.to_array(arrays[s_w])
        value = numpy_helper.to_array(arrays[s_b])
        if product.dtype != value.dtype or product.shape != value.shape or \
                not np.array_equal(product, value):
            continue
        done[s_b] = index[s_b]
        decoders.setdefault(dqs[0].name, []).append(helper.make_node(  # type: ignore[union-attr]
            "Mul", [s_in, s_w], [s_b], name=f"{DECODER_PREFIX}/{s_b}"))
    keep = [t for t in model.graph.initializer if t.name not in done]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


@dataclass(frozen=True)
class WeightStorage:
    """What a (packed) model spends on one layer's weight: ``stored_bytes`` = serialised sizes
    of the integer tensor (stream and its shape, int4 or int8), its scale and zero point."""

    layer: str
    params: int
    bits: int
    stored_bytes: int

    @property
    def learned_bytes(self) -> float:
        """``params * bits / 8``: the weight at exactly its learned bits."""
        return self.params * self.bits / 8


def weight_storage(model: onnx.ModelProto) -> list[WeightStorage]:
    """Per-layer weight storage of an onnxbits model (any target), in metadata order."""
    meta = _meta(model)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    out = []
    for name, info in meta["layers"].items():
        dq = producer.get(nodes[name].input[1]) if name in nodes else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        tensors = [inits.get(t) for t in dq.input[1:]]
        source = producer.get(dq.input[0])
        if source is not None:  # a bit stream decoder: Unpack<k>(stream, shape)
            tensors += [inits[t] for t in source.input]
            params = int(np.prod(numpy_helper.to_array(inits[source.input[1]])))
        else:
            tensors.append(inits[dq.input[0]])
            params = int(np.prod(inits[dq.input[0]].dims))
        out.append(WeightStorage(name, params, int(info["weight_bits"]),
                                 sum(t.ByteSize() for t in tensors if t is not None)))
    return out


def graph_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The ``ort`` graph of a ``pack`` model with the ``pack`` metadata kept (for reports:
    every weight is a DequantizeLinear of an int8 initializer again, while the metadata still
    says which container each is stored in). Other models are returned unchanged."""
    meta = _meta(model) if any(p.key == METADATA_KEY for p in model.metadata_props) else {}
    if meta.get("target") != "pack" or not is_packed(model):
        return model
    out = unpack_model(model)
    write_metadata(out, meta)
    return out


def is_packed(model: onnx.ModelProto) -> bool:
    """True when some weight the ``pack`` metadata lists is still stored packed (a bit stream
    or an int2/int4 initializer); False for a :func:`graph_view` or an unpacked model."""
    info = _meta(model).get(PACK_KEY, {}).get("weights", {})
    types = {t.name: t.data_type for t in model.graph.initializer}
    narrow = (TensorProto.INT4, TensorProto.INT2)
    return any(f"{DECODER_PREFIX}/{name}" in types or types.get(name) in narrow
               for name in info)


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
        stored = q_name if fmt in ("int4", "int2") else f"{DECODER_PREFIX}/{q_name}"
        if stored not in inits or (fmt != "bits" and out.graph.initializer[inits[stored]]
                                   .data_type == TensorProto.INT8):
            raise InvalidModelError(f"weight '{q_name}' is not stored packed ({fmt}); the model "
                                    "was unpacked already (e.g. by graph_view)")
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
    scales = {n.output[0]: list(n.input) for n in out.graph.node
              if n.name.startswith(DECODER_PREFIX + "/") and n.op_type == "Mul"}
    keep_nodes = [n for n in out.graph.node if not n.name.startswith(DECODER_PREFIX + "/")]
    del out.graph.node[:]
    out.graph.node.extend(keep_nodes)
    keep = [t for t in out.graph.initializer if not t.name.startswith(DECODER_PREFIX + "/")]
    arrays = {t.name: numpy_helper.to_array(t) for t in keep}
    for name, position in sorted(info.get("bias_scales", {}).items(), key=lambda e: e[1]):
        s_in, s_w = scales[name]
        keep.insert(position, numpy_helper.from_array(arrays[s_in] * arrays[s_w], name))
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    del out.functions[:]
    kept = [o for o in out.opset_import if o.domain != FUNCTION_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    _opset(out).version = int(info["opset"])
    out.ir_version = int(info["ir_version"])
    meta["target"] = "ort"
    write_metadata(out, meta)
    return out

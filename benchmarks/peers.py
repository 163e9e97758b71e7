"""Side by side with the tools people use: float, ONNX Runtime ``quantize_static``, AIMET ONNX,
AMD Quark for ONNX and onnxbits at the same weight bytes, in one run on one data split.

    python benchmarks/peers.py mobilenet_v2_1.0_224_dq            # the full run (issue 28)
    python benchmarks/peers.py mobilenet_v1_0.25_128_dq --quick   # minutes: for development

Every tool gets the same images: the PTQ tools calibrate on ``--calib`` (256) images of
``imagenet/sample1000`` (rows ``i * 1000 // 256``, the rows of ``../shared/README.md``), onnxbits
fine-tunes on all 1000 (``--recipe reconstruct``, the ImageNet recipe of docs/performance.md),
and every output is measured in stock ONNX Runtime (all optimizations, CPU) on
``imagenet/val1300``: top-1, agreement with the float model's top-1, weight bytes, file bytes and
wall seconds. The level check opens each output's Q/DQ graph and counts the distinct integer
levels of every quantized weight tensor, so a tool that claims 4-bit weights but stores 8-bit
ones (255 levels) is seen to do so.

Rows: float; ORT W8A8 and W4A8 (per-channel, MinMax, QDQ); AIMET ONNX W4A8 min-max, SeqMSE and
AdaRound (``--adaround-iters`` per layer); AMD Quark W4A8 as requested (CLE on); onnxbits at the
weight bytes of ORT's W4A8 model and at ``--fraction`` (0.75) of them. AIMET and Quark are
optional (``pip install -e '.[peers]'``, best in an environment of their own); a tool that does
not import gives a "not installed" row. Writes ``<out>/peers_<model>.json`` (``--quick``:
``peers_<model>.quick.json``, which ``tables.py`` ignores) after every row, and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from accuracy import MODELS, PROTOCOLS, RECIPES, SHARED, _images, ort_ptq
from onnx import TensorProto, numpy_helper
from tables import peers_table

from onnxbits.config import ShrinkConfig
from onnxbits.data.preprocess import resolve_preprocess
from onnxbits.pipeline.run import shrink
from onnxbits.report.evaluate import make_session, predict_logits, topk_accuracy
from onnxbits.report.model import analyze_model

IMAGENET = sorted(m for m, (proto, _) in MODELS.items() if proto == "imagenet")
ROWS = ("float", "ort-w8", "ort-w4", "aimet-minmax", "aimet-seqmse", "aimet-adaround", "quark",
        "onnxbits", "onnxbits-fraction")
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
INT_RANGE = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
             TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
             TensorProto.INT16: (-32768, 32767), TensorProto.UINT16: (0, 65535),
             TensorProto.INT2: (-2, 1), TensorProto.UINT2: (0, 3)}
CONTAINER_BITS = {TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT4: 4,
                  TensorProto.UINT4: 4, TensorProto.INT16: 16, TensorProto.UINT16: 16,
                  TensorProto.INT2: 2, TensorProto.UINT2: 2}
INSTALL = "not installed (pip install -e '.[peers]')"


class NotInstalled(Exception):
    """The peer's package does not import."""


# --- the level check: what each output really stores ---------------------------------------

def _quantize(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int,
              elem_type: int) -> np.ndarray:
    """ONNX QuantizeLinear of a constant: ``saturate(round_half_even(w / scale) + zero)``."""
    shape = [1] * w.ndim
    if scale.size > 1:
        shape[axis % w.ndim] = -1
    q = np.rint(w / scale.reshape(shape))
    if zero is not None:
        q = q + zero.astype(np.int64).reshape(shape)
    lo, hi = INT_RANGE[elem_type]
    return np.clip(q, lo, hi).astype(np.int64)


def weight_levels(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Every Conv/ConvTranspose/Gemm/MatMul weight of ``model`` and how it is stored.

    Each entry: ``node``, ``params`` and either ``levels`` (distinct integers of the quantized
    weight: read from the DequantizeLinear's integer initializer, or computed from the
    QuantizeLinear of a float initializer, as ONNX Runtime would) or ``levels = None`` for a
    weight kept in float. Weights that are not constants (activation MatMuls) are skipped.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        while node is not None and node.op_type == "Identity":
            name = node.input[0]
            node = producer.get(name)
        return node

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    entries = []
    for node in graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        name = node.input[index]
        dq = source(name)
        entry: dict[str, Any] = {"node": node.name, "op": node.op_type}
        if dq is None and name in inits:
            entry.update(params=int(np.prod(inits[name].dims)), levels=None)
        elif dq is not None and dq.op_type == "DequantizeLinear":
            x = dq.input[0]
            q_node = source(x)
            if x in inits:
                q = array(x).astype(np.int64)
            elif (q_node is not None and q_node.op_type == "QuantizeLinear"
                  and q_node.input[0] in inits and q_node.input[1] in inits):
                axis = next((a.i for a in q_node.attribute if a.name == "axis"), 1)
                zero_name = q_node.input[2] if len(q_node.input) > 2 else ""
                elem = inits[zero_name].data_type if zero_name else next(
                    (a.i for a in q_node.attribute if a.name == "output_dtype"), TensorProto.UINT8)
                q = _quantize(array(q_node.input[0]), array(q_node.input[1]),
                              array(zero_name) if zero_name else None, axis, elem)
            else:
                continue
            entry.update(params=int(q.size), levels=int(np.unique(q).size))
        else:
            continue
        entries.append(entry)
    return entries


def activation_bits(model: onnx.ModelProto) -> list[int]:
    """The integer container widths of the activations' QuantizeLinear nodes (sorted, unique)."""
    inits = {i.name: i for i in model.graph.initializer}
    widths = set()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        if len(node.input) > 2 and node.input[2] in inits:
            elem = inits[node.input[2]].data_type
        else:
            elem = next((a.i for a in node.attribute if a.name == "output_dtype"),
                        TensorProto.UINT8)
        widths.add(CONTAINER_BITS.get(elem, 32))
    return sorted(widths)


def level_check(path: Path, claimed: Callable[[str], int | None]) -> dict[str, Any]:
    """Weight bytes claimed (params x claimed bits / 8) against the bytes the stored levels
    need (params x ceil(log2 levels) / 8), and how many weight tensors hold at most
    ``2 ** claimed`` levels. Float weights count 32 bits in both."""
    model = onnx.load(str(path))
    entries = weight_levels(model)
    claimed_bytes = level_bytes = 0.0
    within = quantized = 0
    for e in entries:
        bits = claimed(e["node"]) if e["levels"] is not None else 32
        need = 32 if e["levels"] is None else max(1, math.ceil(math.log2(max(e["levels"], 2))))
        e["claimed_bits"] = bits
        claimed_bytes += e["params"] * (bits or need) / 8
        level_bytes += e["params"] * need / 8
        if e["levels"] is not None:
            quantized += 1
            within += bits is not None and e["levels"] <= 2 ** bits
    levels = [e["levels"] for e in entries if e["levels"] is not None]
    return {"weight_tensors": len(entries), "quantized_tensors": quantized,
            "tensors_within_claim": within, "max_levels": max(levels, default=None),
            "weight_bytes": claimed_bytes, "weight_bytes_by_levels": level_bytes,
            "act_container_bits": activation_bits(model), "tensors": entries}


# --- the rows ------------------------------------------------------------------------------

def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _calib_batches(calib, name: str, batch: int = 32) -> list[dict[str, np.ndarray]]:
    return [{name: calib.batch(np.arange(i, min(i + batch, len(calib))))}
            for i in range(0, len(calib), batch)]


def aimet(model: Path, calib, out: Path, technique: str, args: argparse.Namespace) -> Path:
    """AIMET ONNX W4A8 (per-channel config): min-max, SeqMSE or AdaRound, then activation
    encodings on the calibration images; exported with ``to_onnx_qdq`` (integer weights + DQ).
    AdaRound optimizes on every ``256 / --adaround-images``-th calibration image: it runs the
    model up to each layer on all its images (53 layers of mobilenet_v2: about 6 s per layer
    for 64 images on one core), so 256 images would take most of the run's time budget."""
    try:
        import aimet_onnx
        from aimet_onnx import QuantizationSimModel, apply_adaround, apply_seq_mse
    except ImportError as exc:
        raise NotInstalled(str(exc)) from exc
    import torch

    torch.set_num_threads(args.threads)
    proto = onnx.load(str(model))
    batches = _calib_batches(calib, proto.graph.input[0].name)
    config = (Path(aimet_onnx.__file__).parent / "common" / "quantsim_config"
              / "default_config_per_channel.json")
    sim = QuantizationSimModel(proto, param_type="int4", activation_type="int8",
                               quant_scheme="min_max", config_file=str(config),
                               session_options_kwargs={"intra_op_num_threads": args.threads,
                                                       "inter_op_num_threads": 1})
    if technique == "seqmse":
        apply_seq_mse(sim, batches, num_candidates=args.seqmse_candidates)
    elif technique == "adaround":
        step = max(1, len(calib) // args.adaround_images)
        apply_adaround(sim, _calib_batches(calib.subset(np.arange(0, len(calib), step)),
                                           proto.graph.input[0].name),
                       num_iterations=args.adaround_iters)
    sim.compute_encodings(batches)
    onnx.save(sim.to_onnx_qdq(prequantize_constants=True), str(out))
    return out


def quark(model: Path, calib, out: Path, args: argparse.Namespace) -> Path:
    """AMD Quark for ONNX asked for W4A8 (``QuantType.QInt4`` weights, QUInt8 activations,
    per-channel, MinMax, CLE on, QDQ): the legacy config, the only one of 0.13 that names a
    4-bit integer type (its QConfig specs stop at Int8/UInt8 and MX formats)."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
        )
        from quark.onnx import ModelQuantizer
        from quark.onnx.quantization.config.config import Config
        from quark.onnx.quantization.config.legacy import QuantizationConfig
    except ImportError as exc:
        raise NotInstalled(str(exc)) from exc

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(_calib_batches(calib, onnx.load(str(model)).graph.input[0].name))

        def get_next(self):
            return next(self.batches, None)

    config = Config(global_quant_config=QuantizationConfig(
        quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax,
        weight_type=QuantType.QInt4, activation_type=QuantType.QUInt8, per_channel=True,
        include_cle=True, print_summary=False))
    with contextlib.chdir(out.parent):     # Quark writes quantized_info.csv into the cwd
        ModelQuantizer(config).quantize_model(str(model), str(out), Reader())
    return out


def onnxbits_config(name: str, out: Path, mb: float, args: argparse.Namespace) -> ShrinkConfig:
    """The ImageNet recipe of docs/performance.md at ``--target-size mb``, target ``ort``."""
    proto = PROTOCOLS["imagenet"]
    recipe = dict(RECIPES["imagenet"])
    if args.reconstruct is not None:
        recipe["reconstruct"] = args.reconstruct
    return ShrinkConfig(data=SHARED / "data" / proto["data"],
                        eval_data=SHARED / "data" / proto["eval_data"],
                        classes=SHARED / "data" / proto["classes"],
                        preprocess=resolve_preprocess(MODELS[name][1]), output=out,
                        steps=args.steps, batch_size=16, target="ort", threads=args.threads,
                        target_size_mb=mb, seed=args.seed, **recipe)


# --- the run -------------------------------------------------------------------------------

def evaluate(path: Path, held, float_pred: np.ndarray | None, threads: int) -> dict[str, Any]:
    """Top-1/top-5 in ONNX Runtime (all optimizations) and agreement with the float top-1."""
    start = time.perf_counter()
    logits = predict_logits(make_session(path, threads=threads), held)
    acc = topk_accuracy(logits, held.labels)
    pred = logits.argmax(axis=1)
    agree = 100.0 if float_pred is None else float((pred == float_pred).mean() * 100)
    return {"top1": acc.top1, "top5": acc.top5, "agreement": agree, "n_eval": acc.n,
            "file_bytes": path.stat().st_size,
            "eval_seconds": round(time.perf_counter() - start, 1), "_pred": pred}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=IMAGENET)
    parser.add_argument("--quick", action="store_true",
                        help="development run: --eval-limit 200 --calib 64 --adaround-iters 20 "
                             "--adaround-images 32 --seqmse-candidates 5 --steps 20 "
                             "--reconstruct 20 (unless given)")
    parser.add_argument("--rows", nargs="*", choices=ROWS, default=list(ROWS),
                        help="rows to run (float always runs; the onnxbits rows need ort-w4)")
    parser.add_argument("--calib", type=int, default=None, help="PTQ calibration images (256)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="measure on this many val1300 images (rows i*1300//N); default all")
    parser.add_argument("--adaround-iters", type=int, default=None,
                        help="AIMET AdaRound iterations per layer (default 100)")
    parser.add_argument("--adaround-images", type=int, default=None,
                        help="AIMET AdaRound optimizes on this many of the calibration images "
                             "(evenly spaced; default 64)")
    parser.add_argument("--seqmse-candidates", type=int, default=None,
                        help="AIMET SeqMSE candidates per weight (default 20, AIMET's)")
    parser.add_argument("--steps", type=int, default=None, help="onnxbits steps (default 300)")
    parser.add_argument("--reconstruct", type=int, default=None,
                        help="onnxbits reconstruction steps per block (the recipe's 600)")
    parser.add_argument("--fraction", type=float, default=0.75,
                        help="the second onnxbits row's share of ORT W4A8's weight bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="ORT/torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    quick = {"calib": 64, "eval_limit": 200, "adaround_iters": 20, "adaround_images": 32,
             "seqmse_candidates": 5, "steps": 20, "reconstruct": 20}
    full = {"calib": 256, "eval_limit": None, "adaround_iters": 100, "adaround_images": 64,
            "seqmse_candidates": 20, "steps": 300, "reconstruct": None}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.disable(logging.INFO)          # the peers log every layer at INFO
    name = args.model
    model = SHARED / "models" / f"{name}.onnx"
    preset = MODELS[name][1]
    proto = PROTOCOLS["imagenet"]
    tune = _images(proto["data"], None, proto["classes"], preset)
    held = _images(proto["eval_data"], None, proto["classes"], preset)
    if args.eval_limit is not None and args.eval_limit < len(held):
        held = held.subset((np.arange(args.eval_limit) * len(held)) // args.eval_limit)
    calib = tune.subset((np.arange(args.calib) * len(tune)) // args.calib)
    calib_text = f"{args.calib} of sample1000 (rows i*{len(tune)}//{args.calib})"
    cores = sorted(os.sched_getaffinity(0))
    stem = f"peers_{name}.quick" if args.quick else f"peers_{name}"
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": name,
        "command": "python benchmarks/peers.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]),
        "machine": {"cores_used": len(cores), "cpu_affinity": cores, "cpus": os.cpu_count(),
                    "threads": args.threads, "python": platform.python_version()},
        "versions": {p: _version(p) for p in ("onnxbits", "onnxruntime", "onnx", "torch",
                                              "aimet-onnx", "amd-quark")},
        "split": {"calibration": calib_text, "onnxbits_tuning": f"all {len(tune)} of sample1000",
                  "eval": f"{len(held)} of val1300"},
        "options": {k: getattr(args, k) for k in (
            "calib", "eval_limit", "adaround_iters", "adaround_images", "seqmse_candidates",
            "steps", "reconstruct", "fraction", "seed", "quick")},
        "rows": [],
    }
    print(f"{name}: {len(cores)} core(s) {cores}, {args.threads} thread(s); calibration "
          f"{calib_text}; measured on {len(held)} images of val1300", flush=True)
    float_pred: np.ndarray | None = None

    def record(variant: str, key: str, tool: str, tuned_on: str, build: Callable[[], Path],
               claimed: Callable[[Path], Callable[[str], int | None]], **extra: Any) -> dict:
        nonlocal float_pred
        row: dict[str, Any] = {"variant": variant, "key": key, "tool": tool,
                               "version": _version(tool), "tuned_on": tuned_on, **extra}
        start = time.perf_counter()
        try:
            path = build()
            row["seconds"] = round(time.perf_counter() - start, 1)
            row.update(evaluate(path, held, float_pred, args.threads))
            row.update(level_check(path, claimed(path)))
            row["status"] = "ok"
        except NotInstalled as exc:
            row["status"] = INSTALL
            row["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - a failing peer is a result, the run goes on
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        pred = row.pop("_pred", None)
        if key == "float":
            float_pred = pred
        result["rows"].append(row)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        summary = {k: row.get(k) for k in ("variant", "status", "top1", "agreement",
                                           "weight_bytes", "weight_bytes_by_levels",
                                           "max_levels", "seconds")}
        print(json.dumps(summary), flush=True)
        return row

    def uniform(bits: int | None) -> Callable[[Path], Callable[[str], int | None]]:
        return lambda _path: lambda _node: bits

    def learned(path: Path) -> Callable[[str], int | None]:
        bits = {layer.name: layer.weight_bits for layer in analyze_model(path).layers}
        return bits.get

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        record("float", "float", "onnxruntime", "", lambda: model, uniform(None))
        ptq = {8: "ort-w8", 4: "ort-w4"}
        ort_rows: dict[int, dict] = {}
        for bits, key in ptq.items():
            if key in args.rows or (bits == 4 and any(r.startswith("onnxbits")
                                                      for r in args.rows)):
                ort_rows[bits] = record(
                    f"ORT quantize_static W{bits}A8", key, "onnxruntime", calib_text,
                    lambda b=bits: ort_ptq(model, calib, work / f"ort_w{b}.onnx", b),
                    uniform(bits), claimed_bits=f"W{bits}A8")
        for technique in ("minmax", "seqmse", "adaround"):
            key = f"aimet-{technique}"
            if key not in args.rows:
                continue
            label = {"minmax": "min-max", "seqmse": f"SeqMSE ({args.seqmse_candidates} "
                     "candidates)", "adaround": f"AdaRound ({args.adaround_iters} iterations "
                     "per layer)"}[technique]
            tuned_on = calib_text
            if technique == "adaround":
                step = max(1, args.calib // args.adaround_images)
                n = len(range(0, args.calib, step))
                tuned_on += f"; AdaRound on {n} of them (one in {step})" if step > 1 else ""
            record(f"AIMET ONNX W4A8 {label}", key, "aimet-onnx", tuned_on,
                   lambda t=technique: aimet(model, calib, work / f"aimet_{t}.onnx", t, args),
                   uniform(4), claimed_bits="W4A8")
        if "quark" in args.rows:
            record("AMD Quark W4A8 requested (QInt4, CLE)", "quark", "amd-quark", calib_text,
                   lambda: quark(model, calib, work / "quark.onnx", args), uniform(4),
                   claimed_bits="W4A8")
        w4 = ort_rows.get(4, {})
        if w4.get("status") == "ok":
            base = int(analyze_model(work / "ort_w4.onnx").quantized_weight_bytes / 1e3) / 1e3
            for key, share in (("onnxbits", 1.0), ("onnxbits-fraction", args.fraction)):
                if key not in args.rows:
                    continue
                mb = int(base * share * 1e3) / 1e3
                what = "ORT W4A8's weight bytes" if share == 1.0 else f"{share:g}x of them"
                path = work / f"onnxbits_{key}.onnx"
                info: dict[str, Any] = {}

                def run(mb: float = mb, path: Path = path, info: dict = info) -> Path:
                    report = shrink(model, onnxbits_config(name, path, mb, args)).report
                    info.update({k: report.get(k) for k in ("avg_bits", "avg_weight_bits",
                                                            "avg_act_bits")})
                    info["accuracy"] = report.get("accuracy")
                    info["stages"] = report.get("runtime", {}).get("stages", {})
                    return path

                record(f"onnxbits --target-size {mb:g} ({what})", key, "onnxbits",
                       f"all {len(tune)} of sample1000", run, learned,
                       claimed_bits="learned per layer, A8 executed", target_size_mb=mb,
                       steps=args.steps, shrink_report=info)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print("\n".join(peers_table(result)))
    print(f"\nwrote {args.out / f'{stem}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

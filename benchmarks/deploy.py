"""Deployment benchmark: size, ONNX Runtime CPU latency, fusion and accuracy of every target.

Usage::

    python benchmarks/deploy.py MODEL --data DIR --preset P [--steps 60] [--batch-size 32]
        [--lambda 0.05] [--fixed-bits W,A] [--max-train-images 2000] [--max-eval-images 2000]
        [--runs 30] [--threads 2] [--batches 1,16] [--save-dir DIR] [--json OUT.json]

``MODEL`` is an ``.onnx`` path or a name in ``../shared/models``. In one process:

1. a short shrink (same steps as ``onnxbits shrink``: normalise, import, attach quantizers,
   :func:`onnxbits.emit.prepare.prepare_ort`, calibrate, fine-tune, :func:`limit_clip_alphas`) on
   the fine-tune split, a seeded held-out split (or DIR/val) being the measure split.
   ``--fixed-bits W,A`` freezes every weight at W bits and every layer input at A bits after
   calibration instead of learning them (``--steps`` then fine-tunes at those bits; 0 skips it):
   a quick way to size and time the targets, not an accuracy result;
2. emit ``ort``, ``exact-sim`` and ``pack`` and check each against the torch model
   (:func:`onnxbits.emit.verify.verify`: largest difference in quantization steps);
3. ``onnxruntime.quantization.quantize_static`` int8 QDQ of the float model (per-channel
   weights, MinMax, QDQ format, default int8 types) calibrated on ``--calib-images`` fine-tune
   images: the baseline a user would otherwise deploy;
   (and with uint8 activations, ``U8S8``, the faster of the two on x86);
4. for the float model, the baselines and each target: file size, fused/unfused quantized ops
   in ORT's optimized graph (ORT_ENABLE_ALL), top-1 on the measure split and latency with
   ``--threads`` intra-op threads (thread-pool spinning off) at each batch size: ``--warmup``
   runs, then ``--runs`` rounds that run every model once in a random order, so that load on a
   shared machine hits them alike; the median (and the minimum, in the JSON) is reported, and
   the ratio to the faster quantize_static model: of the medians, and ``paired``, the median
   over rounds of the ratio within a round (robust to load that changes between rounds);
5. the ``pack`` size check (:func:`pack_size_check`).

Prints a table and writes JSON (``--json``). Timings on a shared machine are noisy: compare
ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxbits.config import ShrinkConfig  # noqa: E402
from onnxbits.data.decode import ImageTensors
from onnxbits.data.preprocess import resolve_preprocess
from onnxbits.emit.ortgraph import count_fusion, optimized_model  # noqa: E402
from onnxbits.emit.pack import weight_storage  # noqa: E402
from onnxbits.emit.prepare import limit_clip_alphas, prepare_ort  # noqa: E402
from onnxbits.emit.targets import emit  # noqa: E402
from onnxbits.emit.verify import verify  # noqa: E402
from onnxbits.graph.io import load_model  # noqa: E402
from onnxbits.graph.normalize import normalize  # noqa: E402
from onnxbits.importer.convert import convert, find_sites  # noqa: E402
from onnxbits.pipeline.inputs import load_splits  # noqa: E402
from onnxbits.pipeline.summary import torch_logits  # noqa: E402
from onnxbits.quant.network import attach_quantizers, calibrate  # noqa: E402
from onnxbits.report.evaluate import make_session, predict_logits, topk_accuracy  # noqa: E402
from onnxbits.report.model import analyze_model  # noqa: E402
from onnxbits.train.loop import TrainConfig, fine_tune  # noqa: E402

TARGETS = ("ort", "exact-sim", "pack")


def resolve_model(name: str) -> Path:
    path = Path(name)
    if path.suffix != ".onnx":
        path = ROOT.parent / "shared" / "models" / f"{name}.onnx"
    if not path.is_file():
        raise SystemExit(f"model {name}: no such file {path}")
    return path


def quantize_static_int8(float_path: Path, tensors: ImageTensors, count: int, out: Path,
                         activations: str) -> onnx.ModelProto:
    """ORT's own int8 QDQ: per-channel int8 weights, MinMax calibration on ``count`` images,
    ``activations`` ``int8`` (quantize_static's default) or ``uint8``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(float_path))
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(range(min(count, len(tensors))))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.items, None)
            return None if i is None else {name: tensors.batch(np.array([i]))}

    act_type = QuantType.QInt8 if activations == "int8" else QuantType.QUInt8
    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                    activation_type=act_type, weight_type=QuantType.QInt8)
    return onnx.load(str(out))


def latency(models: dict[str, bytes], x: np.ndarray, threads: int, warmup: int,
            runs: int, seed: int = 0) -> dict[str, list[float]]:
    """Milliseconds of every run of each model on ``x``, runs interleaved across models.

    Each round runs every model once, in a new random order. Thread-pool spinning is off: the
    idle threads of one session would otherwise spin on the cores the next session needs.
    """
    sessions = {}
    for name, data in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    rng = np.random.default_rng(seed)
    names = list(sessions)
    for _ in range(runs):
        for i in rng.permutation(len(names)):
            name, s = names[i], sessions[names[i]]
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def pack_size_check(packed: onnx.ModelProto) -> dict[str, Any]:
    """The issue's bound for the ``pack`` file, ``1.1 x (learned bits / 32) x float weight
    bytes`` for the layers at <= 4 bits, read two ways:

    * ``weights``: the bytes the file spends on those layers' weights (serialised integer
      tensors, scales and zero points, :func:`onnxbits.emit.pack.weight_storage`) over
      ``sum params * bits / 8`` (= (bits / 32) x their float bytes); the bound is 1.1;
    * ``file``: the whole file (graph, biases, activation scales, metadata included) over
      ``sum params * bits / 8`` of every layer; the bound applies when every layer is at
      <= 4 bits.
    """
    rows = weight_storage(packed)
    low = [r for r in rows if r.bits <= 4]
    learned_low = sum(r.learned_bytes for r in low)
    learned_all = sum(r.learned_bytes for r in rows)
    worst = max(low, key=lambda r: r.stored_bytes / r.learned_bytes, default=None)
    return {"layers": len(rows), "layers_at_most_4_bits": len(low),
            "weights_stored_bytes": sum(r.stored_bytes for r in low),
            "weights_learned_bytes": round(learned_low, 1),
            "weights_ratio": round(sum(r.stored_bytes for r in low) / learned_low, 4)
            if learned_low else None,
            "worst_layer": [worst.layer, round(worst.stored_bytes / worst.learned_bytes, 4)]
            if worst else None,
            "file_bytes": packed.ByteSize(), "all_learned_bytes": round(learned_all, 1),
            "file_ratio": round(packed.ByteSize() / learned_all, 4) if learned_all else None}


def fix_bits(net: Any, spec: str) -> None:
    """``W,A``: freeze every weight quantizer at W bits and every unfrozen activation at A."""
    w_bits, a_bits = (float(v) for v in spec.split(","))
    for layer in net.layers.values():
        layer.wq.freeze(torch.tensor(w_bits))
    for q in net.acts.values():
        if not q.frozen:
            q.freeze(torch.tensor(a_bits))


def shrink_and_emit(args: argparse.Namespace, path: Path, train: ImageTensors,
                    save_dir: Path) -> tuple[dict[str, onnx.ModelProto], dict[str, Any], Any]:
    """Short shrink, the quantize_static baselines and every target; models saved to save_dir."""
    original = load_model(path)
    model = normalize(original, str(path))
    float_graph = convert(model, str(path))
    net = attach_quantizers(model, float_graph, find_sites(model, float_graph))
    prepared = prepare_ort(model, net)
    session = make_session(original, threads=args.threads)
    teacher = predict_logits(session, train, batch_size=args.batch_size)

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, None]:
        return torch.from_numpy(train.batch(idx)), None

    calib = [fetch(np.arange(s, min(s + args.batch_size, len(train))))[0]
             for s in range(0, min(len(train), 4 * args.batch_size), args.batch_size)]
    calibrate(net, calib)
    start = time.perf_counter()
    if args.fixed_bits:
        fix_bits(net, args.fixed_bits)
    if args.steps > 0:
        fine_tune(net, fetch, torch.from_numpy(teacher), len(train),
                  TrainConfig(steps=args.steps, batch_size=args.batch_size, lam=args.lam,
                              objective=args.objective, seed=args.seed,
                              frozen_steps=args.steps if args.fixed_bits else None))
    clipped = limit_clip_alphas(model, net)
    info: dict[str, Any] = {"shrink_seconds": round(time.perf_counter() - start, 1),
                            "prepared": {k: len(v) for k, v in prepared.items()},
                            "clip_limited": clipped, "verification": {}}
    stem = path.stem
    candidates: dict[str, onnx.ModelProto] = {"float": original}
    for acts, label in STATIC.items():
        candidates[label] = quantize_static_int8(path, train, args.calib_images,
                                                 save_dir / f"{stem}.static_{acts}.onnx", acts)
    for target in TARGETS:
        emitted = emit(model, net, target, source={"model": path.name, "steps": args.steps})
        onnx.save(emitted, str(save_dir / f"{stem}.{target}.onnx"))
        info["verification"][target] = verify(emitted, net, calib[:2], target).to_dict()
        candidates[f"onnxbits {target}"] = emitted
    return candidates, info, net


def load_saved(path: Path, save_dir: Path) -> dict[str, onnx.ModelProto]:
    """The models a previous run saved to ``save_dir`` (``--reuse``)."""
    stem = path.stem
    candidates = {"float": onnx.load(str(path))}
    for acts, label in STATIC.items():
        candidates[label] = onnx.load(str(save_dir / f"{stem}.static_{acts}.onnx"))
    for target in TARGETS:
        candidates[f"onnxbits {target}"] = onnx.load(str(save_dir / f"{stem}.{target}.onnx"))
    return candidates


STATIC = {"int8": "quantize_static (S8S8, default)", "uint8": "quantize_static (U8S8)"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--include", default=None, help="glob of fine-tune files in --data")
    parser.add_argument("--eval-include", default=None, help="glob of measure files")
    parser.add_argument("--eval-data", type=Path, default=None, help="separate measure set")
    parser.add_argument("--classes", type=Path, default=None, help="class list (wnids.txt)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lambda", dest="lam", type=float, default=0.05)
    parser.add_argument("--objective", default="bits")
    parser.add_argument("--fixed-bits", default=None, metavar="W,A",
                        help="freeze weights at W and layer inputs at A bits instead of learning")
    parser.add_argument("--max-train-images", type=int, default=2000)
    parser.add_argument("--max-eval-images", type=int, default=2000)
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dir", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="measure the models a previous run saved to --save-dir")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    path = resolve_model(args.model)
    cfg = ShrinkConfig(data=args.data, preprocess=resolve_preprocess(args.preset),
                       steps=max(args.steps, 1), batch_size=args.batch_size, lam=args.lam,
                       objective=args.objective, max_train_images=args.max_train_images,
                       seed=args.seed, threads=args.threads, include=args.include,
                       eval_include=args.eval_include, eval_data=args.eval_data,
                       classes=args.classes)
    train, evaluation, split = load_splits(cfg)
    if len(evaluation) > args.max_eval_images:
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(evaluation))
                       [:args.max_eval_images])
        evaluation = ImageTensors(evaluation.images[keep], evaluation.labels[keep],
                                  evaluation.has_labels, evaluation.pre)
    if args.reuse and args.save_dir is None:
        raise SystemExit("--reuse needs --save-dir")
    save_dir = args.save_dir or Path(tempfile.mkdtemp(prefix="onnxbits-deploy-"))
    save_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    if args.reuse:
        candidates, info = load_saved(path, save_dir), {"verification": {}}
    else:
        candidates, info, net = shrink_and_emit(args, path, train, save_dir)
        rows["torch k-bit simulation"] = {
            "top1": topk_accuracy(torch_logits(net, evaluation, args.batch_size),
                                  evaluation.labels).top1}
    for name, proto in candidates.items():
        data = proto.SerializeToString()
        logits = predict_logits(make_session(data, threads=args.threads), evaluation,
                                batch_size=args.batch_size)
        top1 = topk_accuracy(logits, evaluation.labels).top1
        rows[name] = {"file_bytes": len(data), "top1": top1,
                      "fusion": count_fusion(optimized_model(data)).to_dict()}
    rows["torch k-bit simulation"] = rows.pop("torch k-bit simulation", {"top1": None})
    for batch in (int(b) for b in args.batches.split(",")):
        x = evaluation.batch(np.arange(batch) % len(evaluation))
        times = latency({n: p.SerializeToString() for n, p in candidates.items()}, x,
                        args.threads, args.warmup, args.runs)
        best = min(STATIC.values(), key=lambda n: statistics.median(times[n]))
        base = statistics.median(times[best])
        for name, t in times.items():
            ms = statistics.median(t)
            rows[name][f"ms_batch{batch}"] = round(ms, 4)
            rows[name][f"min_ms_batch{batch}"] = round(min(t), 4)
            rows[name][f"ratio_to_static_batch{batch}"] = round(ms / base, 3)
            rows[name][f"paired_ratio_batch{batch}"] = round(statistics.median(
                a / b for a, b in zip(t, times[best], strict=True)), 3)
    report = analyze_model(candidates["onnxbits pack"])
    result = {
        "model": str(path), "data": split, "steps": args.steps, "lambda": args.lam,
        "threads": args.threads, "runs": args.runs, "ort_version": ort.__version__,
        "avg_weight_bits": report.avg_weight_bits, "avg_act_bits": report.avg_act_bits,
        "layer_bits": {r.name: [r.weight_bits, r.act_bits, r.weight_container_bits]
                       for r in report.layers},
        "fixed_bits": args.fixed_bits,
        "pack_size": pack_size_check(candidates["onnxbits pack"]),
        "rows": rows, **info, "seconds": round(time.perf_counter() - started, 1),
        "saved_to": str(save_dir)}
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict[str, Any]) -> str:
    batches = sorted(int(k[8:]) for k in next(iter(result["rows"].values())) if
                     k.startswith("ms_batch"))
    head = ["model", "file kB", "top-1", "fused/float-q layers", "fused other", "max steps"]
    for b in batches:
        head += [f"ms b{b}", f"x best static b{b}", f"paired b{b}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["rows"].items():
        fusion = row.get("fusion")
        cells = [name, f"{row['file_bytes'] / 1e3:.1f}" if "file_bytes" in row else "-",
                 f"{row['top1']:.2f}" if row.get("top1") is not None else "-",
                 f"{fusion['fused_layers']}/{fusion['float_quantized_layers']}" if fusion else "-",
                 str(fusion["fused_other"]) if fusion else "-"]
        check = result["verification"].get(name.removeprefix("onnxbits "))
        cells.append(f"{check['max_steps']:.3f}" if check else "-")
        for b in batches:
            ms = row.get(f"ms_batch{b}")
            cells += [f"{ms:.3f}" if ms is not None else "-",
                      f"{row[f'ratio_to_static_batch{b}']:.3f}" if ms is not None else "-",
                      f"{row[f'paired_ratio_batch{b}']:.3f}" if ms is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    steps = ", ".join(f"{t}: {v['max_steps']:.2f}" for t, v in result["verification"].items()) \
        or "not measured (--reuse)"
    pack = result["pack_size"]
    lines += ["", f"avg weight bits {result['avg_weight_bits']:.2f}, avg activation bits "
              f"{result['avg_act_bits']:.2f}"
              + (f" (fixed {result['fixed_bits']})" if result.get("fixed_bits") else "")
              + f"; max ORT-vs-torch difference (steps): {steps}",
              f"pack: the {pack['layers_at_most_4_bits']} of {pack['layers']} layers at <= 4 "
              f"bits store their weights in {pack['weights_stored_bytes']} B = "
              f"{pack['weights_ratio']} x params*bits/8 (bound 1.1; worst layer "
              f"{pack['worst_layer']}); whole file {pack['file_bytes']} B = "
              f"{pack['file_ratio']} x params*bits/8 of all layers",
              f"ORT {result['ort_version']}, {result['threads']} threads, median of "
              f"{result['runs']} interleaved runs; shrink {result.get('shrink_seconds', '-')} s, "
              f"total {result['seconds']} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

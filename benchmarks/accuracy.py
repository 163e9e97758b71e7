"""Accuracy vs bits: float, ONNX Runtime PTQ (W8A8, W4A8) and onnxbits at several budgets.

One command per model, the protocol of ../shared/README.md: ImageNet models fine-tune (and ORT
calibrates) on ``imagenet/sample1000`` and are measured on ``imagenet/val1300``; CIFAR models use
files 0000-0499 of each class of ``cifar10/test`` for tuning and 0500-0999 for measuring. Every
variant sees the same images, preprocessing and seed. Writes ``<out>/<model>.json`` and
``<out>/<model>.png`` (top-1 vs average bits and vs weight bytes) and prints a table.

    python benchmarks/accuracy.py resnet20_cifar10 --budgets 5 4 3.5 3 --steps 400

``--ablate B`` instead runs the recipe's variants at one budget ``B`` (``ABLATIONS``: scales,
task loss, bitlength rounding, frozen-phase length, first/last layers, learning rate) and writes
``<out>/<model>.ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxbits.config import RECIPES, ShrinkConfig
from onnxbits.data.decode import decode_images
from onnxbits.data.files import load_image_set, select_files
from onnxbits.data.preprocess import resolve_preprocess
from onnxbits.emit.pack import pack_model
from onnxbits.pipeline.run import shrink
from onnxbits.report.evaluate import make_session, predict_logits, topk_accuracy
from onnxbits.report.model import analyze_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PAPER = {"mobilenet_v2_1.0_224_dq": (4.36, "BitPruning MobileNetV2: 4.36 bits, -0.5 %")}
PROTOCOLS = {
    "cifar": dict(data="cifar10/test", include="*/0[0-4]*", eval_data="cifar10/test",
                  eval_include="*/0[5-9]*", classes=None),
    "imagenet": dict(data="imagenet/sample1000", include=None, eval_data="imagenet/val1300",
                     eval_include=None, classes="imagenet/wnids.txt"),
}
# The recipe each protocol's onnxbits rows use (ShrinkConfig fields; the README's commands).
RECIPES: dict[str, dict] = {
    "cifar": {},
    "imagenet": dict(RECIPES["reconstruct"]),      # onnxbits shrink --recipe reconstruct
}
MODELS = {
    "resnet20_cifar10": ("cifar", "cifar10"),
    "resnet56_cifar10": ("cifar", "cifar10"),
    "efficientnet_lite0": ("imagenet", "efficientnet-lite"),
    "mobilenet_v2_1.0_224_dq": ("imagenet", "tf-mobilenet"),
    "mobilenet_v1_0.5_160_dq": ("imagenet", "tf-mobilenet-160"),
    "mobilenet_v1_0.25_128_dq": ("imagenet", "tf-mobilenet-128"),
}


def _images(rel: str, include: str | None, classes: str | None, preset: str):
    pre = resolve_preprocess(preset)
    image_set = load_image_set(SHARED / "data" / rel,
                               SHARED / "data" / classes if classes else None)
    image_set = select_files(image_set, include, "--include")
    return decode_images(image_set, pre, workers=2)[0]


def ort_ptq(model: Path, calib, out: Path, weight_bits: int) -> Path:
    """ORT quantize_static QDQ, per-channel, MinMax; W4 upgrades the model to opset 21."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rows = (np.arange(min(256, len(calib))) * len(calib)) // min(256, len(calib))
            self.batches = iter([{name: calib.batch(rows[i:i + 32])}
                                 for i in range(0, len(rows), 32)])

        def get_next(self):
            return next(self.batches, None)

    name = onnx.load(str(model)).graph.input[0].name
    prep = out.with_suffix(".prep.onnx")
    quant_pre_process(str(model), str(prep), skip_symbolic_shape=True)
    source = prep
    if weight_bits == 4:
        upgraded = onnx.version_converter.convert_version(onnx.load(str(prep)), 21)
        source = out.with_suffix(".op21.onnx")
        onnx.save(upgraded, str(source))
    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt4 if weight_bits == 4 else QuantType.QInt8)
    return out


ABLATIONS: dict[str, dict] = {
    "default: the protocol's recipe (CIFAR: learned scales, loss auto = kd+ce with labels, "
    "floor/ceil interpolation, 30% frozen, activations >= 3 bits; ImageNet: --recipe "
    "reconstruct)": {},
    "labels only (ce)": {"loss": "ce"},
    "distillation only (kd)": {"loss": "kd"},
    "no frozen-bit fine-tune": {"frozen_steps": 0},
    "50% frozen-bit fine-tune": {"frozen_steps": "half"},
    "horizontal flips (each image and its mirror)": {"augment": "flip"},
    "block reconstruction at the freeze (200 steps per block)": {"reconstruct": 200},
    "block reconstruction instead of the frozen-bit fine-tune": {"reconstruct": 200,
                                                                 "frozen_steps": 0},
    "weight learning rate 1e-5 (default 1e-4)": {"lr": 1e-5},
    "weight learning rate 1e-3": {"lr": 1e-3},
    "3-bit floor on weights too (--min-bits 3)": {"min_bits": 3},
    "activations down to 2 bits (--min-act-bits 2)": {"min_act_bits": 2},
}


def measure(path: Path, tensors) -> dict:
    """Top-1/top-5 in ONNX Runtime, bits and bytes; for an onnxbits ``ort`` model also the file
    size of its ``pack`` form (``onnxbits pack``: the weights at their learned bits)."""
    report = analyze_model(path)
    acc = topk_accuracy(predict_logits(make_session(path), tensors), tensors.labels)
    row = {"top1": acc.top1, "top5": acc.top5, "avg_bits": report.avg_bits,
           "avg_weight_bits": report.avg_weight_bits, "avg_act_bits": report.avg_act_bits,
           "weight_bytes_learned": report.quantized_weight_bytes,
           "weight_bytes_stored": report.stored_weight_bytes, "file_bytes": path.stat().st_size}
    if report.metadata.get("target") == "ort":
        row["pack_file_bytes"] = len(pack_model(onnx.load(str(path))).SerializeToString())
    return row


def _config(proto_name: str, preset: str, out: Path, args: argparse.Namespace,
            **overrides) -> ShrinkConfig:
    """The run's ShrinkConfig: protocol, recipe, then ``overrides`` (budget, ablation)."""
    proto = PROTOCOLS[proto_name]
    if overrides.get("frozen_steps") == "half":
        overrides["frozen_steps"] = args.steps // 2
    recipe = {**RECIPES[proto_name], **overrides}
    return ShrinkConfig(data=SHARED / "data" / proto["data"], include=proto["include"],
                        eval_data=SHARED / "data" / proto["eval_data"],
                        eval_include=proto["eval_include"],
                        classes=SHARED / "data" / proto["classes"] if proto["classes"] else None,
                        preprocess=resolve_preprocess(preset), output=out, steps=args.steps,
                        batch_size=args.batch_size, target=args.target, threads=args.threads,
                        **recipe)


def _shrink_row(model: Path, cfg: ShrinkConfig, variant: str, held) -> dict:
    start = time.perf_counter()
    result = shrink(model, cfg)
    row = {"variant": variant, **measure(cfg.output, held),
           "seconds": round(time.perf_counter() - start, 1),
           "torch_sim_top1": result.report["accuracy"]["torch_sim_k_bit"]["top1"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--budgets", type=float, nargs="*", default=[6, 5, 4, 3.5, 3])
    parser.add_argument("--sizes", type=str, nargs="*", default=[], metavar="MB",
                        help="also run --target-size budgets: MB values, or 'ort-w4' for the "
                             "weight bytes of ORT's W4A8 model (same bytes, compare top-1)")
    parser.add_argument("--threads", type=int, default=None, help="torch/ORT threads per run")
    parser.add_argument("--ablate", type=float, default=None, metavar="B",
                        help="run the recipe ablation at budget B instead of the budget sweep")
    parser.add_argument("--only", nargs="*", default=None, metavar="TEXT",
                        help="with --ablate: run the default and the variants whose name "
                             "contains one of these texts")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 64 (CIFAR) or 16 (ImageNet)")
    parser.add_argument("--target", default="exact-sim", help="onnxbits emission target")
    parser.add_argument("--no-ptq", action="store_true", help="skip the ORT quantize_static rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    proto_name, preset = MODELS[args.model]
    proto = PROTOCOLS[proto_name]
    if args.batch_size is None:
        args.batch_size = 16 if proto_name == "imagenet" else 64
    model = SHARED / "models" / f"{args.model}.onnx"
    args.out.mkdir(parents=True, exist_ok=True)
    tune = _images(proto["data"], proto["include"], proto["classes"], preset)
    held = _images(proto["eval_data"], proto["eval_include"], proto["classes"], preset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rows.append({"variant": "float", **measure(model, held),
                     "seconds": round(time.perf_counter() - start, 1)})
        for bits in () if args.no_ptq or args.ablate is not None else (8, 4):
            start = time.perf_counter()
            path = ort_ptq(model, tune, Path(tmp) / f"w{bits}a8.onnx", bits)
            rows.append({"variant": f"ORT quantize_static W{bits}A8", **measure(path, held),
                         "seconds": round(time.perf_counter() - start, 1)})
        if args.ablate is not None:
            for i, (variant, overrides) in enumerate(ABLATIONS.items()):
                if args.only is not None and i and not any(t in variant for t in args.only):
                    continue
                cfg = _config(proto_name, preset, Path(tmp) / f"ablation{i}.onnx", args,
                              target_bits=args.ablate, **overrides)
                rows.append(_shrink_row(model, cfg, variant, held))
        for budget in () if args.ablate is not None else args.budgets:
            cfg = _config(proto_name, preset, Path(tmp) / f"bits{budget}.onnx", args,
                          target_bits=budget)
            rows.append(_shrink_row(model, cfg, f"onnxbits --target-bits {budget} ({args.target})",
                                    held))
        for size in () if args.ablate is not None else args.sizes:
            mb = _size_mb(size, rows)
            cfg = _config(proto_name, preset, Path(tmp) / f"size{mb}.onnx", args,
                          target_size_mb=mb)
            rows.append(_shrink_row(model, cfg, f"onnxbits --target-size {mb:g} ({args.target})",
                                    held))
    float_top1 = rows[0]["top1"]
    for row in rows:
        row["delta_top1"] = row["top1"] - float_top1
    stem = f"{args.model}.ablation" if args.ablate is not None else args.model
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    if args.ablate is None:
        _plot(rows, args.model, args.out / f"{args.model}.png")
    print("| variant | avg bits (W / A) | top-1 | Δ top-1 | weight bytes (learned/stored) | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['avg_bits']:.2f} ({r['avg_weight_bits']:.2f} / "
              f"{r['avg_act_bits']:.2f}) | {r['top1']:.2f} | {r['delta_top1']:+.2f} | "
              f"{r['weight_bytes_learned'] / 1e3:.0f} kB / {r['weight_bytes_stored'] / 1e3:.0f} kB "
              f"| {r['seconds']} |")


def _size_mb(size: str, rows: list[dict]) -> float:
    """``--sizes`` value in MB: a number, or ``ort-w4`` (learned weight bytes of ORT's W4A8 row,
    rounded down to 1 kB)."""
    if size != "ort-w4":
        return float(size)
    ort = [r for r in rows if r["variant"] == "ORT quantize_static W4A8"]
    if not ort:
        raise SystemExit("--sizes ort-w4 needs the ORT W4A8 row; drop --no-ptq")
    return int(ort[0]["weight_bytes_learned"] / 1e3) / 1e3


def _plot(rows: list[dict], name: str, path: Path) -> None:
    """Top-1 vs average bits (left) and vs weight bytes (right). Float is a dashed line; the
    onnxbits bit budgets are one curve (filled: in ONNX Runtime; hollow: the k-bit simulation
    when the target executes activations at 8 bits), size budgets and ORT rows are markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    float_top1 = next(r["top1"] for r in rows if r["variant"] == "float")
    budgets = sorted((r for r in rows if "--target-bits" in r["variant"]),
                     key=lambda r: r["avg_bits"])
    sizes = [r for r in rows if "--target-size" in r["variant"]]
    ort = [r for r in rows if r["variant"].startswith("ORT")]
    for ax, key, scale, label in ((fig.add_subplot(1, 2, 1), "avg_bits", 1.0,
                                   "average per-layer bits (weights and activations)"),
                                  (fig.add_subplot(1, 2, 2), "weight_bytes_learned", 1e-6,
                                   "weight bytes at the learned bits (MB)")):
        ax.axhline(float_top1, color="green", linestyle="--", label=f"float ({float_top1:.2f})")
        ax.plot([r[key] * scale for r in budgets], [r["top1"] for r in budgets], "o-",
                color="C0", label="onnxbits --target-bits")
        sims = [r for r in budgets if r.get("torch_sim_top1") is not None
                and "(exact-sim)" not in r["variant"]]
        if sims:
            ax.plot([r[key] * scale for r in sims], [r["torch_sim_top1"] for r in sims], "o--",
                    color="C0", markerfacecolor="none", label="same, k-bit activations (sim)")
        if sizes:
            ax.plot([r[key] * scale for r in sizes], [r["top1"] for r in sizes], "D",
                    color="C3", label="onnxbits --target-size")
        for marker, r in zip("sv^", ort):
            ax.plot([r[key] * scale], [r["top1"]], marker, color="C1",
                    label=r["variant"].replace("quantize_static ", ""))
        if key == "avg_bits" and name in PAPER:
            bits, text = PAPER[name]
            ax.axvline(bits, color="grey", linestyle=":", label=text)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%) on the measure split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: top-1 vs bits (ONNX Runtime, held-out split)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

"""Real pretrained models that are not ImageNet classifiers, shrunk label-free from ``.npz`` data.

``pip install rapidocr-onnxruntime==1.4.4`` (only for this benchmark), then
``python benchmarks/real_models.py [--steps 300] [--only det,rec,cls]``

The three models inside the ``rapidocr-onnxruntime`` wheel, exported by paddle2onnx (opset
11-12, dynamic height and width):

* ``det``: PP-OCRv4 text detector (DBNet): a per-pixel text probability map (Sigmoid output);
* ``rec``: PP-OCRv4 text recognizer (SVTR neck with MatMul attention): a per-position Softmax
  over 6625 symbols;
* ``cls``: PP-OCR text-direction classifier: 2 classes (Softmax).

Data: text lines and pages rendered with the DejaVu fonts in ``/usr/share/fonts`` (random words,
sizes, colours and offsets), preprocessed as RapidOCR does, written as ``.npz``; the fine-tune set
and the evaluation set are rendered from different seeds (never trained on). Each model is shrunk
with ``onnxbits shrink MODEL --data train.npz --eval-data eval.npz``, and measured in ONNX
Runtime on the evaluation set against the float model and ONNX Runtime's ``quantize_static``
(QDQ, per-channel int8 weights, uint8 activations, min-max on 64 fine-tune samples; on the cls
model its ``quant_pre_process`` fails in symbolic shape inference, and with
``skip_symbolic_shape=True`` the quantized model is invalid (DequantizeLinear ``axis`` at opset
11), so the models are quantized as exported: ORT then keeps the float weights in the file behind
a QuantizeLinear/DequantizeLinear pair, and its weight bytes show as ``-``): every
output's fidelity (SQNR, relative L2, argmax agreement), the share of text lines whose CTC-decoded
symbol sequence equals the float model's (``rec``), the IoU of the binarised text map at
RapidOCR's threshold 0.3 (``det``), weight bytes, file bytes and the latency of one sample
(median, 1 thread).

Prints a Markdown table and writes ``benchmarks/results/real_models.json``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxbits import ShrinkConfig, shrink  # noqa: E402
from onnxbits.graph.outputs import graph_outputs  # noqa: E402
from onnxbits.report.fidelity import fidelities  # noqa: E402
from onnxbits.report.model import analyze_model  # noqa: E402

FONTS = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))
WORDS = ("the quick brown fox jumps over a lazy dog invoice total amount date name address "
         "receipt price tax order number phone email street city road shop card cash change "
         "2024 12.50 $99 No. ID 0871 €15 #42 06/12 Mon Tue kg km").split()
#: name -> (file in the wheel, input height, width, mean, std) as RapidOCR preprocesses it.
MODELS = {
    "det": ("ch_PP-OCRv4_det_infer.onnx", 320, 320, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", 48, 320, (0.5,) * 3, (0.5,) * 3),
    "cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", 48, 192, (0.5,) * 3, (0.5,) * 3),
}
DET_THRESHOLD = 0.3


def _draw_line(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: int, y: int,
               size: int) -> None:
    text = " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))
    font = ImageFont.truetype(FONTS[int(rng.integers(len(FONTS)))], size)
    draw.text((x, y), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 90, 3)))


def render(kind: str, n: int, seed: int) -> np.ndarray:
    """``n`` uint8 HWC images: text lines (``rec``, ``cls``; some ``cls`` lines upside down)
    or pages of lines (``det``)."""
    _, h, w, _, _ = MODELS[kind]
    rng = np.random.default_rng(seed)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(170, 256, 3)))
        draw = ImageDraw.Draw(img)
        if kind == "det":
            y = int(rng.integers(0, 20))
            while y < h - 30:
                size = int(rng.integers(14, 30))
                _draw_line(draw, rng, int(rng.integers(0, w // 3)), y, size)
                y += size + int(rng.integers(4, 30))
        else:
            _draw_line(draw, rng, int(rng.integers(2, 20)), int(rng.integers(0, 10)),
                       int(rng.integers(20, 34)))
            if kind == "cls" and rng.random() < 0.5:
                img = img.rotate(180)
        out[i] = np.asarray(img)
    return out


def preprocess(kind: str, images: np.ndarray) -> np.ndarray:
    _, _, _, mean, std = MODELS[kind]
    x = images.astype(np.float32) / 255.0
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def run_all(session: ort.InferenceSession, x: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: x[s:s + batch]}) for s in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def latency_ms(path: Path, x: np.ndarray, repeats: int = 30) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(3):
        session.run(None, {name: x[:1]})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {name: x[:1]})
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def ort_int8(model: Path, calib: np.ndarray, out: Path) -> float:
    name = onnx.load(model).graph.input[0].name
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    start = time.perf_counter()
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    return time.perf_counter() - start


def ctc_sequences(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding (index 0 = blank) of ``(N, T, K)`` probabilities."""
    out = []
    for row in probs.argmax(-1):
        seq, prev = [], 0
        for k in row:
            if k != prev and k != 0:
                seq.append(int(k))
            prev = k
        out.append(tuple(seq))
    return out


def task_metric(kind: str, reference: np.ndarray, got: np.ndarray) -> dict[str, float]:
    if kind == "rec":
        a, b = ctc_sequences(reference), ctc_sequences(got)
        return {"exact_lines": 100.0 * float(np.mean([x == y for x, y in zip(a, b)]))}
    if kind == "det":
        a, b = reference > DET_THRESHOLD, got > DET_THRESHOLD
        return {"map_iou": 100.0 * float((a & b).sum() / max((a | b).sum(), 1))}
    return {}


def measure(kind: str, path: Path, float_path: Path, x: np.ndarray,
            reference: list[np.ndarray]) -> dict[str, object]:
    got = run_all(ort.InferenceSession(str(path)), x)
    described = graph_outputs(onnx.load(float_path))
    fid = [f.to_dict() for f in fidelities(reference, got, described)]
    report = analyze_model(path)
    return {"fidelity": fid, **task_metric(kind, reference[0], got[0]),
            "weight_bytes": int(report.stored_weight_bytes) or None,   # None: not recognised
            "file_bytes": path.stat().st_size,
            "avg_bits": round(float(report.avg_weight_bits), 2),
            "latency_ms": latency_ms(path, x)}


def benchmark(kind: str, models: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    file, *_ = MODELS[kind]
    model = models / file
    train = preprocess(kind, render(kind, args.train, seed=0))
    evaluation = preprocess(kind, render(kind, args.eval, seed=1))
    name = onnx.load(model).graph.input[0].name
    np.savez(work / f"{kind}_train.npz", **{name: train})
    np.savez(work / f"{kind}_eval.npz", **{name: evaluation})
    reference = run_all(ort.InferenceSession(str(model)), evaluation)
    row: dict[str, object] = {"model": file, "package": "rapidocr-onnxruntime 1.4.4",
                              "outputs": [f"{o.name} {list(r.shape[1:])}" for o, r in
                                          zip(graph_outputs(onnx.load(model)), reference)],
                              "train": len(train), "eval": len(evaluation)}
    row["float"] = {"weight_bytes": int(analyze_model(model).stored_weight_bytes),
                    "file_bytes": model.stat().st_size, "latency_ms": latency_ms(model, evaluation)}
    int8 = work / f"{kind}.int8.onnx"
    seconds = ort_int8(model, train[:64], int8)
    row["ort_int8"] = {**measure(kind, int8, model, evaluation, reference),
                       "seconds": round(seconds, 1)}
    out = work / f"{kind}.bits.onnx"
    start = time.perf_counter()
    result = shrink(model, ShrinkConfig(data=work / f"{kind}_train.npz",
                                        eval_data=work / f"{kind}_eval.npz", output=out,
                                        steps=args.steps, batch_size=args.batch_size,
                                        target_bits=args.target_bits))
    seconds = time.perf_counter() - start
    row["onnxbits"] = {**measure(kind, out, model, evaluation, reference),
                       "seconds": round(seconds, 1), "steps": args.steps,
                       "verification": result.report["verification"],
                       "losses": [f["kind"] for f in result.report["fidelity"]]}
    return row


def table(rows: dict[str, dict]) -> str:
    lines = ["| model (rapidocr-onnxruntime 1.4.4) | outputs | tool | avg W bits | weight MB | "
             "file MB | SQNR dB | agreement % | task metric | latency ms (1 thread) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for kind, row in rows.items():
        for tool in ("float", "ort_int8", "onnxbits"):
            r = row[tool]
            fid = r.get("fidelity", [{}])[0]
            metric = ", ".join(f"{k} {v:.1f}" for k, v in r.items()
                               if k in ("exact_lines", "map_iou"))
            agree = fid.get("agreement")
            lines.append(
                f"| {kind}: {row['model']} | {'; '.join(row['outputs'])} | {tool} | "
                f"{r.get('avg_bits') or ('32' if tool == 'float' else '-')} | "
                f"{f'{r_mb:.2f}' if (r_mb := (r['weight_bytes'] or 0) / 1e6) else '-'} | "
                f"{r['file_bytes'] / 1e6:.2f} | {fid.get('sqnr_db', float('nan')):.1f} | "
                f"{'' if agree is None else f'{agree:.1f}'} | {metric} | {r['latency_ms']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="det,rec,cls")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--target-bits", type=float, default=None)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "real_models.json")
    args = parser.parse_args()
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not FONTS:
        print("skipped: needs `pip install rapidocr-onnxruntime==1.4.4` and the DejaVu fonts")
        return
    models = Path(spec.origin).parent / "models"
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.only.split(","):
            rows[kind] = benchmark(kind, models, Path(tmp), args)
            print(f"{kind}: done", flush=True)
    print(table(rows))
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                    "cpus": __import__("os").cpu_count(),
                                    "ort": ort.__version__, "models": rows,
                                    "args": {k: str(v) for k, v in vars(args).items()}},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

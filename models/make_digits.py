#!/usr/bin/env python
"""Build onnxbits' embedded default model and data set.

Writes, next to this script (or under ``--out``):

* ``digits/train/<digit>/<index:04d>.png`` and ``digits/val/<digit>/<index:04d>.png``:
  scikit-learn's bundled 8x8 handwritten digits as 8-bit grayscale PNGs
  (pixel = round(value * 255 / 16)), split stratified with seed 0 into
  1197 train / 600 val images. ``<index>`` is the row in ``load_digits()``.
* ``digits_cnn.onnx``: a small CNN (BatchNormalization kept as separate nodes) trained on the
  train split only. Input ``input`` [N,1,8,8] float32 with x = pixel / 255, output ``logits``
  [N,10]; opset 13.
* ``digits_cnn.json``: measured accuracies and provenance.

Everything is seeded and runs single-threaded with deterministic algorithms, so rerunning
on the same software stack reproduces the same files. Runs in well under a minute on a CPU.

Usage::

    python models/make_digits.py [--out models] [--epochs 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

N_VAL = 600
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- data


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (pixels uint8 [1797,8,8], labels, train_idx, val_idx)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    values = ds.images  # float64 in 0..16
    labels = ds.target.astype(np.int64)
    pixels = np.rint(values * 255.0 / 16.0).astype(np.uint8)
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        idx, test_size=N_VAL, stratify=labels, random_state=seed, shuffle=True
    )
    return pixels, labels, np.sort(train_idx), np.sort(val_idx)


def write_image_folder(root: Path, pixels, labels, train_idx, val_idx) -> None:
    from PIL import Image

    for split, ids in (("train", train_idx), ("val", val_idx)):
        split_dir = root / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        for c in range(NUM_CLASSES):
            (split_dir / str(c)).mkdir(parents=True, exist_ok=True)
        for i in ids:
            img = Image.fromarray(pixels[i])  # uint8 HxW -> mode "L"
            img.save(split_dir / str(int(labels[i])) / f"{int(i):04d}.png", format="PNG")


def read_image_folder(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode an ImageFolder split back from disk: x = px/255, [N,1,8,8] float32."""
    from PIL import Image

    xs, ys = [], []
    for cls_dir in sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name)):
        for f in sorted(cls_dir.glob("*.png")):
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
            ys.append(int(cls_dir.name))
    return np.stack(xs)[:, None], np.asarray(ys, dtype=np.int64)


# ----------------------------------------------------------------------------- model


def build_model():
    import torch.nn as nn

    def cbr(cin, cout, k=3, stride=1, groups=1):
        return [
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    return nn.Sequential(
        *cbr(1, 16),  # 8x8
        *cbr(16, 32, stride=2),  # 4x4
        *cbr(32, 32),
        *cbr(32, 32, groups=32),  # depthwise
        *cbr(32, 64, k=1),  # pointwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, NUM_CLASSES),
    )


def random_shift(x, gen, max_shift: int = 1):
    """Shift each image by an integer offset in [-max_shift, max_shift]^2, zero fill."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [n,h]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [n,w]
    bi = torch.arange(n)[:, None, None]
    out = padded[:, 0][bi, rows[:, :, None], cols[:, None, :]]
    return out[:, None]


def top1(model, x, y, batch: int = 512) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            correct += int((model(x[s : s + batch]).argmax(1) == y[s : s + batch]).sum())
    return correct / len(x)


def train(x_tr, y_tr, x_val, y_val, epochs: int, seed: int, log=print):
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 64
    steps_per_epoch = (len(x_tr) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        tot = 0.0
        for s in range(0, len(x_tr), batch):
            idx = perm[s : s + batch]
            xb = random_shift(x_tr[idx], gen)
            loss = loss_fn(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        if (ep + 1) % 10 == 0 or ep == epochs - 1:
            log(
                f"epoch {ep + 1:3d}  loss {tot / len(x_tr):.4f}  "
                f"train {top1(model, x_tr, y_tr):.4f}  val {top1(model, x_val, y_val):.4f}"
            )
    model.eval()
    return model


# ----------------------------------------------------------------------------- export


def _strip_initializer_identities(model_proto) -> None:
    """Replace ``Identity(initializer)`` nodes (the exporter's dedup of equal tensors) by copies."""
    import onnx
    from onnx import numpy_helper

    g = model_proto.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            g.initializer.append(numpy_helper.from_array(arr.copy(), node.output[0]))
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    onnx.checker.check_model(model_proto)


def export_onnx(model, path: Path) -> None:
    import warnings

    import onnx
    import torch

    dummy = torch.zeros(1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=13,
            do_constant_folding=False,  # keeps BatchNormalization as its own node
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
    m = onnx.load(str(path))
    _strip_initializer_identities(m)
    m.producer_name = "onnxbits/models/make_digits.py"
    m.doc_string = "8x8 handwritten digits CNN (sklearn load_digits); input x = pixel/255"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def ort_top1(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 128) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    preds = []
    for s in range(0, len(x), batch):
        preds.append(sess.run(["logits"], {"input": x[s : s + batch]})[0].argmax(1))
    pred = np.concatenate(preds)
    return float((pred == y).mean()), pred


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output directory (default: the directory of this script)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-val", type=float, default=0.97,
                    help="fail if the ONNX model's val top-1 is below this")
    args = ap.parse_args(argv)

    import onnx
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    pixels, labels, train_idx, val_idx = load_split(args.seed)
    data_root = out / "digits"
    write_image_folder(data_root, pixels, labels, train_idx, val_idx)
    print(f"wrote {len(train_idx)} train / {len(val_idx)} val PNGs under {data_root}")

    # Train on exactly what a loader decodes from the PNGs: x = px/255.
    x_all = torch.from_numpy(pixels.astype(np.float32) / 255.0)[:, None]
    y_all = torch.from_numpy(labels)
    tr, va = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    model = train(x_all[tr], y_all[tr], x_all[va], y_all[va], args.epochs, args.seed)
    train_acc = top1(model, x_all[tr], y_all[tr])
    val_acc = top1(model, x_all[va], y_all[va])
    params = sum(p.numel() for p in model.parameters())

    onnx_path = out / "digits_cnn.onnx"
    export_onnx(model, onnx_path)
    ops = [n.op_type for n in onnx.load(str(onnx_path)).graph.node]

    # Verify ONNX Runtime on the PNGs re-read from disk.
    xv, yv = read_image_folder(data_root / "val")
    xt, yt = read_image_folder(data_root / "train")
    ort_val, _ = ort_top1(onnx_path, xv, yv)
    ort_train, _ = ort_top1(onnx_path, xt, yt)
    print(f"torch: train {train_acc:.4f} val {val_acc:.4f} | ORT (PNGs): train {ort_train:.4f} "
          f"val {ort_val:.4f} | params {params} | {onnx_path.stat().st_size} bytes")
    print("ops:", ops)
    if abs(ort_val - val_acc) > 1e-9 or abs(ort_train - train_acc) > 1e-9:
        print("error: ONNX Runtime accuracy differs from torch", file=sys.stderr)
        return 1
    if ort_val < args.min_val:
        print(f"error: val top-1 {ort_val:.4f} < {args.min_val}", file=sys.stderr)
        return 1

    meta = {
        "model": "digits_cnn.onnx",
        "data": "digits/{train,val}/<digit>/<index:04d>.png",
        "source": "sklearn.datasets.load_digits (UCI ML hand-written digits, BSD-3-Clause)",
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "val_top1": round(ort_val, 6),
        "train_top1": round(ort_train, 6),
        "params": int(params),
        "seed": args.seed,
        "epochs": args.epochs,
        "input": "input [N,1,8,8] float32",
        "output": "logits [N,10]",
        "opset": 13,
        "preprocessing": "grayscale, x = pixel/255",
        "ops": ops,
    }
    (out / "digits_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

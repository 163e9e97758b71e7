"""Dataset scale: a shrink and an eval on an ImageNet-sized tree against the 1000-image protocol.

``python benchmarks/scale.py [--classes 1000] [--per-class 1281] [--eval-images 20000]``

Builds, in a temporary folder, an ImageNet-layout tree ``train/<wnid>/<k>.JPEG`` of
``classes x per-class`` symlinks to the real ``../shared/data/imagenet/sample1000`` images (the
default: 1,281,000 files, the size of ImageNet's training set), then measures side by side, each
in a child process (wall time and peak RSS from ``wait4``):

* ``shrink efficientnet_lite0 --steps 20 --batch-size 16`` with ``--data`` the tree against
  ``--data sample1000``, both measured on ``val1300``;
* ``eval mobilenet_v1_0.25_128_dq`` on a tree of ``--eval-images`` symlinks against ``val1300``.

Prints a table and writes ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGENET = SHARED / "data" / "imagenet"
ONNXBITS = [sys.executable, "-m", "onnxbits.cli.main"]


def build_tree(root: Path, classes: int, per_class: int) -> float:
    """``root/<wnid>/<k>.JPEG`` -> the sample1000 image of that class; return seconds taken."""
    start = time.perf_counter()
    wnids = (IMAGENET / "wnids.txt").read_text().split()[:classes]
    for wnid in wnids:
        source = next((IMAGENET / "sample1000" / wnid).iterdir())
        folder = root / wnid
        folder.mkdir(parents=True)
        for k in range(per_class):
            os.symlink(source, folder / f"{k:04d}.JPEG")
    return time.perf_counter() - start


def run(args: list[str]) -> dict[str, float | int]:
    """Run ``onnxbits ARGS`` in a child process; its wall seconds and peak RSS (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([*ONNXBITS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"onnxbits {' '.join(args)} failed ({code}): {err.strip()[-2000:]}")
    record: dict[str, float | int] = {"seconds": round(seconds, 1),
                                      "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    try:
        report = json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return record
    if "accuracy" in report:
        record.update(n_train=report["data"]["n_train"], n_eval=report["data"]["n_eval"],
                      top1=round(report["accuracy"]["quantized"]["top1"], 2),
                      stages=report["runtime"]["stages"])
    elif "top1" in report:
        record.update(n=report["n"], top1=round(report["top1"], 2))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1281)
    parser.add_argument("--eval-images", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    opts = parser.parse_args()
    if not IMAGENET.is_dir():
        raise SystemExit(f"{IMAGENET} is missing: the benchmark needs ../shared")
    tmp = Path(tempfile.mkdtemp(prefix="onnxbits-scale-"))
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(),
                                              "platform": platform.platform(),
                                              "python": platform.python_version()}}
    try:
        built = build_tree(tmp / "train", opts.classes, opts.per_class)
        n_files = opts.classes * opts.per_class
        results["tree"] = {"files": n_files, "build_seconds": round(built, 1)}
        print(f"built {n_files} symlinks in {built:.0f} s under {tmp}", flush=True)
        shrink = ["shrink", str(SHARED / "models/efficientnet_lite0.onnx"),
                  "--eval-data", str(IMAGENET / "val1300"), "--classes",
                  str(IMAGENET / "wnids.txt"), "--preset", "efficientnet-lite", "--steps", "20",
                  "--batch-size", "16", "--json", "-q"]
        rows = {
            "shrink sample1000": run([*shrink, "--data", str(IMAGENET / "sample1000"),
                                      "-o", str(tmp / "small.bits.onnx")]),
            f"shrink {n_files}-image tree": run([*shrink, "--data", str(tmp / "train"),
                                                 "-o", str(tmp / "large.bits.onnx")]),
        }
        per_eval = max(1, opts.eval_images // opts.classes)
        build_tree(tmp / "eval", opts.classes, per_eval)
        evaluate = ["eval", str(SHARED / "models/mobilenet_v1_0.25_128_dq.onnx"), "--classes",
                    str(IMAGENET / "wnids.txt"), "--preset", "tf-mobilenet-128", "--json"]
        rows["eval val1300"] = run([*evaluate, "--data", str(IMAGENET / "val1300")])
        rows[f"eval {opts.classes * per_eval}-image tree"] = run(
            [*evaluate, "--data", str(tmp / "eval")])
        results["runs"] = rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'run':<32} {'wall s':>8} {'peak RSS MB':>12} {'top-1':>7}")
    for name, r in rows.items():
        print(f"{name:<32} {r['seconds']:>8} {r['peak_rss_mb']:>12} {r.get('top1', ''):>7}")
    names = list(rows)
    results["shrink_delta"] = {
        "seconds": round(rows[names[1]]["seconds"] - rows[names[0]]["seconds"], 1),
        "peak_rss_mb": round(rows[names[1]]["peak_rss_mb"] - rows[names[0]]["peak_rss_mb"], 1)}
    results["eval_delta_rss_mb"] = round(rows[names[3]]["peak_rss_mb"]
                                         - rows[names[2]]["peak_rss_mb"], 1)
    print("shrink: tree - sample1000 =", results["shrink_delta"],
          "| eval: tree - val1300 =", results["eval_delta_rss_mb"], "MB")
    opts.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()

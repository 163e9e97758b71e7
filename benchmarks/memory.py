"""Peak memory of the default command on the ImageNet protocol, stage by stage.

``python benchmarks/memory.py [--model mobilenet_v2_1.0_224_dq] [--steps N]``

Runs, in a child process, the default ``onnxbits shrink MODEL --data sample1000 --eval-data
val1300 --classes wnids.txt --preset P`` (``--steps`` shortens it: the fine-tune's memory is flat
after its first step) and records its wall time, its peak RSS (``wait4``), the stage seconds of
its report and the RSS at the end of every stage (sampled from ``/proc`` every 0.5 s).
Prints a table and writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet"
PRESETS = {"mobilenet_v2_1.0_224_dq": "tf-mobilenet", "efficientnet_lite0": "efficientnet-lite"}


def sample_rss(pid: int, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    """Append ``(seconds, RSS MB)`` of ``pid`` every 0.5 s until ``stop``."""
    start = time.perf_counter()
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as status:
                kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            break
        samples.append((time.perf_counter() - start, kb // 1024))
        stop.wait(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2_1.0_224_dq", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=None, help="default: the command's own")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/memory.json")
    opts = parser.parse_args()
    model = ROOT.parent / "shared" / "models" / f"{opts.model}.onnx"
    with tempfile.TemporaryDirectory(prefix="onnxbits-memory-") as tmp:
        args = [sys.executable, "-m", "onnxbits.cli.main", "shrink", str(model), "--data",
                str(IMAGENET / "sample1000"), "--eval-data", str(IMAGENET / "val1300"),
                "--classes", str(IMAGENET / "wnids.txt"), "--preset", PRESETS[opts.model],
                "-o", str(Path(tmp) / "out.onnx"), "--json", "-q"]
        if opts.steps is not None:
            args += ["--steps", str(opts.steps)]
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, samples, stop))
        sampler.start()
        out, err = proc.communicate()
        stop.set()
        sampler.join()
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"shrink failed ({proc.returncode}): {err.strip()[-2000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    stages, at_end, elapsed = report["runtime"]["stages"], {}, 0.0
    for name, secs in stages.items():       # RSS when each stage ended (stages run in order)
        elapsed += secs
        at_end[name] = max((mb for t, mb in samples if t <= elapsed + 1.0), default=None)
    peak = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # the child's
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "model": opts.model, "steps": report["config"]["steps"],
              "batch_size": report["config"]["batch_size"], "seconds": round(seconds, 1),
              "peak_rss_mb": peak, "stages": stages, "rss_mb_at_stage_end": at_end,
              "avg_bits": round(report["avg_bits"], 2),
              "top1": round(report["accuracy"]["quantized"]["top1"], 2),
              "float_top1": round(report["accuracy"]["float"]["top1"], 2)}
    print(f"{opts.model}, {result['steps']} steps of batch {result['batch_size']}: "
          f"{seconds:.0f} s, peak RSS {peak} MB")
    for name, secs in stages.items():
        print(f"  {name:<16} {secs:>8.1f} s   RSS at its end {at_end[name]} MB")
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()

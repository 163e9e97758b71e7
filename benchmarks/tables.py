"""Write the results tables of docs/performance.md from benchmarks/results/*.json.

Usage::

    python benchmarks/tables.py          # rewrite docs/performance.md between the markers
    python benchmarks/tables.py --check  # exit 1 if docs/performance.md is out of date

Only the region between ``<!-- tables:begin -->`` and ``<!-- tables:end -->`` is generated; the
text around it is kept. Every number in that region is read from a JSON file of
``benchmarks/results`` (written by ``benchmarks/accuracy.py``, ``benchmarks/peers.py`` and
``benchmarks/scale.py``, ``benchmarks/memory.py``); every ``peers_<model>.json`` gets a table (``*.quick.json`` do not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- tables:begin -->", "<!-- tables:end -->"
Row = dict[str, Any]

ACCURACY = "python benchmarks/accuracy.py"
ABLATE = f"{ACCURACY} resnet20_cifar10 --ablate 3.5"
# (json stem, title, command that wrote it)
CIFAR = [
    ("resnet20_cifar10", "resnet20_cifar10",
     f"{ACCURACY} resnet20_cifar10 --budgets 5 4 3.5 3 --steps 300"),
    ("resnet56_cifar10", "resnet56_cifar10",
     f"{ACCURACY} resnet56_cifar10 --budgets 4 3.5 3 --steps 300"),
]
IMAGENET = [
    ("efficientnet_lite0", "efficientnet_lite0",
     f"{ACCURACY} efficientnet_lite0 --budgets 5 4 --sizes ort-w4 --target ort --threads 1"),
    ("mobilenet_v2_1.0_224_dq", "mobilenet_v2_1.0_224_dq",
     f"{ACCURACY} mobilenet_v2_1.0_224_dq --budgets 5 4 --sizes ort-w4 --target ort --threads 1"),
]
ABLATIONS = [
    ("resnet20_cifar10.ablation", "recipe ablation", f"{ABLATE} --steps 300"),
    ("resnet20_cifar10.ablation2", "bias correction, flips, bias learning rate",
     f'{ABLATE} --only "bias correction" flips "bias learning" --steps 300 --threads 1'),
    ("resnet20_cifar10.ablation3", "weight rounding, feature distillation, QDrop",
     f'{ABLATE} --only "weight rounding" feature QDrop'),
    ("resnet20_cifar10.ablation4", "random resized crops, bit annealing",
     f'{ABLATE} --only "random resized crops" "bit annealing"'),
    ("resnet20_cifar10.ablation5", "block reconstruction",
     f'{ABLATE} --only "block reconstruction" "no frozen-bit"'),
    ("resnet20_cifar10.ablation6", "bitlength floors",
     f'{ABLATE} --only "3-bit floor"'),
    ("resnet20_cifar10.ablation7", "distillation only, random crops, mixup",
     f'{ABLATE} --only "distillation only" "random resized" mixup'),
]


def load(stem: str) -> Any:
    return json.loads((RESULTS / f"{stem}.json").read_text())


def num(x: float, places: int = 2, sign: bool = False) -> str:
    """``x`` with ``places`` decimals (``sign``: always with a sign; never ``-0.00``)."""
    text = f"{x:+.{places}f}" if sign else f"{x:.{places}f}"
    return text.replace("-", "+") if float(text) == 0 else text


def bits(r: Row) -> str:
    vals = (r["avg_bits"], r["avg_weight_bits"], r["avg_act_bits"])
    if all(float(v).is_integer() for v in vals):
        return "{:g} ({:g} / {:g})".format(*vals) if vals[0] != 32 else "32"
    return "{} ({} / {})".format(*(num(v) for v in vals))


def kb(n: float | None) -> str:
    return "" if n is None else f"{round(n / 1000)} kB"


def minutes(r: Row) -> str:
    s = r["seconds"]
    return "" if r["variant"] == "float" else f"{round(s)} s" if s < 600 else f"{round(s / 60)} min"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def vs(r: Row, base: float) -> str:
    return "" if r["variant"] == "float" else num(r["top1"] - base, sign=True)


def cifar(rows: list[Row]) -> list[str]:
    head = ["variant", "avg bits (W / A)", "top-1", "vs float", "weight bytes at learned bits", "s"]
    return table(head, [[r["variant"], bits(r), num(r["top1"]), vs(r, rows[0]["top1"]),
                         kb(r["weight_bytes_learned"]),
                         "" if r["variant"] == "float" else str(round(r["seconds"]))]
                        for r in rows])


def imagenet(rows: list[Row]) -> list[str]:
    head = ["variant", "avg bits (W / A)", "top-1 ORT", "k-bit sim", "vs float", "weight bytes",
            "file", "pack file", "time"]
    return table(head, [[r["variant"], bits(r), num(r["top1"]),
                         num(r["torch_sim_top1"]) if "torch_sim_top1" in r else "",
                         vs(r, rows[0]["top1"]), kb(r["weight_bytes_learned"]),
                         kb(r["file_bytes"]), kb(r.get("pack_file_bytes")), minutes(r)]
                        for r in rows])


def ablation(rows: list[Row]) -> list[str]:
    default = next(r["top1"] for r in rows if r["variant"].startswith("default"))
    head = ["variant", "avg bits (W / A)", "top-1", "vs float", "vs default", "s"]
    return table(head, [[r["variant"], bits(r), num(r["top1"]), vs(r, rows[0]["top1"]),
                         "" if r["variant"] == "float" or r["variant"].startswith("default")
                         else num(r["top1"] - default, sign=True),
                         "" if r["variant"] == "float" else str(round(r["seconds"]))]
                        for r in rows])


def scale(d: dict[str, Any]) -> list[str]:
    m, t = d["machine"], d["tree"]
    rows = [[name, f"{r['n_train']} / {r['n_eval']}" if "n_train" in r else str(r["n"]),
             num(r["seconds"], 1), num(r["peak_rss_mb"], 0), num(r["top1"]),
             ", ".join(f"{k} {num(v, 1)}" for k, v in r.get("stages", {}).items())]
            for name, r in d["runs"].items()]
    note = (f"{m['cpus']} CPUs, Python {m['python']}; the tree of {t['files']} files took "
            f"{num(t['build_seconds'], 1)} s to build.")
    return [note, ""] + table(
        ["run", "images (fine-tune / measure)", "s", "peak RSS MB", "top-1", "stages (s)"], rows)


def memory(d: dict[str, Any]) -> list[str]:
    m = d["machine"]
    note = (f"{m['cpus']} CPUs, Python {m['python']}; `{d['model']}`, the default command "
            f"({d['steps']} steps of batch {d['batch_size']}): {num(d['seconds'], 0)} s, peak "
            f"RSS **{d['peak_rss_mb']} MB**, {num(d['avg_bits'])} average bits, top-1 "
            f"{num(d['top1'])} against {num(d['float_top1'])} float.")
    rows = [[name, num(secs, 1), str(d["rss_mb_at_stage_end"][name])]
            for name, secs in d["stages"].items()]
    return [note, ""] + table(["stage", "s", "RSS at its end, MB"], rows)


def _seconds(s: float) -> str:
    return f"{round(s)} s" if s < 600 else f"{round(s / 60)} min"


def peers_table(d: dict[str, Any]) -> list[str]:
    """The table of one ``benchmarks/peers.py`` run (also what the script prints)."""
    m, split, versions = d["machine"], d["split"], d["versions"]
    rows = d["rows"]
    base = next(r["top1"] for r in rows if r["key"] == "float")
    head = ["variant", "tuned on", "top-1", "vs float", "agrees with float", "weight bytes",
            "needed by the levels", "tensors within the claimed bits (max levels)", "file",
            "time"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["variant"], r["tuned_on"], r["status"], *[""] * (len(head) - 3)])
            continue
        quant = r["quantized_tensors"]
        check = (f"{r['tensors_within_claim']}/{quant} ({r['max_levels']})" if quant
                 else "float")
        body.append([r["variant"], r["tuned_on"], num(r["top1"]),
                     "" if r["key"] == "float" else num(r["top1"] - base, sign=True),
                     "" if r["key"] == "float" else f"{num(r['agreement'], 1)} %",
                     kb(r["weight_bytes"]), kb(r["weight_bytes_by_levels"]), check,
                     kb(r["file_bytes"]), "" if r["key"] == "float" else _seconds(r["seconds"])])
    tools = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    note = (f"{m['cores_used']} of {m['cpus']} CPU cores, {m['threads']} thread(s); {tools}. "
            f"PTQ calibration: {split['calibration']}; onnxbits: {split['onnxbits_tuning']}; "
            f"measured in ONNX Runtime on {split['eval']}.")
    return [note, ""] + table(head, body)


def section(title: str, command: str, body: list[str]) -> list[str]:
    return [f"### {title}", "", f"`{command}`", "", *body, ""]


def generate() -> str:
    out = [f"<!-- generated by benchmarks/tables.py from {RESULTS.relative_to(ROOT)}/*.json -->",
           "", "## Accuracy against bits", ""]
    for stem, title, cmd in CIFAR:
        out += section(f"{title} (`benchmarks/results/{stem}.json`)", cmd, cifar(load(stem)))
    for stem, title, cmd in IMAGENET:
        out += section(f"{title} (`benchmarks/results/{stem}.json`)", cmd, imagenet(load(stem)))
    out += ["## resnet20_cifar10 ablations at `--target-bits 3.5`", ""]
    for stem, title, cmd in ABLATIONS:
        out += section(f"{title} (`benchmarks/results/{stem}.json`)", cmd, ablation(load(stem)))
    peers = [p for p in sorted(RESULTS.glob("peers_*.json")) if not p.name.endswith(".quick.json")]
    out += ["## Side by side with other tools", ""] if peers else []
    for path in peers:
        d = load(path.stem)
        out += section(f"{d['model']} (`benchmarks/results/{path.name}`)", d["command"],
                       peers_table(d))
    out += ["## Dataset scale", ""]
    out += section("`benchmarks/results/scale.json`", "python benchmarks/scale.py", scale(load("scale")))
    if (RESULTS / "memory.json").is_file():
        out += section("`benchmarks/results/memory.json`", "python benchmarks/memory.py",
                       memory(load("memory")))
    return "\n".join(out).rstrip("\n")


def rewrite(text: str) -> str:
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{DOC}: markers {BEGIN} / {END} not found")
    return f"{head}{BEGIN}\n{generate()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args()
    text = DOC.read_text()
    new = rewrite(text)
    if args.check:
        if new != text:
            print(f"{DOC.relative_to(ROOT)} is out of date: run python benchmarks/tables.py")
            return 1
        return 0
    if new != text:
        DOC.write_text(new)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one training step: float vs onnxbits (learning phase and frozen phase), side by side.

``python benchmarks/train_step.py MODEL --batch-size B [--device cpu|cuda]`` (``--help``: more).
``MODEL`` is an ``.onnx`` path or a name in ``../shared/models``. Every variant trains the same
onnx2torch graph on the same random input batch with Adam:

* ``float``: the float graph with the distillation loss of :func:`onnxbits.train.loop.task_loss`
  against fixed random teacher logits;
* ``learn``: the graph with quantizers (:func:`onnxbits.quant.network.attach_quantizers` +
  :func:`onnxbits.quant.network.calibrate`), ``task + lambda * bit cost`` and the bitlengths clamped after
  the step, exactly as a learning-phase step of :func:`onnxbits.train.loop.fine_tune`;
* ``budget``: ``learn`` followed, as in budget mode (``--target-bits``), by the lambda update and
  the shift of all bitlengths onto the ramp (:class:`onnxbits.train.budget.LambdaController`);
* ``frozen``: the same after :func:`onnxbits.train.loop.freeze_all` (task loss only, no bit params).

Steps of all variants are interleaved (float, learn, frozen, float, ...) so that the noise of a
shared machine hits them alike. Columns: median step time; ``ratio``, the median over rounds of
step time / float step time of the same round; ``r(min)``, the ratio of the fastest steps;
``r(cpu)``, the ratio in process CPU time; images/s of the step; ``ops``, the torch operations
one step dispatches (top-level ``aten::`` calls, counted once with the profiler: on a GPU each is
at least one kernel launch, so a step of small batches is bound by them); bytes autograd saves for
backward; minor page faults per step; time of the first (compiling) steps; on CUDA the peak
allocated memory of a step. The process's peak RSS after all steps is printed once.

Then a whole shrink of ``--shrink-steps`` steps runs in a child process (``onnxbits shrink``:
decoding, teacher, calibration, fine-tune, emit, verify, evaluation), reported with its wall
time, peak RSS and ``images/s = shrink_steps * B / wall seconds`` (data loading included).
``--data`` and ``--shrink-options`` default to the README's CIFAR-10 protocol for CIFAR models.

The process is set up as a shrink is: ``OMP_WAIT_POLICY=PASSIVE`` unless set (before torch
loads), :func:`onnxbits.train.device.configure_cpu` (``--release-memory`` gives freed memory back), and
activation quantizers that absorb the Relu/Relu6 before them (``--no-fuse`` keeps them apart).
``--foreach`` uses ``Adam(foreach=True)``; several ``--kernel`` values add one ``learn``/``frozen``
pair per quantizer kernel. The batch is in the memory format the fine-tune gives it
(:func:`onnxbits.train.device.fast_layout`: channels-last for images on the CPU); ``--compare-layout``
adds ``float``/``learn``/``frozen`` steps on the same batch in contiguous (NCHW) format.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from onnxbits.train.device import prefer_passive_omp_wait

prefer_passive_omp_wait()   # before torch loads, as the CLI does

import torch  # noqa: E402

from onnxbits.graph.io import load_model  # noqa: E402
from onnxbits.graph.normalize import normalize  # noqa: E402
from onnxbits.importer.convert import convert, find_sites  # noqa: E402
from onnxbits.quant import fakequant  # noqa: E402
from onnxbits.quant.cost import bit_cost  # noqa: E402
from onnxbits.quant.network import QuantizedNetwork, attach_quantizers, calibrate, layer_bits  # noqa: E402
from onnxbits.train.budget import LambdaController  # noqa: E402
from onnxbits.train.device import autocast, configure_cpu, fast_layout  # noqa: E402
from onnxbits.train.loop import TrainConfig, freeze_all, task_loss  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_MODELS = SHARED / "models"
# model name prefix -> (data set under ../shared/data, shrink options): the README's protocol
SHRINK_DATA = {"resnet": ("cifar10/test", "--preset cifar10 --include '*/0[0-4]*' "
                                          "--eval-include '*/09*'")}


@dataclass
class Variant:
    """One timed training step and its measurements."""

    name: str
    step: Callable[[], None]
    kernel: str | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    saved_bytes: int = 0
    cuda_peak: int = 0
    ops: int = 0


def resolve_model(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".onnx" and path.exists():
        return path
    candidate = SHARED_MODELS / (name if name.endswith(".onnx") else name + ".onnx")
    if not candidate.exists():
        raise SystemExit(f"{name}: no such .onnx file and not a model in {SHARED_MODELS}")
    return candidate


def input_shape(model, batch: int) -> tuple[int, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in dims)


def make_float_step(graph: torch.nn.Module, x: torch.Tensor, teacher: torch.Tensor,
                    cfg: TrainConfig, device: str, amp: str | None,
                    foreach: bool | None = None) -> Callable[[], None]:
    opt = torch.optim.Adam(graph.parameters(), lr=cfg.lr, foreach=foreach)

    def step() -> None:
        with autocast(device, amp):
            out = graph(x)
        loss = task_loss(out.float(), teacher, None, cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_quant_step(net: QuantizedNetwork, x: torch.Tensor, teacher: torch.Tensor,
                    cfg: TrainConfig, frozen: bool, device: str, amp: str | None,
                    foreach: bool | None = None,
                    controller: LambdaController | None = None) -> Callable[[], None]:
    """One step of :func:`onnxbits.train.loop.fine_tune` in the learning or the frozen phase; with
    ``controller`` also the budget mode's lambda update and shift (at a fixed ramp step)."""
    groups = [{"params": net.kernel_parameters(), "lr": cfg.lr},
              {"params": net.bias_parameters(), "lr": cfg.lr},
              {"params": net.alpha_parameters(), "lr": cfg.alpha_lr}]
    if not frozen:
        groups.append({"params": net.bit_parameters(), "lr": 0.01})
    opt = torch.optim.Adam(groups, foreach=foreach)
    quantizers = net.quantizers()

    def step() -> None:
        with autocast(device, amp):
            out = net(x)
        task = task_loss(out.float(), teacher, None, cfg.loss)
        cost = bit_cost(cfg.objective, layer_bits(net))
        loss = task if frozen else task + cfg.lam * cost
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not frozen:
            for q in quantizers:
                q.clamp_bits()
        if controller is not None:
            controller(0, cfg.lam, 0.0)

    return step


@contextlib.contextmanager
def kernel(name: str | None) -> Iterator[None]:
    previous = fakequant.get_kernel()
    fakequant.set_kernel(name or previous)
    try:
        yield
    finally:
        fakequant.set_kernel(previous)


def saved_tensor_bytes(run: Callable[[], None]) -> int:
    """Bytes of the distinct storages autograd saves for backward during one step."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def dispatched_ops(run: Callable[[], None]) -> int:
    """Top-level ``aten::`` operations of one step (those not called by another aten op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()

    def top_level(event: object) -> bool:
        parent = getattr(event, "cpu_parent", None)
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and top_level(e))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(args: argparse.Namespace) -> tuple[list[Variant], dict]:
    device = args.device
    path = resolve_model(args.model)
    model = normalize(load_model(path), str(path))
    float_graph = convert(model, str(path))
    sites = find_sites(model, float_graph)
    gen = torch.Generator().manual_seed(0)
    shape = input_shape(model, args.batch_size)
    x = torch.randn(shape, generator=gen)
    net = attach_quantizers(model, float_graph, sites, fuse_activations=not args.no_fuse)
    calibrate(net, [x[: min(32, len(x))]])
    fused = sum(q.input_clamp is not None for q in net.acts.values())
    with torch.no_grad():
        n_out = float_graph(x[:1]).shape[-1]
    teacher = torch.randn(args.batch_size, n_out, generator=gen).to(device)
    cfg = TrainConfig()
    contiguous = x.to(device)
    x = fast_layout(contiguous)      # the batches' memory format in the fine-tune
    float_graph.to(device).eval()
    net.graph.to(device).eval()
    variants = [Variant("float", make_float_step(float_graph, x, teacher, cfg, device, args.amp,
                                                 args.foreach))]
    if args.compare_layout:
        variants.append(Variant("float [contiguous]", make_float_step(
            float_graph, contiguous, teacher, cfg, device, args.amp, args.foreach)))
    kernels = args.kernel.split(",") if args.kernel else [None]
    frozen_net = copy.deepcopy(net)
    freeze_all(frozen_net)
    budget_net = copy.deepcopy(net)
    for k in kernels:
        for phase, base in (("learn", net), ("budget", budget_net), ("frozen", frozen_net)):
            trained = base if k == kernels[-1] else copy.deepcopy(base)
            controller = (LambdaController(args.budget, 8.0, 10**6, net=trained)
                          if phase == "budget" else None)
            step = make_quant_step(trained, x, teacher, cfg, phase == "frozen", device, args.amp,
                                   args.foreach, controller)
            variants.append(Variant(phase + (f" [{k}]" if len(kernels) > 1 else ""), step, k))
            if args.compare_layout and phase != "budget":
                step = make_quant_step(copy.deepcopy(trained), contiguous, teacher, cfg,
                                       phase == "frozen", device, args.amp, args.foreach)
                variants.append(Variant(phase + " [contiguous]", step, k))
    layout = "channels_last" if x.dim() == 4 and not x.is_contiguous() else "contiguous"
    info = {"model": path.name, "input_shape": list(shape), "sites": len(sites),
            "input_layout": layout,
            "act_quantizers": len(net.acts), "fused_relu": fused}
    return variants, info


def measure(variants: list[Variant], args: argparse.Namespace) -> None:
    device = args.device
    for v in variants:                      # warm-up (and compilation) outside the timing
        with kernel(v.kernel):
            started = time.perf_counter()
            for _ in range(args.warmup):
                v.step()
            sync(device)
            v.warmup_s = time.perf_counter() - started  # type: ignore[attr-defined]
            v.saved_bytes = saved_tensor_bytes(v.step)
            v.ops = dispatched_ops(v.step)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                v.step()
                sync(device)
                v.cuda_peak = torch.cuda.max_memory_allocated()
    for _ in range(args.steps):
        for v in variants:
            with kernel(v.kernel):
                sync(device)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                started, cpu = time.perf_counter(), time.process_time()
                v.step()
                sync(device)
                v.times.append(time.perf_counter() - started)
                v.cpu_times.append(time.process_time() - cpu)
                v.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def report(variants: list[Variant], info: dict, args: argparse.Namespace) -> dict:
    base = variants[0]
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        paired = statistics.median(t / b for t, b in zip(v.times, base.times))
        cpu = statistics.median(c / b for c, b in zip(v.cpu_times, base.cpu_times))
        rows.append({"variant": v.name, "kernel": v.kernel or fakequant.get_kernel(),
                     "median_s": med, "min_s": min(v.times), "ratio": paired,
                     "ratio_of_min": min(v.times) / min(base.times), "cpu_ratio": cpu,
                     "images_per_s": args.batch_size / med, "saved_mb": v.saved_bytes / 2**20,
                     "cuda_peak_mb": v.cuda_peak / 2**20 if v.cuda_peak else None,
                     "first_steps_s": getattr(v, "warmup_s", None), "ops": v.ops,
                     "times_s": v.times,
                     "cpu_times_s": v.cpu_times,
                     "page_faults": statistics.median(v.faults)})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else platform.processor() or platform.machine())
    result = {**info, "batch_size": args.batch_size, "device": args.device,
              "device_name": device_name, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "input_layout": info["input_layout"], "amp": args.amp, "steps": args.steps,
              "torch": torch.__version__, "peak_rss_mb": rss, "rows": rows}
    print(f"{info['model']}  batch {args.batch_size}  {args.device} ({device_name}), "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={result['omp_wait_policy']}, "
          f"keep freed memory={info['cpu_settings']['keep_freed_memory']}, "
          f"input {info['input_layout']}, amp={args.amp}, fused relu={info['fused_relu']}, "
          f"{args.steps} steps")
    print(f"{'variant':<20}{'median s':>9}{'min s':>8}{'ratio':>7}{'r(min)':>7}{'r(cpu)':>7}"
          f"{'img/s':>8}{'saved MB':>9}{'faults':>8}{'first s':>8}{'ops':>7}"
          + ("  cuda peak MB" if args.device == "cuda" else ""))
    for r in rows:
        line = (f"{r['variant']:<20}{r['median_s']:>9.4f}{r['min_s']:>8.4f}{r['ratio']:>7.2f}"
                f"{r['ratio_of_min']:>7.2f}{r['cpu_ratio']:>7.2f}{r['images_per_s']:>8.1f}"
                f"{r['saved_mb']:>9.1f}{r['page_faults']:>8.0f}{r['first_steps_s']:>8.2f}"
                f"{r['ops']:>7}")
        if r["cuda_peak_mb"] is not None:
            line += f"{r['cuda_peak_mb']:>14.1f}"
        print(line)
    print("ratio: median of step / float step per round; r(min): of the fastest steps; r(cpu): "
          f"in CPU time; faults: minor page faults per step; ops: torch operations per step; "
          f"peak RSS {rss:.0f} MB")
    return result


def run_shrink(args: argparse.Namespace, path: Path) -> dict | None:
    """A whole ``onnxbits shrink`` of ``--shrink-steps`` steps in a child process: wall time,
    peak RSS of the child and ``images_per_s = shrink_steps * batch_size / wall_s``."""
    default = next((v for k, v in SHRINK_DATA.items() if path.stem.startswith(k)), None)
    data = args.data or (SHARED / "data" / default[0] if default else None)
    options = args.shrink_options or (default[1] if default and args.data is None else "")
    if args.shrink_steps <= 0 or data is None or not data.exists():
        print("whole shrink: skipped (--shrink-steps 0, or no --data for this model)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "onnxbits.cli.main", "shrink", str(path), "--data", str(data),
               "--steps", str(args.shrink_steps), "--batch-size", str(args.batch_size),
               "--device", args.device, "-o", str(Path(tmp) / "out.onnx"), "--json", "-q",
               *(["--threads", str(args.threads)] if args.threads else []), *shlex.split(options)]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
    images = args.shrink_steps * args.batch_size
    result = {"command": shlex.join(cmd), "returncode": done.returncode, "wall_s": wall,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
              "images": images, "images_per_s": images / wall}
    if done.returncode != 0:
        print(f"whole shrink failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return result
    shrink = json.loads(done.stdout)
    result.update(n_train=shrink["data"].get("n_train"), n_eval=shrink["data"].get("n_eval"),
                  pipeline_s=shrink.get("seconds"), runtime=shrink.get("runtime"))
    print(f"whole shrink, {args.shrink_steps} steps of {args.batch_size} ({result['n_train']} + "
          f"{result['n_eval']} images decoded): {wall:.1f} s ({result['pipeline_s']} s after "
          f"start-up), {images / wall:.1f} images/s, peak RSS {result['peak_rss_mb']:.0f} MB")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget", type=float, default=4.0,
                        help="average-bits budget of the 'budget' variant's shift")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compare-layout", action="store_true",
                        help="add float/learn/frozen steps on the batch in contiguous (NCHW) "
                             "memory format, timed in the same rounds")
    parser.add_argument("--no-fuse", action="store_true",
                        help="keep each Relu/Relu6 apart from the activation quantizer after it")
    parser.add_argument("--foreach", action="store_true", default=None,
                        help="Adam(foreach=True) for every variant (train.py uses the default)")
    parser.add_argument("--release-memory", action="store_true",
                        help="leave glibc's default of returning freed memory to the OS")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--kernel", default=None,
                        help="quantizer kernel(s), comma-separated: auto, compiled, eager")
    parser.add_argument("--data", type=Path, default=None,
                        help="images for the whole shrink (default: cifar10/test for CIFAR)")
    parser.add_argument("--shrink-steps", type=int, default=30,
                        help="steps of the whole shrink (0: skip it)")
    parser.add_argument("--shrink-options", default=None,
                        help="extra 'onnxbits shrink' options, e.g. \"--preset cifar10\"")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    cpu = configure_cpu(args.threads, keep_memory=not args.release_memory)
    torch.manual_seed(0)
    variants, info = build(args)
    measure(variants, args)
    result = report(variants, {**info, "cpu_settings": cpu}, args)
    result["shrink"] = run_shrink(args, resolve_model(args.model))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one training step: float vs onnxbits (learning phase and frozen phase), side by side.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py resnet20_cifar10 --batch-size 128
        [--device cpu|cuda] [--steps 10] [--warmup 2] [--threads N] [--channels-last]
        [--amp bf16|fp16] [--fuse-relu] [--foreach] [--release-memory]
        [--kernel auto|compiled|eager[,...]] [--json OUT.json]

``MODEL`` is an ``.onnx`` path or a name in ``../shared/models``. Every variant trains the same
onnx2torch graph on the same random input batch (the model's input shape) with Adam:

* ``float``: the float graph, ``forward + backward + step`` with the distillation loss of
  :func:`onnxbits.train.task_loss` against fixed random teacher logits;
* ``learn``: the graph with quantizers (:func:`onnxbits.insert.attach_quantizers` +
  :func:`onnxbits.insert.calibrate`), ``task + lambda * bit cost`` and the bitlengths clamped after
  the step, exactly as a learning-phase step of :func:`onnxbits.train.fine_tune`;
* ``frozen``: the same after :func:`onnxbits.train.freeze_all` (task loss only, no bit params).

Steps of all variants are interleaved (float, learn, frozen, float, ...) so that the noise of a
shared machine hits them alike. The table shows the median step time; ``ratio``, the median over
rounds of step time / float step time of the same round; ``r(min)``, the ratio of the fastest
steps; ``r(cpu)``, the ratio in process CPU time (robust when other jobs share the cores);
images/s of the step; the bytes autograd saves for backward; minor page faults per step and the
time of the first (compiling) steps. On CUDA the peak allocated memory of a step is added; the
process's peak RSS is printed once. Images/s of a whole shrink (decoding, teacher, emit, verify)
is measured by the shrink itself, not here.

The process is set up as :func:`onnxbits.device.configure_cpu` does for a shrink (threads,
denormals flushed, freed memory kept: ``--release-memory`` turns that off). ``OMP_WAIT_POLICY``
must be set in the environment (it is read when torch loads). ``--fuse-relu`` lets activation
quantizers absorb the Relu/Relu6 before them (:func:`fuse_activation_producers`, a proposal for
:mod:`onnxbits.insert`); ``--foreach`` uses ``Adam(foreach=True)``; several ``--kernel`` values
add one ``learn``/``frozen`` pair per quantizer kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from onnxbits.cost import bit_cost
from onnxbits.device import autocast, configure_cpu
from onnxbits.importer import convert, find_sites
from onnxbits.insert import QuantizedNetwork, attach_quantizers, calibrate, layer_bits
from onnxbits.io import load_model
from onnxbits.normalize import normalize
from onnxbits.quant import fakequant
from onnxbits.train import TrainConfig, freeze_all, task_loss

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"


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
        loss = task_loss(out.float(), teacher, None, cfg.loss, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_quant_step(net: QuantizedNetwork, x: torch.Tensor, teacher: torch.Tensor,
                    cfg: TrainConfig, frozen: bool, device: str, amp: str | None,
                    foreach: bool | None = None) -> Callable[[], None]:
    """One step of :func:`onnxbits.train.fine_tune` in the learning or the frozen phase."""
    groups = [{"params": net.weight_parameters(), "lr": cfg.lr},
              {"params": net.alpha_parameters(), "lr": cfg.alpha_lr}]
    if not frozen:
        groups.append({"params": net.bit_parameters(), "lr": 0.01})
    opt = torch.optim.Adam(groups, foreach=foreach)
    quantizers = net.quantizers()

    def step() -> None:
        with autocast(device, amp):
            out = net(x)
        task = task_loss(out.float(), teacher, None, cfg.loss, cfg.temperature)
        cost = bit_cost(cfg.objective, layer_bits(net))
        loss = task if frozen else task + cfg.lam * cost
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not frozen:
            for q in quantizers:
                q.clamp_bits()

    return step


def fuse_activation_producers(net: QuantizedNetwork) -> int:
    """Let every activation quantizer absorb the Relu/Relu6 that feeds only it (a proposal for
    :mod:`onnxbits.insert`): ``relu -> q`` becomes ``q`` with ``q.input_clamp`` set, so that the
    Relu output is never stored (``BitQuantizer.input_clamp``). Returns the number fused."""
    modules = dict(net.graph.named_modules())
    fused = 0
    for node in list(net.graph.graph.nodes):
        q = modules.get(node.target) if node.op == "call_module" else None
        if q is None or q not in net.acts.values() or q.input_clamp is not None:
            continue
        producer = node.args[0]
        act = modules.get(producer.target) if producer.op == "call_module" else None
        clamp = {torch.nn.ReLU: (0.0, None), torch.nn.ReLU6: (0.0, 6.0)}.get(type(act))
        if clamp is None or len(producer.users) != 1:
            continue
        q.input_clamp = clamp
        node.args = (producer.args[0], *node.args[1:])
        net.graph.graph.erase_node(producer)
        fused += 1
    net.graph.graph.lint()
    net.graph.recompile()
    return fused


@contextlib.contextmanager
def kernel(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    previous = fakequant.get_kernel()
    fakequant.set_kernel(name)
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
    net = attach_quantizers(model, float_graph, sites)
    calibrate(net, [x[: min(32, len(x))]])
    fused = fuse_activation_producers(net) if args.fuse_relu else 0
    with torch.no_grad():
        n_out = float_graph(x[:1]).shape[-1]
    teacher = torch.randn(args.batch_size, n_out, generator=gen).to(device)
    cfg = TrainConfig()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.to(device)
    if args.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    float_graph.to(device).eval()
    net.graph.to(device).eval()
    if args.channels_last:
        float_graph.to(memory_format=memory_format)
        net.graph.to(memory_format=memory_format)
    variants = [Variant("float", make_float_step(float_graph, x, teacher, cfg, device, args.amp,
                                                       args.foreach))]
    kernels = args.kernel.split(",") if args.kernel else [None]
    frozen_net = copy.deepcopy(net)
    freeze_all(frozen_net)
    for k in kernels:
        suffix = f" [{k}]" if len(kernels) > 1 else ""
        learn_net = net if k == kernels[-1] else copy.deepcopy(net)
        variants.append(Variant("learn" + suffix,
                                make_quant_step(learn_net, x, teacher, cfg, False, device,
                                                args.amp, args.foreach), k))
        fnet = frozen_net if k == kernels[-1] else copy.deepcopy(frozen_net)
        variants.append(Variant("frozen" + suffix,
                                make_quant_step(fnet, x, teacher, cfg, True, device, args.amp,
                                                args.foreach), k))
    info = {"model": path.name, "input_shape": list(shape), "sites": len(sites),
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
        kernel_name = v.kernel or getattr(fakequant, "get_kernel", lambda: "original")()
        rows.append({"variant": v.name, "kernel": kernel_name,
                     "median_s": med, "min_s": min(v.times), "ratio": paired,
                     "ratio_of_min": min(v.times) / min(base.times), "cpu_ratio": cpu,
                     "images_per_s": args.batch_size / med, "saved_mb": v.saved_bytes / 2**20,
                     "cuda_peak_mb": v.cuda_peak / 2**20 if v.cuda_peak else None,
                     "first_steps_s": getattr(v, "warmup_s", None), "times_s": v.times,
                     "cpu_times_s": v.cpu_times,
                     "page_faults": statistics.median(v.faults)})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else platform.processor() or platform.machine())
    result = {**info, "batch_size": args.batch_size, "device": args.device,
              "device_name": device_name, "threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "channels_last": args.channels_last, "amp": args.amp, "steps": args.steps,
              "torch": torch.__version__, "peak_rss_mb": rss, "rows": rows}
    print(f"{info['model']}  batch {args.batch_size}  {args.device} ({device_name}), "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={result['omp_wait_policy']}, "
          f"keep freed memory={info['cpu_settings']['keep_freed_memory']}, "
          f"channels_last={args.channels_last}, amp={args.amp}, fused relu={info['fused_relu']}, "
          f"{args.steps} steps")
    print(f"{'variant':<20}{'median s':>9}{'min s':>8}{'ratio':>7}{'r(min)':>7}{'r(cpu)':>7}"
          f"{'img/s':>8}{'saved MB':>9}{'first s':>8}"
          + ("  cuda peak MB" if args.device == "cuda" else ""))
    for r in rows:
        line = (f"{r['variant']:<20}{r['median_s']:>9.4f}{r['min_s']:>8.4f}{r['ratio']:>7.2f}"
                f"{r['ratio_of_min']:>7.2f}{r['cpu_ratio']:>7.2f}{r['images_per_s']:>8.1f}"
                f"{r['saved_mb']:>9.1f}{r['page_faults']:>8.0f}{r['first_steps_s']:>8.2f}")
        if r["cuda_peak_mb"] is not None:
            line += f"{r['cuda_peak_mb']:>14.1f}"
        print(line)
    print("ratio: median over rounds of (step / float step of the same round); r(min): ratio of "
          "the fastest steps; r(cpu): the same with process CPU time; faults: minor page faults "
          "per step (fresh memory from the OS)")
    print(f"peak RSS of the process: {rss:.0f} MB")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fuse-relu", action="store_true",
                        help="activation quantizers absorb the Relu/Relu6 before them")
    parser.add_argument("--foreach", action="store_true", default=None,
                        help="Adam(foreach=True) for every variant (train.py uses the default)")
    parser.add_argument("--release-memory", action="store_true",
                        help="leave glibc's default of returning freed memory to the OS")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--kernel", default=None,
                        help="quantizer kernel(s), comma-separated: auto, compiled, eager")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    cpu = configure_cpu(args.threads, keep_memory=not args.release_memory)
    torch.manual_seed(0)
    variants, info = build(args)
    measure(variants, args)
    result = report(variants, {**info, "cpu_settings": cpu}, args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

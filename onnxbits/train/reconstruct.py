"""Block-wise reconstruction at frozen bits (BRECQ-style): each block of the quantized network
learns to reproduce the float network's output of that block.

Blocks come from *cuts*: graph nodes after which the node's own value is the only tensor still
alive (constants aside), found in the quantized and the float graph alike (same node names). The
sub-graph between two cuts maps one tensor to one tensor; consecutive sub-graphs are merged until
each holds at least ``min_layers`` quantized layers (residual blocks stay whole: their skip input
is alive inside them, so no cut falls there).

Block ``b`` in turn, over the ``N`` fine-tune images (at most ``max_images``; ``x_0`` = those
inputs):
``y_b = F_b(y_{b-1})`` (float block on the float path), then ``K`` Adam steps on
``L_b = mean((Q_b(x_{b-1}) - y_b)^2)`` over random batches, where ``x_{b-1}`` is the quantized
network's own input to the block (the earlier blocks already reconstructed), the weights, biases
and clip values of the block's quantizers being trained with a cosine-decaying learning rate;
then ``x_b = Q_b(x_{b-1})``. A block whose loss over the ``N`` images ends above its starting
loss gets its parameters back. Bits stay as frozen. No I/O,
no printing.

Memory: the stored tensors peak at ``x_0`` plus, for one block, its quantized and float inputs
and its targets and quantized outputs, ``N (|x_0| + max_b (2 |x_{b-1}| + 2 |y_b|))`` values
(:func:`bytes_per_input`). With a ``memory`` limit, the inputs are a seeded subset of the ``N``
when all of them would need more (the results say how many were used).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, fx, nn

from onnxbits.quant.network import QuantizedNetwork, QuantWeightLayer, first_output
from onnxbits.quant.quantizer import BitQuantizer
from onnxbits.train.device import empty_rows, fast_layout

__all__ = ["Block", "BlockResult", "ReconstructConfig", "bytes_per_input", "find_cuts",
           "reconstruct", "split_blocks"]


@dataclass(frozen=True)
class ReconstructConfig:
    """Steps per block, batch, learning rates (Adam: weights and biases, log clip values), the
    least quantized layers per block, the most images (a seeded subset of the fine-tune images
    beyond that) and the seed of the batches."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    alpha_lr: float = 1e-3
    min_layers: int = 3
    max_images: int = 1024
    seed: int = 0


@dataclass
class BlockResult:
    """One reconstructed block: its layers, the block loss before and after, and wall seconds."""

    block: int
    layers: list[str]
    loss_before: float
    loss_after: float
    seconds: float
    inputs: int = 0          # reconstruction inputs used
    wanted: int = 0          # inputs there were before a memory limit

    def to_dict(self) -> dict[str, object]:
        """The result as a plain dict (JSON report)."""
        return asdict(self)


@dataclass
class Block:
    """A quantized sub-graph, its float twin and the site nodes (layers) it holds."""

    quantized: fx.GraphModule
    float: fx.GraphModule
    layers: list[str]


def find_cuts(graph: fx.Graph) -> list[str]:
    """Names of the nodes, in graph order, after which that node's value is the only live
    tensor (``get_attr`` constants do not count; the output node is not a cut)."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    open_values: set[fx.Node] = set()       # graph inputs included: no cut while one is alive
    cuts = []
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op != "get_attr" and last_use[node] > i:
            open_values.add(node)
        open_values = {n for n in open_values if last_use[n] > i}
        if node.op != "placeholder" and open_values == {node}:
            cuts.append(node.name)
    return cuts


def _segment(root: nn.Module, graph: fx.Graph, start: str | None,
             end: str | None) -> fx.GraphModule:
    """The sub-graph computing node ``end`` (the graph's output if None) from node ``start``
    (the graph's inputs if None); ``start`` becomes the one placeholder."""
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(graph.nodes)
    names = [n.name for n in nodes]
    first = 0 if start is None else names.index(start) + 1
    if start is not None:
        env[nodes[first - 1]] = sub.placeholder("x")

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:           # a constant read before the segment: copy it in
            if n.op != "get_attr":
                raise ValueError(f"node {n.name} crosses the cut at {start}")
            env[n] = sub.node_copy(n, lookup)
        return env[n]

    for node in nodes[first:]:
        if node.op == "output":
            sub.output(fx.map_arg(node.args[0], lookup))
            break
        env[node] = sub.node_copy(node, lookup)
        if node.name == end:
            sub.output(env[node])
            break
    return fx.GraphModule(root, sub)


def split_blocks(net: QuantizedNetwork, float_graph: fx.GraphModule,
                 min_layers: int = 3) -> list[Block]:
    """Cut both graphs at the cuts they share and merge the pieces into blocks of at least
    ``min_layers`` quantized layers (the last block takes any remainder)."""
    cuts = set(find_cuts(net.graph.graph)) & set(find_cuts(float_graph.graph))
    modules = dict(net.graph.named_modules())
    layer_of = {id(layer): node for node, layer in net.layers.items()}
    pieces: list[tuple[str | None, list[str]]] = []     # (end cut, layers in the piece)
    current: list[str] = []
    for node in net.graph.graph.nodes:
        layer = id(modules[str(node.target)]) if node.op == "call_module" else None
        if layer in layer_of:
            current.append(layer_of[layer])
        if node.name in cuts:
            pieces.append((node.name, current))
            current = []
    pieces.append((None, current))
    groups: list[tuple[str | None, list[str]]] = []
    layers: list[str] = []
    for end, piece_layers in pieces:
        layers = layers + piece_layers
        if len(layers) >= min_layers or end is None:
            groups.append((end, layers))
            layers = []
    if len(groups) > 1 and len(groups[-1][1]) < min_layers:
        end, tail = groups.pop()
        groups[-1] = (end, groups[-1][1] + tail)
    blocks, start = [], None
    for end, block_layers in groups:
        blocks.append(Block(_segment(net.graph, net.graph.graph, start, end),
                            _segment(float_graph, float_graph.graph, start, end), block_layers))
        start = end
    return blocks


def _block_parameters(block: Block, net: QuantizedNetwork, cfg: ReconstructConfig
                      ) -> list[dict[str, object]]:
    """Adam groups: the block's weights and biases, and clip values."""
    kernels, biases, alphas = [], [], []
    for module in block.quantized.modules():
        if isinstance(module, QuantWeightLayer):
            kernels.append(module.float_weight())
            alphas.append(module.wq.log_alpha)
            if module.bias() is not None:
                biases.append(module.bias())
        elif isinstance(module, BitQuantizer) and module in net.acts.values():
            alphas.append(module.log_alpha)
    groups = [{"params": kernels + biases, "lr": cfg.lr}, {"params": alphas, "lr": cfg.alpha_lr}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def _run_all(module: nn.Module, inputs: Tensor, batch: int) -> Tensor:
    """``module`` over ``inputs`` in chunks of ``batch`` rows, first output, written into one
    tensor (no second copy of the chunks)."""
    out: Tensor | None = None
    for s in range(0, len(inputs), batch):
        chunk = first_output(module(inputs[s:s + batch]))
        if out is None:
            out = empty_rows(chunk, len(inputs))
        out[s:s + len(chunk)] = chunk
    assert out is not None, "no inputs"
    return out


@torch.no_grad()
def _mean_squared_error(output: Callable[[slice], Tensor], targets: Tensor, batch: int) -> float:
    """``mean((o - t)^2)`` over all elements of ``targets``, ``o`` given chunk by chunk of
    ``batch`` rows by ``output(rows)`` (summed in float64: no whole-size temporary)."""
    total = 0.0
    for s in range(0, len(targets), batch):
        rows = slice(s, s + batch)
        total += float(((output(rows) - targets[rows]) ** 2).sum(dtype=torch.float64))
    return total / targets.numel()


def _train_block(block: Block, groups: list[dict[str, object]], inputs: Tensor, targets: Tensor,
                 cfg: ReconstructConfig, generator: torch.Generator) -> None:
    """``cfg.steps`` Adam steps on the block loss over random batches (module docstring)."""
    if not groups or cfg.steps == 0:
        return
    opt = torch.optim.Adam(groups)
    base = [float(g["lr"]) for g in opt.param_groups]
    batch = min(cfg.batch_size, len(inputs))
    for step in range(cfg.steps):
        for group, lr in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        idx = torch.randperm(len(inputs), generator=generator)[:batch]
        out = first_output(block.quantized(inputs[idx]))
        loss = ((out - targets[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def bytes_per_input(blocks: list[Block], sample: Tensor) -> int:
    """Bytes the stored tensors take per reconstruction input at their peak (module docstring),
    measured by running ``sample`` (one input, batch of 1) through the float blocks."""
    x = sample
    peak = 0
    for block in blocks:
        y = first_output(block.float(x))
        peak = max(peak, 2 * x.numel() * x.element_size() + 2 * y.numel() * y.element_size())
        x = y
    return sample.numel() * sample.element_size() + peak


def reconstruct(net: QuantizedNetwork, float_graph: fx.GraphModule, images: Tensor,
                cfg: ReconstructConfig,
                on_block: Callable[[BlockResult], None] | None = None,
                memory: int | None = None) -> list[BlockResult]:
    """Reconstruct every block in order (module docstring) on ``images`` (``N`` inputs, on the
    network's device); returns one :class:`BlockResult` per block. With ``memory`` (bytes), a seeded subset of the images (kept in order) when the
    tensors of all of them would take more; pass ``images`` without keeping a reference, so that
    the rest is freed."""
    blocks = split_blocks(net, float_graph, cfg.min_layers)
    wanted = len(images)
    if memory is not None:
        fit = memory // bytes_per_input(blocks, images[:1])
        if fit < len(images):
            keep = np.random.default_rng(cfg.seed).choice(len(images), max(int(fit), 1),
                                                          replace=False)
            images = images[torch.from_numpy(np.sort(keep)).to(images.device)]
    return _reconstruct_blocks(net, blocks, fast_layout(images), cfg, on_block, wanted)


def _reconstruct_blocks(net: QuantizedNetwork, blocks: list[Block], images: Tensor,
                        cfg: ReconstructConfig,
                        on_block: Callable[[BlockResult], None] | None,
                        wanted: int) -> list[BlockResult]:
    generator = torch.Generator().manual_seed(cfg.seed)
    quant_in, float_in = images, images
    results = []
    for b, block in enumerate(blocks):
        started = time.perf_counter()
        targets = _run_all(block.float, float_in, cfg.batch_size)
        float_in = targets       # the previous float inputs are freed: peak memory is one
                                 # block's quantized inputs, targets and quantized outputs
        before = _mean_squared_error(lambda rows: first_output(block.quantized(quant_in[rows])),
                                     targets, cfg.batch_size)
        groups = _block_parameters(block, net, cfg)
        params = [p for g in groups for p in g["params"]]
        saved = [p.detach().clone() for p in params]
        _train_block(block, groups, quant_in, targets, cfg, generator)
        quant_out = _run_all(block.quantized, quant_in, cfg.batch_size)
        after = _mean_squared_error(quant_out.__getitem__, targets, cfg.batch_size)
        if not after <= before:            # never leave a block worse than it came
            with torch.no_grad():
                for p, value in zip(params, saved, strict=True):
                    p.copy_(value)
            del quant_out
            quant_out = _run_all(block.quantized, quant_in, cfg.batch_size)
            after = before
        result = BlockResult(b, block.layers, before, after, time.perf_counter() - started,
                             len(quant_in), wanted)
        results.append(result)
        if on_block is not None:
            on_block(result)
        quant_in = quant_out
    return results


def gather_images(fetch: Callable[[np.ndarray], tuple[Tensor, object]], n: int,
                  cfg: ReconstructConfig, device: torch.device) -> Tensor:
    """The ``n`` fine-tune inputs in order, or ``cfg.max_images`` of them drawn without
    replacement with ``cfg.seed`` (kept in order), on ``device`` (image batches on the CPU in
    channels-last memory format, :func:`onnxbits.train.device.fast_layout`)."""
    idx = np.arange(n)
    if n > cfg.max_images:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.max_images, replace=False))
    chunks: Iterable[Tensor] = (fetch(idx[s:s + cfg.batch_size])[0]
                                for s in range(0, len(idx), cfg.batch_size))
    gathered = []
    for c in chunks:
        if isinstance(c, tuple):
            raise ValueError("block reconstruction needs a single-input model")
        gathered.append(fast_layout(c.to(device)))
    return torch.cat(gathered)

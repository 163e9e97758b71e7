"""Data parallel over processes (gloo on the CPU): N processes at global batch B follow one process
at batch B; sharding, gradient averaging and broadcasting on their own."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.multiprocessing as mp

from onnxbits.config import ShrinkConfig
from onnxbits.data.preprocess import Preprocess
from onnxbits.quant import fakequant
from onnxbits.quant.cost import bit_cost
from onnxbits.quant.network import layer_bits
from onnxbits.train.budget import LambdaController, freeze_to_budget
from onnxbits.train.distributed import (
    DistContext,
    average_gradients,
    broadcast_,
    close,
    init_from_env,
    shard,
)
from onnxbits.train.loop import TrainConfig, fine_tune
from tests.builders import conv_relu_gemm
from tests.test_cli_shrink import image_folder
from tests.test_train import setup

WORLD = 2
# (global batch, steps, reconstruction steps): 16 splits 8 + 8; 15 splits 8 + 7 (the shards are
# weighted 8/15, 7/15); block reconstruction runs in every process on all images
RUNS = ((16, 16, 0), (15, 12, 0), (16, 8, 3))
TARGET_BITS = 5.0


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Eager quantizer kernels here and in the spawned processes (no compilation per process)."""
    monkeypatch.setenv("ONNXBITS_KERNEL", "eager")
    before = fakequant.get_kernel()
    fakequant.set_kernel("eager")
    yield
    fakequant.set_kernel(before)
    torch.set_flush_denormal(False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_group(rank: int, world: int, port: int) -> DistContext:
    """What torchrun sets for each process, then :func:`init_from_env`."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return init_from_env("cpu")


def budget_fine_tune(batch: int, steps: int, reconstruct: int,
                     dist: DistContext | None) -> dict[str, Any]:
    """Budget-mode fine-tune of the tiny Conv-Relu-Gemm model; the learned and frozen bits."""
    s = setup(min_bits=2, max_bits=8)
    cfg = TrainConfig(steps=steps, frozen_steps=steps // 4, batch_size=batch, lam=0.5,
                      reconstruct_steps=reconstruct)
    start = float(bit_cost("bits", layer_bits(s.net)).detach())
    controller = LambdaController(TARGET_BITS, start, cfg.learn_steps())
    history = fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x), cfg,
                        lam_schedule=controller,
                        freeze=lambda net: freeze_to_budget(net, "bits", TARGET_BITS), dist=dist,
                        float_graph=s.graph)
    return {"bits": [q.bits.detach().clone() for q in s.net.quantizers()],
            "frozen": [q.frozen_bits.clone() for q in s.net.quantizers()],
            "weights": [p.detach().clone()
                        for p in [*s.net.kernel_parameters(), *s.net.bias_parameters()]],
            "history": [r.to_dict() for r in history]}


def _fine_tune_worker(rank: int, world: int, port: int, folder: str) -> None:
    ctx = join_group(rank, world, port)
    try:
        results = [budget_fine_tune(*run, ctx) for run in RUNS]
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        close(ctx)


def test_two_processes_learn_the_bits_of_one_process(tmp_path: Path) -> None:
    mp.spawn(_fine_tune_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for run, two, other in zip(RUNS, ranks[0], ranks[1], strict=True):
        one = budget_fine_tune(*run, None)
        # every process ends with the same network, bit for bit
        for key in ("bits", "frozen", "weights"):
            assert all(torch.equal(a, b) for a, b in zip(two[key], other[key], strict=True)), key
        frozen_one = [f.tolist() for f in one["frozen"]]
        assert [f.tolist() for f in two["frozen"]] == frozen_one
        assert min(min(f) for f in frozen_one) < 8          # the bits did move
        learned = torch.cat(one["bits"])
        assert float((learned - 8).abs().max()) > 0.5
        assert torch.allclose(torch.cat(two["bits"]), learned, atol=1e-4, rtol=0)
        for a, b in zip(two["history"], one["history"], strict=True):
            assert a["phase"] == b["phase"]
            for key in ("task", "loss", "cost", "avg_bits", "lam"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_shard_is_contiguous_and_covers_the_batch() -> None:
    batch = np.array([9, 4, 7, 1, 3, 8, 2])
    parts = [shard(batch, r, 3) for r in range(3)]
    assert [p.tolist() for p in parts] == [[9, 4, 7], [1, 3], [8, 2]]
    assert np.concatenate(parts).tolist() == batch.tolist()


def test_a_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_from_env("cpu")
    assert (ctx.rank, ctx.world, ctx.active, ctx.is_main, ctx.backend) == (0, 1, False, True, None)
    assert not torch.distributed.is_initialized()


def test_torchrun_environment_without_rank_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxbits.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 but RANK is not set"):
        init_from_env("cpu")


def _collectives_worker(rank: int, world: int, port: int, folder: str) -> None:
    ctx = join_group(rank, world, port)
    try:
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))              # rank 0: 1, rank 1: 2
        loss = average_gradients([p], weight=(rank + 1) / 3, extra=torch.tensor(float(rank)))
        buffer = torch.full((2,), float(rank + 10))
        ints = torch.full((2,), rank + 20, dtype=torch.int64)
        broadcast_([buffer, ints])
        torch.save({"grad": p.grad, "loss": loss, "buffer": buffer, "ints": ints},
                   Path(folder) / f"rank{rank}.pt")
    finally:
        close(ctx)


def test_average_gradients_weights_the_shards_and_broadcast_copies_rank_0(tmp_path: Path) -> None:
    mp.spawn(_collectives_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        # sum_r w_r g_r = 1/3 * 1 + 2/3 * 2; extra: 1/3 * 0 + 2/3 * 1
        assert torch.allclose(got["grad"], torch.full((3,), 1 / 3 + 4 / 3))
        assert float(got["loss"]) == pytest.approx(2 / 3)
        assert got["buffer"].tolist() == [10.0, 10.0]
        assert got["ints"].tolist() == [20, 20]


# --- the whole shrink under torchrun's environment ---------------------------------------------


def shrink_config(root: Path, output: str) -> ShrinkConfig:
    return ShrinkConfig(data=root / "data", preprocess=Preprocess(), output=root / output,
                        steps=10, batch_size=8, lam=1.0, threads=1, checkpoint_every=4)


def _shrink_worker(rank: int, world: int, port: int, folder: str) -> None:
    from onnxbits.pipeline.run import shrink

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    root = Path(folder)
    result = shrink(root / "model.onnx", shrink_config(root, "two.bits.onnx"))
    (root / f"rank{rank}.json").write_text(json.dumps(
        {"main": result.main, "report": result.report,
         "history": [r.to_dict() for r in result.history]}))


def test_shrink_on_two_processes_matches_one_and_only_rank_0_writes(tmp_path: Path) -> None:
    from onnxbits.pipeline.run import shrink

    onnx.save(conv_relu_gemm(classes=3), tmp_path / "model.onnx")
    image_folder(tmp_path / "data")
    mp.spawn(_shrink_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD)
    main, worker = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert main["main"] and not worker["main"] and worker["report"] == {}
    written = sorted(p.name for p in tmp_path.glob("two.*"))
    assert written == ["two.bits.history.csv", "two.bits.history.json", "two.bits.history.png",
                       "two.bits.json", "two.bits.onnx", "two.bits.png"]   # no checkpoint left
    one = shrink(tmp_path / "model.onnx", shrink_config(tmp_path, "one.bits.onnx"))
    two = main["report"]
    assert two["runtime"]["world_size"] == 2 and two["runtime"]["backend"] == "gloo"
    assert one.report["runtime"]["world_size"] == 1 and one.report["runtime"]["backend"] is None
    bits = [(layer["name"], layer["weight_bits"], layer["act_bits"]) for layer in two["layers"]]
    assert bits == [(layer["name"], layer["weight_bits"], layer["act_bits"])
                    for layer in one.report["layers"]]
    assert min(b for _, w, a in bits for b in (w, a) if b is not None) < 8
    for a, b in zip(main["history"], one.history, strict=True):
        assert a["avg_bits"] == pytest.approx(b.avg_bits, abs=1e-4)
        assert a["task"] == pytest.approx(b.task, rel=1e-4, abs=1e-5)
    assert worker["history"] == main["history"]

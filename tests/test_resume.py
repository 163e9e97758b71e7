"""Checkpointed fine-tunes: interrupt, resume, and land on the uninterrupted result bit for bit;
the same seed gives byte-identical output models, also across processes and through the CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from onnxbits.emit.targets import emit
from onnxbits.errors import ConfigError
from onnxbits.graph.normalize import normalize
from onnxbits.importer.convert import convert, find_sites
from onnxbits.quant.network import QuantizedNetwork, attach_quantizers, calibrate
from onnxbits.train.checkpoint import CheckpointSpec
from onnxbits.train.history import StepRecord
from onnxbits.train.loop import TrainConfig, fine_tune, freeze_all
from tests.builders import conv_relu_gemm
from tests.conftest import random_input

CFG = TrainConfig(steps=12, frozen_steps=4, batch_size=8, lam=0.5, seed=3)   # learn = steps 0-7
SOURCE = {"model": "tiny.onnx"}


@dataclass
class Run:
    """A freshly imported and calibrated tiny model with its data."""

    model: onnx.ModelProto
    net: QuantizedNetwork
    x: torch.Tensor
    teacher: torch.Tensor
    graph: torch.nn.Module

    def fine_tune(self, cfg: TrainConfig = CFG, **kwargs: object) -> list[StepRecord]:
        """Run :func:`fine_tune` on this model's data."""
        return fine_tune(self.net, lambda idx: (self.x[idx], None), self.teacher, len(self.x),
                         cfg, **kwargs)  # type: ignore[arg-type]

    def emitted(self) -> bytes:
        """The emitted ``ort`` model, serialized."""
        return emit(self.model, self.net, "ort", source=SOURCE).SerializeToString()

    def bits(self) -> list[list[float]]:
        """Every quantizer's frozen bits."""
        return [q.frozen_bits.tolist() for q in self.net.quantizers()]


def fresh() -> Run:
    torch.manual_seed(0)
    model = normalize(conv_relu_gemm(classes=5))
    graph = convert(model)
    net = attach_quantizers(model, graph, find_sites(model, graph), min_bits=2, max_bits=8)
    x = random_input(model, 48)
    with torch.no_grad():
        teacher = graph(x)
    calibrate(net, [x[:24], x[24:]])
    return Run(model, net, x, teacher, graph)


@pytest.fixture(scope="module")
def reference() -> tuple[list[list[float]], dict[str, torch.Tensor], list[StepRecord], bytes]:
    """The uninterrupted run, without any checkpoint."""
    run = fresh()
    history = run.fine_tune()
    return run.bits(), run.net.graph.state_dict(), history, run.emitted()


def interrupt_at(step: int) -> object:
    def on_step(record: StepRecord) -> None:
        if record.step == step:
            raise KeyboardInterrupt
    return on_step


def assert_same_as_reference(run: Run, history: list[StepRecord],
                             reference: tuple[list[list[float]], dict[str, torch.Tensor],
                                              list[StepRecord], bytes]) -> None:
    bits, state, ref_history, model_bytes = reference
    assert run.bits() == bits
    got = run.net.graph.state_dict()
    assert got.keys() == state.keys()
    different = [k for k in state if not torch.equal(got[k], state[k])]
    assert not different, different
    assert history == ref_history
    assert run.emitted() == model_bytes


@pytest.mark.parametrize("step", [2, 7, 8, 11], ids=["learning", "last-learning-step",
                                                      "first-frozen-step", "last-step"])
def test_interrupt_then_resume_matches_the_uninterrupted_run(step: int, tmp_path: Path,
                                                             reference: tuple) -> None:
    spec = CheckpointSpec(tmp_path / "run.ckpt", every=0)
    with pytest.raises(KeyboardInterrupt):
        fresh().fine_tune(checkpoint=spec, on_step=interrupt_at(step))
    saved = torch.load(spec.path, weights_only=True)
    assert saved["step"] == step + 1 and len(saved["history"]) == step + 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    resumed = fresh()
    seen: list[int] = []
    history = resumed.fine_tune(checkpoint=CheckpointSpec(spec.path, every=0, resume=True),
                                on_step=lambda r: seen.append(r.step))
    assert seen == list(range(step + 1, CFG.steps))
    assert_same_as_reference(resumed, history, reference)


def test_periodic_checkpoint_survives_a_crash(tmp_path: Path, reference: tuple) -> None:
    spec = CheckpointSpec(tmp_path / "run.ckpt", every=4)

    def crash(record: StepRecord) -> None:
        if record.step == 6:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        fresh().fine_tune(checkpoint=spec, on_step=crash)
    assert torch.load(spec.path, weights_only=True)["step"] == 4     # saved after steps 0-3
    resumed = fresh()
    history = resumed.fine_tune(checkpoint=CheckpointSpec(spec.path, every=4, resume=True))
    assert_same_as_reference(resumed, history, reference)


def test_ctrl_c_mid_step_is_deferred_to_the_end_of_the_step(tmp_path: Path,
                                                            reference: tuple) -> None:
    run = fresh()
    calls = {"n": 0}

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, None]:
        calls["n"] += 1
        if calls["n"] == 5:                      # during step 4, before its forward pass
            os.kill(os.getpid(), signal.SIGINT)
        return run.x[idx], None

    spec = CheckpointSpec(tmp_path / "run.ckpt", every=0)
    with pytest.raises(KeyboardInterrupt):
        fine_tune(run.net, fetch, run.teacher, len(run.x), CFG, checkpoint=spec)
    assert torch.load(spec.path, weights_only=True)["step"] == 5      # step 4 completed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = fresh()
    history = resumed.fine_tune(checkpoint=CheckpointSpec(spec.path, resume=True))
    assert_same_as_reference(resumed, history, reference)


def test_a_finished_checkpoint_resumes_without_training(tmp_path: Path, reference: tuple) -> None:
    spec = CheckpointSpec(tmp_path / "run.ckpt", every=5)
    fresh().fine_tune(checkpoint=spec)
    resumed = fresh()
    seen: list[int] = []
    history = resumed.fine_tune(checkpoint=CheckpointSpec(spec.path, resume=True),
                                on_step=lambda r: seen.append(r.step))
    assert seen == []
    assert_same_as_reference(resumed, history, reference)


def test_extra_state_of_the_caller_is_restored_in_place(tmp_path: Path) -> None:
    moved: list[str] = []

    def freeze(net: QuantizedNetwork) -> None:
        freeze_all(net)
        moved.append("fc (weights): 5 -> 4")

    spec = CheckpointSpec(tmp_path / "run.ckpt", every=0, extra={"moved": moved})
    with pytest.raises(KeyboardInterrupt):
        fresh().fine_tune(checkpoint=spec, freeze=freeze, on_step=interrupt_at(9))
    after: list[str] = []
    resumed = CheckpointSpec(spec.path, resume=True, extra={"moved": after})
    fresh().fine_tune(checkpoint=resumed, freeze=freeze)
    assert after == ["fc (weights): 5 -> 4"]          # restored, and not frozen a second time


def test_resume_with_other_options_names_them(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fresh().fine_tune(checkpoint=CheckpointSpec(path, fingerprint={"--lambda": 0.5}),
                          on_step=interrupt_at(1))
    other = CheckpointSpec(path, resume=True, fingerprint={"--lambda": 1.0})
    with pytest.raises(ConfigError, match=r"run\.ckpt was written by a run with other options.*"
                                          r"--lambda: 0\.5 then, 1\.0 now.*without --resume"):
        fresh().fine_tune(checkpoint=other)


def test_resume_with_another_training_configuration(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fresh().fine_tune(checkpoint=CheckpointSpec(path), on_step=interrupt_at(1))
    other = TrainConfig(steps=20, frozen_steps=4, batch_size=8, lam=0.5, seed=3)
    with pytest.raises(ConfigError, match=r"another training configuration \(steps: 12 then, "
                                          r"20 now\); run without --resume"):
        fresh().fine_tune(other, checkpoint=CheckpointSpec(path, resume=True))


def test_resume_into_another_network(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fresh().fine_tune(checkpoint=CheckpointSpec(path), on_step=interrupt_at(1))
    model = normalize(conv_relu_gemm(classes=7))
    graph = convert(model)
    net = attach_quantizers(model, graph, find_sites(model, graph))
    x = random_input(model, 16)
    with pytest.raises(ConfigError, match=r"run\.ckpt does not fit this network"):
        fine_tune(net, lambda idx: (x[idx], None), graph(x).detach(), 16, CFG,
                  checkpoint=CheckpointSpec(path, resume=True))


def test_resume_without_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no checkpoint .*none\.ckpt.*run without --resume"):
        fresh().fine_tune(checkpoint=CheckpointSpec(tmp_path / "none.ckpt", resume=True))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")   # torch.load on the junk bytes
def test_resume_from_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(ConfigError, match=r"bad\.ckpt is not a readable onnxbits checkpoint"):
        fresh().fine_tune(checkpoint=CheckpointSpec(path, resume=True))


def test_negative_checkpoint_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--checkpoint-every must be >= 0"):
        CheckpointSpec(tmp_path / "x.ckpt", every=-1)


def test_checkpointing_does_not_change_the_result(tmp_path: Path, reference: tuple) -> None:
    run = fresh()
    history = run.fine_tune(checkpoint=CheckpointSpec(tmp_path / "run.ckpt", every=1))
    assert_same_as_reference(run, history, reference)


# --- determinism ------------------------------------------------------------------------------

_SCRIPT = """
import hashlib, sys, torch
from tests.test_resume import fresh
torch.set_num_threads(1)
run = fresh()
run.fine_tune()
sys.stdout.write(hashlib.sha256(run.emitted()).hexdigest() + " " + repr(run.bits()))
"""


def test_same_seed_gives_byte_identical_models_across_processes(reference: tuple) -> None:
    """A fresh interpreter with another hash seed (so other set and dict orders) gives the same
    bits and the same model bytes as this process."""
    root = Path(__file__).resolve().parents[1]
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, capture_output=True,
                          env={**os.environ, "PYTHONHASHSEED": hash_seed}, text=True,
                          timeout=300, check=True)
    bits, _, _, model_bytes = reference
    assert done.stdout.strip() == f"{hashlib.sha256(model_bytes).hexdigest()} {bits!r}"


def test_same_seed_gives_byte_identical_cli_output(tmp_path: Path) -> None:
    from onnxbits.cli.main import main

    from tests.test_cli_shrink import image_folder

    onnx.save(conv_relu_gemm(classes=3), tmp_path / "model.onnx")
    data = image_folder(tmp_path / "data", per_class=6)
    digests = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.onnx"
        result = CliRunner().invoke(main, ["shrink", str(tmp_path / "model.onnx"), "--data",
                                           str(data), "--steps", "4", "--batch-size", "8",
                                           "--threads", "1", "-q", "--seed", "5", "-o", str(out)])
        assert result.exit_code == 0, result.output
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# --- through the CLI (needs the pipeline/CLI patch of issue 6) --------------------------------



def cli_shrink(tmp_path: Path, out: Path, *extra: str) -> object:
    from onnxbits.cli.main import main

    return CliRunner().invoke(main, ["shrink", str(tmp_path / "model.onnx"), "--data",
                                     str(tmp_path / "data"), "--steps", "10", "--batch-size", "8",
                                     "--threads", "1", "-q", "--seed", "2", "-o", str(out),
                                     *extra])


@pytest.fixture
def cli_workspace(tmp_path: Path) -> Path:
    from tests.test_cli_shrink import image_folder

    onnx.save(conv_relu_gemm(classes=3), tmp_path / "model.onnx")
    image_folder(tmp_path / "data", per_class=6)
    return tmp_path


def interrupting_fine_tune(at_step: int) -> object:
    """``fine_tune`` that presses Ctrl-C after step ``at_step`` (through ``on_step``)."""
    def run(*args: object, on_step: object = None, **kwargs: object) -> list[StepRecord]:
        def press(record: StepRecord) -> None:
            if on_step is not None:
                on_step(record)  # type: ignore[operator]
            if record.step == at_step:
                raise KeyboardInterrupt
        return fine_tune(*args, on_step=press, **kwargs)  # type: ignore[arg-type]
    return run


def test_cli_interrupt_then_resume_gives_the_same_bytes(cli_workspace: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxbits.pipeline.run

    root = cli_workspace
    reference = cli_shrink(root, root / "ref.onnx")
    assert reference.exit_code == 0, reference.output
    assert not (root / "ref.ckpt").exists()                     # removed after success
    with monkeypatch.context() as patch:
        patch.setattr(onnxbits.pipeline.run, "fine_tune", interrupting_fine_tune(4))
        stopped = cli_shrink(root, root / "out.onnx", "--checkpoint-every", "3")
    assert stopped.exit_code == 130, stopped.output
    assert "out.ckpt: rerun the same command with --resume" in stopped.stderr
    assert sorted(p.name for p in root.glob("out.*")) == ["out.ckpt"]
    resumed = cli_shrink(root, root / "out.onnx", "--checkpoint-every", "3", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (root / "out.onnx").read_bytes() == (root / "ref.onnx").read_bytes()
    assert not (root / "out.ckpt").exists()


def test_cli_resume_with_other_options_fails_clearly(cli_workspace: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxbits.pipeline.run

    root = cli_workspace
    with monkeypatch.context() as patch:
        patch.setattr(onnxbits.pipeline.run, "fine_tune", interrupting_fine_tune(2))
        assert cli_shrink(root, root / "out.onnx").exit_code == 130
    other = cli_shrink(root, root / "out.onnx", "--resume", "--lambda", "0.2")
    assert other.exit_code == 2, other.output
    assert "out.ckpt was written by a run with other options or another model (--lambda: " \
           "0.05 then, 0.2 now); rerun with the same options" in other.stderr
    assert not (root / "out.onnx").exists()


def resume_with_float_graph_matches(cfg: TrainConfig, step: int, tmp_path: Path) -> list:
    """Interrupt a run that needs the float graph after ``step``, resume it, compare it with the
    uninterrupted run; returns the blocks the resumed run reconstructed."""
    run = fresh()
    history = run.fine_tune(cfg, float_graph=run.graph)
    reference = (run.bits(), run.net.graph.state_dict(), history, run.emitted())
    spec = CheckpointSpec(tmp_path / "run.ckpt", every=0)
    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        interrupted.fine_tune(cfg, checkpoint=spec, on_step=interrupt_at(step),
                              float_graph=interrupted.graph)
    resumed, blocks = fresh(), []
    resumed_history = resumed.fine_tune(cfg, checkpoint=CheckpointSpec(spec.path, every=0,
                                                                       resume=True),
                                        float_graph=resumed.graph, on_block=blocks.append)
    assert_same_as_reference(resumed, resumed_history, reference)
    return blocks


@pytest.mark.parametrize("step", [5, 6, 9], ids=["before-reconstruction",
                                                 "first-step-after-it", "frozen"])
def test_resume_around_block_reconstruction_matches_the_uninterrupted_run(
        step: int, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=12, frozen_steps=6, batch_size=8, lam=0.5, seed=3,
                      reconstruct_steps=3)   # reconstructs at step 6
    blocks = resume_with_float_graph_matches(cfg, step, tmp_path)
    assert bool(blocks) == (step < 6)     # reconstructed once, in whichever run reached it

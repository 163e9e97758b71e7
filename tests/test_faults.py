"""Fault tolerance of ``onnxbits shrink``: a run killed with SIGKILL at any stage leaves no
output model and a resumable checkpoint; a full disk fails cleanly with every existing file as it
was; two runs writing the same output cannot mix their files."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnxbits.cli.main import main

from onnxbits.pipeline.lock import lock_path
from tests.builders import conv_relu_gemm, image_folder

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with argv[3:], SIGKILLed where argv[1] says, the argv[2]-th time:
#   "replace:SUFFIX" - just before the rename of a written temporary onto a path ending in SUFFIX
#                      (the file is written and fsynced, the rename not done);
#   "NAME"           - on entering onnxbits.pipeline.run.NAME (a pipeline stage);
#   "wait:FILE"      - not killed: the fine-tune waits until FILE exists.
_DRIVER = """
import os, signal, sys, time
where, count, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]
def due():
    calls[0] += 1
    return calls[0] == count
if where.startswith("replace:"):
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith(where[8:]) and due():
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **k)
    os.replace = replace
else:
    import onnxbits.pipeline.run as run
    name = where[5:] if where.startswith("wait:") else where
    stage = "fine_tune" if where.startswith("wait:") else where
    real = getattr(run, stage)
    def enter(*a, **k):
        if where.startswith("wait:"):
            while not os.path.exists(name):
                time.sleep(0.05)
        elif due():
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(run, stage, enter)
from onnxbits.cli.main import main
main(args)
"""


def shrink_args(root: Path, out: str, *extra: str) -> list[str]:
    return ["shrink", str(root / "model.onnx"), "--data", str(root / "data"), "--steps", "10",
            "--batch-size", "8", "--threads", "1", "-q", "--seed", "2", "-o", str(root / out),
            "--checkpoint-every", "3", *extra]


def run_cli(args: list[str]) -> object:
    return CliRunner().invoke(main, args)


def driven(where: str, count: int, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _DRIVER, where, str(count), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, its images and the uninterrupted run's output ``ref.onnx``."""
    root = tmp_path_factory.mktemp("faults")
    onnx.save(conv_relu_gemm(classes=3), root / "model.onnx")
    image_folder(root / "data", per_class=6)
    done = run_cli(shrink_args(root, "ref.onnx"))
    assert done.exit_code == 0, done.output
    return root


def listing(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize(("where", "count"), [
    ("_load_inputs", 1),      # import, data, teacher
    ("fine_tune", 1),         # before the first step
    ("replace:.ckpt", 2),     # while writing the second periodic checkpoint
    ("emit", 1),
    ("verify", 1),
    ("build_report", 1),      # the ONNX Runtime evaluation
    ("replace:.png", 1),      # every final file written, none renamed yet
    ("replace:out.onnx", 1),  # every file in place but the model
])
def test_sigkill_at_any_stage_leaves_no_model_and_resumes_to_the_same_bytes(
        workspace: Path, tmp_path: Path, where: str, count: int) -> None:
    root = tmp_path
    (root / "model.onnx").symlink_to(workspace / "model.onnx")
    (root / "data").symlink_to(workspace / "data")
    source = digest(workspace / "model.onnx")
    killed = driven(where, count, shrink_args(root, "out.onnx"))
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert not (root / "out.onnx").exists()
    left = {p.name for p in root.iterdir()} - {"model.onnx", "data"}
    # what can be left: the checkpoint, the lock file, temporaries (hidden) and, when killed
    # between the final renames, the report files that precede the model
    assert all(n.startswith(".") or n in {"out.ckpt", "out.json", "out.png", "out.history.json",
                                          "out.history.csv", "out.history.png"} for n in left), left
    resume = ["--resume"] if (root / "out.ckpt").exists() else []
    assert bool(resume) == (where not in {"_load_inputs", "fine_tune"})
    done = run_cli(shrink_args(root, "out.onnx", *resume))
    assert done.exit_code == 0, done.output
    assert digest(root / "out.onnx") == digest(workspace / "ref.onnx")
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["data", "model.onnx", "out.onnx", "out.json", "out.png", "out.history.json",
         "out.history.csv", "out.history.png"])     # no checkpoint, lock or temporary left
    assert digest(workspace / "model.onnx") == source


def test_two_runs_writing_one_output_cannot_mix_their_files(workspace: Path,
                                                            tmp_path: Path) -> None:
    root = tmp_path
    (root / "model.onnx").symlink_to(workspace / "model.onnx")
    (root / "data").symlink_to(workspace / "data")
    go = root / "go"
    first = driven(f"wait:{go}", 1, shrink_args(root, "out.onnx"))
    try:
        deadline = time.monotonic() + 120
        while not lock_path(root / "out.onnx").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = run_cli(shrink_args(root, "out.onnx", "--lr", "0.5"))
        assert second.exit_code == 1
        assert (f"Error: {root / 'out.onnx'}: another onnxbits run (pid {first.pid}) is writing "
                "it; wait for it to finish or choose another -o/--output") in second.stderr
        go.touch()
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert digest(root / "out.onnx") == digest(workspace / "ref.onnx")
    assert not lock_path(root / "out.onnx").exists()
    again = run_cli(shrink_args(root, "out.onnx", "--lr", "0.5"))   # the lock is free again
    assert again.exit_code == 0, again.output


def _fail_fsync_of(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``os.fsync`` fail with ENOSPC for temporaries of the file ``name`` (a full disk)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("full_at", ["out.onnx", "out.png", "out.ckpt"])
def test_a_full_disk_fails_cleanly_and_keeps_every_existing_file(
        workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_at: str) -> None:
    root = tmp_path
    (root / "model.onnx").symlink_to(workspace / "model.onnx")
    (root / "data").symlink_to(workspace / "data")
    earlier = run_cli(shrink_args(root, "out.onnx", "--lr", "0.5"))   # an earlier run's output
    assert earlier.exit_code == 0, earlier.output
    before = listing(root)
    _fail_fsync_of(full_at, monkeypatch)
    done = run_cli(shrink_args(root, "out.onnx"))
    assert done.exit_code == 1
    assert done.stderr.startswith(f"Error: {root / full_at}: writing ")
    assert "failed (No space left on device); free space there" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert listing(root) == before          # nothing replaced, nothing left behind


def test_a_perturbed_requantization_scale_fails_the_run_naming_the_tensor(
        workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from onnx import numpy_helper

    import onnxbits.pipeline.run as run

    real_emit = run.emit
    broken: list[str] = []

    def emit_broken(*args: object, **kwargs: object) -> onnx.ModelProto:
        model = real_emit(*args, **kwargs)
        q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
                 and not n.input[0].endswith("weight"))        # an activation's requantization
        scale = next(i for i in model.graph.initializer if i.name == q.input[1])
        value = numpy_helper.to_array(scale) * np.float32(1.7)
        scale.CopyFrom(numpy_helper.from_array(value, scale.name))
        broken.append(q.input[0])
        return model
    monkeypatch.setattr(run, "emit", emit_broken)
    (tmp_path / "model.onnx").symlink_to(workspace / "model.onnx")
    (tmp_path / "data").symlink_to(workspace / "data")
    done = run_cli(shrink_args(tmp_path, "out.onnx"))
    assert done.exit_code == 1
    assert len(done.stderr.strip().splitlines()) == 1
    assert f"at tensor '{broken[0]}'" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model.onnx"]

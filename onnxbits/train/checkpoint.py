"""Checkpoints of the fine-tune: save every N steps and on Ctrl-C, resume to the same result.

A checkpoint holds everything :func:`onnxbits.train.loop.fine_tune` needs to continue as if it had
never stopped: the torch graph's state (weights, clip values, fractional and frozen bits), each
quantizer's flags, the optimizer (and whether it still trains the bits), the learning-rate bases,
the next step, lambda, the history, the batch sampler's RNG state and position, torch's RNG state,
the caller's ``extra`` containers and a *fingerprint* of the options. Resuming with another
fingerprint fails with a :class:`onnxbits.errors.ConfigError` naming what differs.

Files are written atomically (temporary file, fsync, rename) and read with
``torch.load(weights_only=True)``: only tensors and plain Python values, no arbitrary pickles.

While a checkpointed fine-tune runs in the main thread, Ctrl-C is deferred to the end of the
current step (so that the saved state is consistent); a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import hashlib
import io
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from onnxbits.errors import ConfigError
from onnxbits.graph.io import write_bytes_atomic

FORMAT = 1


@dataclass
class CheckpointSpec:
    """Where and how often :func:`onnxbits.train.loop.fine_tune` checkpoints.

    Attributes:
        path: The checkpoint file (the CLI uses ``OUT.ckpt`` next to the output model).
        every: Save after every ``every`` steps; 0 saves only on Ctrl-C and at the end.
        resume: Continue from ``path`` (which must exist) instead of starting at step 0.
        fingerprint: JSON-like description of the run (model hash, options); a checkpoint with
            a different fingerprint is refused on resume, naming the keys that differ.
        extra: The caller's mutable lists and dicts saved along (e.g. the groups a budget freeze
            moved); on resume their contents are restored in place.
    """

    path: Path
    every: int = 50
    resume: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 steps, got {self.every}")

    def due(self, done: int) -> bool:
        """True when a periodic checkpoint is due after ``done`` completed steps."""
        return self.every > 0 and done % self.every == 0


def checkpoint_path(output: str | Path) -> Path:
    """``model.bits.onnx`` -> ``model.bits.ckpt``: where a run writing ``output`` checkpoints."""
    return Path(output).with_suffix(".ckpt")


def run_fingerprint(model_path: str | Path, options: dict[str, Any]) -> dict[str, Any]:
    """The model's SHA-256 and the options as ``--option-name: value`` (what a resumed run must
    match; leave out options that cannot change the result)."""
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    named = {f"--{'lambda' if k == 'lam' else k.replace('_', '-')}": _plain(v)
             for k, v in options.items()}
    return {"model sha256": digest, **named}


def save_checkpoint(spec: CheckpointSpec, state: dict[str, Any]) -> Path:
    """Write ``state`` plus the spec's fingerprint and extras to ``spec.path`` atomically."""
    payload = {"format": FORMAT, "fingerprint": spec.fingerprint,
               "extra": {k: _plain(v) for k, v in spec.extra.items()}, **state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_bytes_atomic(buffer.getvalue(), spec.path)


def load_checkpoint(spec: CheckpointSpec) -> dict[str, Any]:
    """Read ``spec.path``, check its fingerprint and restore the extras in place.

    Raises:
        ConfigError: No checkpoint, an unreadable one, or one from a run with other options.
    """
    path = spec.path
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint {path} to resume from; run without --resume "
                          "to start from the beginning")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated files and foreign pickles raise many types
        raise ConfigError(f"--resume: {path} is not a readable onnxbits checkpoint "
                          f"({type(exc).__name__}); delete it and run without --resume") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"--resume: {path} is not an onnxbits checkpoint of format {FORMAT}; "
                          "delete it and run without --resume")
    differ = _differences(state.get("fingerprint", {}), _plain(spec.fingerprint))
    if differ:
        raise ConfigError(f"--resume: {path} was written by a run with other options or another "
                          f"model ({'; '.join(differ[:4])}); rerun with the same options, or "
                          "without --resume to start over")
    for key, saved in state.get("extra", {}).items():
        _restore(spec.extra, key, saved)
    return state


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint (after a successful run); a missing file is fine."""
    Path(path).unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists and paths as strings (what the weights-only loader keeps)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '(unset)')!r} then, {current.get(k, '(unset)')!r} now"
            for k in keys if saved.get(k) != current.get(k)]


def _restore(extra: dict[str, Any], key: str, saved: Any) -> None:
    current = extra.get(key)
    if isinstance(current, list) and isinstance(saved, list):
        current[:] = saved
    elif isinstance(current, dict) and isinstance(saved, dict):
        current.clear()
        current.update(saved)
    else:
        extra[key] = saved


class InterruptGuard:
    """Records a Ctrl-C instead of raising it; :attr:`requested` is checked between steps."""

    def __init__(self) -> None:
        self.requested = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """First Ctrl-C: remember it; second: interrupt now."""
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def deferred_interrupt(enabled: bool = True) -> Iterator[InterruptGuard]:
    """Defer SIGINT to step boundaries while the block runs (main thread only)."""
    guard = InterruptGuard()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = signal.signal(signal.SIGINT, guard.handle)
    try:
        yield guard
    finally:
        signal.signal(signal.SIGINT, previous)

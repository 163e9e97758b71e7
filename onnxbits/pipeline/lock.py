"""One run per output: a shrink holds an exclusive lock on ``.OUT.onnx.lock`` while it runs.

The lock is an ``flock`` on a file beside the output, so the kernel releases it however the
process ends (SIGKILL included) and a stale lock cannot block the next run. A second run writing
the same output fails at once with the first run's pid. Under the lock no other onnxbits run can
be writing these files, so the temporaries a killed run left behind (``.NAME.*.tmp``) are removed.
On systems without ``fcntl`` (Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from onnxbits.errors import OutputError
from onnxbits.graph.io import temporary_names

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(output: Path) -> Path:
    """``model.bits.onnx`` -> ``.model.bits.onnx.lock`` beside it."""
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def output_lock(output: Path, files: Iterable[Path]) -> Iterator[None]:
    """Hold the lock of ``output`` for the block and remove stale temporaries of ``files``.

    Raises:
        OutputError: Another live run holds the lock, or the lock file cannot be created.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = lock_path(output)
    fd = _acquire(path, output)
    try:
        for file in files:
            for stale in file.parent.glob(temporary_names(file)):
                stale.unlink(missing_ok=True)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a run waiting on this file retries on a new one
        os.close(fd)


def _acquire(path: Path, output: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{output}: cannot create the lock file {path} "
                              f"({exc.strerror}); choose a writable output folder") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{output}: another onnxbits run (pid {holder}) is writing it; "
                              "wait for it to finish or choose another -o/--output") from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # the holder removed the file as we opened it: lock the new one

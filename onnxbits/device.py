"""Where the fine-tune runs and the process settings that make it fast (measured, see README).

* :func:`prefer_passive_omp_wait` must run before ``import torch`` (the CLI's first lines): idle
  OpenMP threads sleep instead of spinning. On a machine whose cores are shared with other jobs,
  spinning workers take the CPU from the thread that has work: with 2 cores shared with other
  jobs, a float ResNet-20 training step (batch 128) took 2.7 s with the default policy and 0.6 s
  with PASSIVE. On an idle machine it costs a few microseconds per parallel op.
* :func:`keep_freed_memory` (glibc only): freed memory stays in the process instead of being given
  back to the OS and faulted in again (zero-filled) at the next step. Without it a quantized
  ResNet-20 step took 23k-64k page faults and an EfficientNet-Lite0 float step 480k.
* :func:`configure_cpu`: threads, denormals flushed to zero, and the allocator setting above.
* :func:`resolve_device` and :func:`autocast`: ``cpu`` / ``cuda`` / ``auto`` and mixed precision;
  the quantizers compute in float32 under autocast (:mod:`onnxbits.quant.fakequant`).

Nothing here prints; every function returns what it did.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
AMP_DTYPES = ("bf16", "fp16")


def prefer_passive_omp_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it; True if set now.

    Only has an effect before torch (and its OpenMP runtime) is loaded.
    """
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from the heap and never trim it; True on success.

    Large tensors are otherwise ``mmap``-ed and unmapped at every step. The process keeps its peak
    memory until it exits, which a training run does anyway.
    """
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        # mallopt(3): M_MMAP_MAX 0 disables mmap, M_TRIM_THRESHOLD -1 disables trimming
        return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    except (OSError, AttributeError):
        return False


def configure_cpu(threads: int | None = None, keep_memory: bool = True) -> dict[str, object]:
    """Set threads (``None``: torch's default), flush denormals, :func:`keep_freed_memory`."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return {"threads": torch.get_num_threads(), "flush_denormal": torch.set_flush_denormal(True),
            "keep_freed_memory": keep_freed_memory() if keep_memory else False,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def resolve_device(name: str = "auto") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available) as a torch device.

    Raises:
        ValueError: the name is unknown or names a CUDA device that torch cannot see.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}': torch sees no CUDA device (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device '{name}': only cpu and cuda are supported")
    return device


def autocast(device: torch.device | str, amp: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``bf16``/``fp16`` on ``device``, or a no-op when ``amp`` is None.

    fp16 needs a gradient scaler (``torch.amp.GradScaler``) around the optimizer step; bf16 does
    not.
    """
    import torch

    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown --amp '{amp}'; choose {' or '.join(AMP_DTYPES)}")
    kind = torch.device(device).type
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=kind, dtype=dtype)

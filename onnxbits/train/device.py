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
* :func:`resolve_device`, :func:`check_amp` and :func:`autocast`: ``cpu`` / ``cuda`` /
  ``cuda:N`` / ``auto`` and mixed precision (bf16 on CPU and CUDA, fp16 on CUDA); the quantizers
  compute in float32 under autocast (:mod:`onnxbits.quant.fakequant`).
* :func:`available_memory`: free bytes on the device (block reconstruction sizes its inputs by it).
* :func:`fast_layout` and :func:`empty_rows`: image batches on the CPU in channels-last memory
  format (same shape and values; every later activation follows it). mobilenet_v2, batch 16,
  one thread: a fine-tune step took 1.00 s instead of 1.25 s; a depthwise 3x3 convolution
  forward and backward (batch 32, 96 channels, 112x112, stride 2) 0.23 instead of 0.46 s.
* :class:`ResidentImages`: the decoded training images kept on the GPU as uint8 and normalised
  there, so that a step does not wait for a host-to-device copy of float32 batches.

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

if TYPE_CHECKING:      # torch (and numpy) load lazily: see prefer_passive_omp_wait
    import numpy as np
    import onnx
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
        ValueError: the name is unknown or names a CUDA device that torch cannot see; the message
            starts with ``--device NAME:``.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index is not None):
        raise ValueError(f"--device {name}: only cpu, cuda, cuda:N and auto are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's (``platform.processor()`` or machine)."""
    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return platform.processor() or platform.machine()


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: free GPU memory for CUDA, the kernel's
    ``MemAvailable`` (``/proc/meminfo``) for the CPU; None where that is not known."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory format when it is a 4-D ``(N, C, H, W)`` batch on the CPU,
    else ``x`` itself (the values and shape never change)."""
    import torch

    if x.dim() != 4 or x.device.type != "cpu":
        return x
    return x.contiguous(memory_format=torch.channels_last)


def empty_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised ``(rows, *like.shape[1:])`` tensor with the dtype, device and memory
    format of ``like`` (channels-last where ``like`` is channels-last and not also contiguous)."""
    import torch

    channels_last = (like.dim() == 4 and not like.is_contiguous()
                     and like.is_contiguous(memory_format=torch.channels_last))
    return torch.empty((rows, *like.shape[1:]), dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if channels_last
                       else torch.contiguous_format)


def check_amp(amp: str | None, device: torch.device) -> None:
    """``bf16`` runs on CPU and on GPUs with bfloat16 support, ``fp16`` on CUDA only.

    Raises:
        ValueError: an unknown ``amp`` or one the device cannot run (message names ``--amp``).
    """
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"--amp {amp}: choose {', '.join(AMP_DTYPES)} or off")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (float16 autocast with a gradient "
                         "scaler); use --amp bf16 or --amp off on CPU")
    if amp == "bf16" and device.type == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 "
                             "support; use --amp fp16")


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


class ResidentImages:
    """uint8 images ``(N, H, W, C)`` held on ``device``, normalised there batch by batch.

    ``batch(idx)[n, c, h, w] = table[c, images[idx[n], h, w, c]]`` with the float32 lookup table
    ``(C, 256)`` of :meth:`onnxbits.data.files.Preprocess.lookup_table`: the values are those of
    :meth:`onnxbits.data.files.ImageTensors.batch`, bit for bit.
    """

    def __init__(self, images: np.ndarray, table: np.ndarray, device: torch.device) -> None:
        import numpy as np
        import torch

        self.device = device
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        channels = table.shape[0]
        self.table = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)).to(device)
        self.offsets = torch.arange(channels, device=device).view(1, channels, 1, 1) * 256

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """Float32 NCHW inputs of ``indices``, on the device."""
        import numpy as np
        import torch

        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=self.device)
        pixels = self.images.index_select(0, idx).permute(0, 3, 1, 2).long() + self.offsets
        return self.table.reshape(-1)[pixels].contiguous()


#: Activation bytes one forward pass may keep (larger batches run in pieces; gradients add up).
PASS_BYTES = 1 << 30


def rows_per_pass(model: onnx.ModelProto, batch_size: int, fixed: bool) -> int | None:
    """Samples per forward pass so that one pass keeps at most :data:`PASS_BYTES` of
    activations (:func:`onnxbits.graph.macs.activation_bytes`); None: whole batches (they fit,
    the sizes are unknown, or the model runs only at its fixed batch)."""
    from onnxbits.graph.macs import activation_bytes

    per_sample = activation_bytes(model)
    if fixed or not per_sample or batch_size * per_sample <= PASS_BYTES:
        return None
    return max(1, PASS_BYTES // per_sample)

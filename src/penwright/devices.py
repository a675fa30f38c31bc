"""Devices and precision: which device `--device` names and which dtype `--precision` computes in;
the CPU allocator setting for training.

`--device auto` takes a CUDA GPU, else Apple's GPU (MPS), else the CPU. On MPS `--precision auto`
is fp32: its bf16 depends on the macOS version and fp16 needs loss scaling, which penwright does
not do; int8 writing (quantize.py) and the CPU allocator setting are for the CPU only. No Apple
machine has run penwright's tests: the MPS path is the device choice alone, and PyTorch's own ops.

Apart from models.py so that penwright's own engine (engine.py) can pick them without importing transformers.
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager

import torch

from .errors import PenwrightError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PenwrightError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if name == "mps" and not mps_available():
        raise PenwrightError("--device mps: no Apple GPU (MPS) is available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PenwrightError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def pick_dtype(precision: str, device: torch.device, log=_stderr) -> torch.dtype:
    """The compute dtype for `--precision`; auto is bf16 where the hardware does it natively.

    An explicit bf16 on a CPU without it is kept, after a one-line warning through `log`."""
    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PenwrightError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PenwrightError("this GPU has no bf16; use --precision fp16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log("warning: this CPU has no native bf16 (AVX512-BF16 or AMX), so --precision bf16 is emulated "
            "here and many times slower than fp32; use --precision auto or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


CPU_BF16 = "PENWRIGHT_CPU_BF16"  # 1 or 0: treat this CPU as having native bf16 or not (tests force both paths)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls in hardware (AVX512-BF16 or AMX); elsewhere PyTorch emulates them, ~100x slower
    than fp32. `PENWRIGHT_CPU_BF16=0/1` overrides what the CPU reports."""
    forced = os.environ.get(CPU_BF16, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_description() -> str:
    """The CPU in one line, for benchmark results and test reports: model, ISA, bf16, cores."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                 os.uname().machine)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    forced = os.environ.get(CPU_BF16, "").strip()
    bf16 = ("native" if native else "emulated") + (f", forced {forced} by {CPU_BF16}" if forced in ("0", "1") else "")
    return (f"{model}; ISA {torch.backends.cpu.get_cpu_capability()}; bf16 {bf16}; "
            f"{os.cpu_count()} cores, torch {torch.__version__}")


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision in `dtype` on `device`; nothing for fp32."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        yield


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of handing it back to the system at once.

    A training step allocates and frees gigabytes of activations. By default glibc returns every
    large block to the kernel when it is freed, so the next step faults each page back in, zeroed:
    on the 2-core CPU of benchmarks/RESULTS.md that was a third of the step, in kernel time. The
    process keeps its peak heap instead, which the next step needs again anyway. It is a setting
    of the whole process (a notebook that trained keeps its heap): `--malloc system` skips it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    libc.mallopt(M_MMAP_MAX, 0)  # every block from the heap, none mapped and unmapped on its own
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the system now (glibc's malloc_trim), whatever
    `keep_freed_memory` said: memory.py measures each trial step from a heap without its predecessor's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

"""Devices and precision: which device `--device` names and which dtype `--precision` computes in.

Apart from models.py so that penwright's own GPT-2 (gpt2.py) can pick them without importing transformers.
"""

from __future__ import annotations

import torch

from .errors import PenwrightError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PenwrightError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PenwrightError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `--precision`; auto is bf16 where the hardware does it natively."""
    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PenwrightError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PenwrightError("this GPU has no bf16; use --precision fp16 or fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()

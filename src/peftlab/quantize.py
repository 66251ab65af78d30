"""Quantized base models (QLoRA and its kin): the base's linear layers in 8 or 4 bits through bitsandbytes, on the
CPU and on CUDA, with every method training its own parts in full precision on top.

bitsandbytes is the one backend: it quantizes on the CPU with torch 2.13 (checked for every method), peft supports
its layers, and transformers can dequantize its models (for merging and GGUF export). torchao's int8 weight-only
mode trained as well, but transformers cannot dequantize it, and its int4 mode did not convert on the CPU here
(torchao 0.18); see docs/quantize.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("int8", "nf4", "fp4")  # LLM.int8; 4-bit NormalFloat (QLoRA's); 4-bit float


class QuantizationError(ValueError):
    """A quantization that is unknown, unavailable, or not supported by a method (the message says which)."""


def quantization_config(name: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """transformers' ``quantization_config`` for ``name`` (one of ``QUANTIZATIONS``)."""
    if name not in QUANTIZATIONS:
        raise QuantizationError(f"quantize: {name!r} is not one of {', '.join(QUANTIZATIONS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationError(f"quantize: {name} needs bitsandbytes: pip install 'peftlab[quantize]'") from None
    from transformers import BitsAndBytesConfig

    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_compute_dtype=compute_dtype)


def quantization_of(model: nn.Module) -> str | None:
    """How ``model``'s base weights are quantized (one of ``QUANTIZATIONS``), or None."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    values = config if isinstance(config, dict) else config.to_dict()
    if values.get("load_in_8bit"):
        return "int8"
    if values.get("load_in_4bit"):
        return values.get("bnb_4bit_quant_type", "fp4")
    return str(values.get("quant_method", "unknown"))


def dequantized(model: nn.Module) -> nn.Module:
    """``model`` with its quantized layers turned back into full-precision ones holding the quantized values (what
    a module was trained against), so a merge adds its update to exactly those weights."""
    if quantization_of(model) is None:
        return model
    return model.dequantize()

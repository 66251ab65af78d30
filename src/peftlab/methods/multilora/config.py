"""One adapter of a MultiLoRA model: LoRA's settings, in peft's orientation and scaling (rsLoRA too)."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.methods.lora.config import LoraConfig


@dataclass
class MultiLoraConfig(LoraConfig):
    """LoRA settings for one of many adapters served side by side. Every adapter of one model shares the target
    modules and the dropout; ranks may differ (smaller ones are zero-padded to the largest, which is exact). DoRA
    and trained biases are not batched: train those with the ``lora`` method."""

    def __post_init__(self) -> None:
        if self.use_dora:
            raise ValueError("multilora does not batch DoRA adapters (use_dora); use the lora method for DoRA")
        if self.bias != "none":
            raise ValueError(f"multilora trains no biases (bias={self.bias!r}); use the lora method for that")
        if self.r < 1:
            raise ValueError(f"r must be at least 1, got {self.r}")

"""LoRA (optionally DoRA) and IA3 through ``peft``; a saved module is a plain peft adapter folder plus peftlab.json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import peft
from torch import nn
from transformers import PreTrainedModel

from peftlab.methods import Method, MethodConfig, register


@dataclass
class LoraConfig(MethodConfig):
    """Low-rank update W + (alpha/r)·BA on the target linear layers.

    ``target_modules`` defaults to every linear layer of the blocks ("all-linear"), which tunes better than
    attention-only at the same rank for small models; give a list (e.g. ["q_proj", "v_proj"]) to narrow it.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    bias: str = "none"

    def to_peft(self) -> peft.LoraConfig:
        return peft.LoraConfig(task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=self.target_modules, use_dora=self.use_dora,
                               use_rslora=self.use_rslora, bias=self.bias)


@dataclass
class IA3Config(MethodConfig):
    """Learned rescaling of keys, values and the MLP input; ``None`` takes peft's defaults for the architecture."""

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None

    def to_peft(self) -> peft.IA3Config:
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=self.target_modules,
                              feedforward_modules=self.feedforward_modules)


class PeftAdapterMethod(Method):
    """Shared by every method that is a single peft adapter: peft does the work, peftlab keeps the format."""

    supports_packing = True
    mergeable = True

    def attach(self, model: PreTrainedModel, config: MethodConfig) -> peft.PeftModel:
        try:
            return peft.get_peft_model(model, config.to_peft())
        except ValueError as e:
            raise ValueError(f"{self.name}: cannot attach to {type(model).__name__} "
                             f"({model.config.model_type}): {e}. Set target_modules explicitly.") from e

    def save_weights(self, model: nn.Module, folder: Path) -> None:
        model.save_pretrained(folder)

    def load(self, model: PreTrainedModel, folder: Path, config: MethodConfig, trainable: bool) -> peft.PeftModel:
        return peft.PeftModel.from_pretrained(model, folder, is_trainable=trainable)

    def merge(self, model: nn.Module) -> PreTrainedModel:
        return model.merge_and_unload()


class LoraMethod(PeftAdapterMethod):
    name = "lora"
    config_class = LoraConfig


class IA3Method(PeftAdapterMethod):
    name = "ia3"
    config_class = IA3Config


register(LoraMethod())
register(IA3Method())

"""LoRA (optionally DoRA, rsLoRA) and IA3 settings, and their translation to and from peft's configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peft

from peftlab.methods.base import MethodConfig

# peft config fields that say where an adapter came from or how it is loaded, not what it computes
_PROVENANCE = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping", "task_type"}


class PeftConfigMixin:
    """Shared by configs that are one peft adapter: translated to peft's config and back, nothing lost."""

    def to_peft(self) -> peft.PeftConfig:
        raise NotImplementedError

    @classmethod
    def from_peft_fields(cls, values: dict[str, Any]) -> PeftConfigMixin:
        raise NotImplementedError

    @classmethod
    def from_peft(cls, config: peft.PeftConfig) -> PeftConfigMixin:
        """Our config for an adapter peft wrote; refuses settings ours cannot carry rather than drop them."""
        ours = cls.from_peft_fields(config.to_dict())
        mine, theirs = _comparable(ours.to_peft()), _comparable(config)
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differing:
            raise ValueError(f"peft settings {', '.join(f'{k}={theirs.get(k)!r}' for k in differing)} have no "
                             f"counterpart in peftlab's {cls.__name__}")
        return ours


def _comparable(config: peft.PeftConfig) -> dict[str, Any]:
    values = {k: v for k, v in config.to_dict().items() if k not in _PROVENANCE}
    for k in ("target_modules", "feedforward_modules"):
        if isinstance(values.get(k), (list, set, tuple)):
            values[k] = sorted(values[k])
    return values


@dataclass
class LoraConfig(PeftConfigMixin, MethodConfig):
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

    @property
    def scaling(self) -> float:
        """peft's factor on B·A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def to_peft(self) -> peft.LoraConfig:
        return peft.LoraConfig(task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=self.target_modules, use_dora=self.use_dora,
                               use_rslora=self.use_rslora, bias=self.bias)

    @classmethod
    def from_peft_fields(cls, values: dict[str, Any]) -> LoraConfig:
        targets = values.get("target_modules")
        return cls(r=values["r"], alpha=values["lora_alpha"], dropout=values["lora_dropout"],
                   target_modules=sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
                   use_dora=values["use_dora"], use_rslora=values["use_rslora"], bias=values["bias"])


@dataclass
class IA3Config(PeftConfigMixin, MethodConfig):
    """Learned rescaling of keys, values and the MLP input; ``None`` takes peft's defaults for the architecture."""

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None

    def to_peft(self) -> peft.IA3Config:
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=self.target_modules,
                              feedforward_modules=self.feedforward_modules)

    @classmethod
    def from_peft_fields(cls, values: dict[str, Any]) -> IA3Config:
        def listed(v):
            return sorted(v) if isinstance(v, (list, set, tuple)) else v
        return cls(target_modules=listed(values.get("target_modules")),
                   feedforward_modules=listed(values.get("feedforward_modules")))

"""ReFT settings: where (layers, component, positions) and how (rank, activation, dtype) to intervene."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from peftlab.methods.base import MethodConfig

COMPONENTS = ("block_output", "block_input", "attention_output", "mlp_output")
GENERATION_MODES = ("prompt", "every_token")
SHORT_PROMPT_RULES = ("paper", "pyreft")
_POSITIONS = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")


@dataclass
class ReftConfig(MethodConfig):
    """Where and how to intervene. The intervention type comes from the method name (loreft, direft, ...).

    layers: a list of layer indices, one index, "all", or "middle" (num_layers // 2).
    positions: "f{p}+l{s}": the first p and last s prompt positions (the paper's notation; "l1" = last token).
    share_weights: one intervention per layer for all positions (tied) or one for the prefix, one for the suffix.
    generation: "prompt" (the paper's default: intervene the prompt only) or "every_token".
    short_prompts: how a prompt shorter than first + last positions is cut: "paper" (first <- min(p, n // 2),
        last <- min(s, ceil(n / 2)) when n < p + s) or "pyreft" (both <- min(., n // 2) on every prompt; set on
        import, so a module behaves as it did in pyreft).
    prompt_end_offset: where the prompt ends for the positions, in tokens before its real end: 0 (the paper's and
        peftlab's count, "l1" = the last prompt token), or 1 for modules trained with pyreft's dataset helpers,
        which count the last positions from n - 1 (``last_position = n - 1``), leaving the final token out.
    lora: settings of a LoRA trained together with the interventions (peftlab's LoraConfig fields), or None.
    """

    layers: list[int] | int | str = "middle"
    component: str = "block_output"
    positions: str = "l1"
    rank: int = 4
    dropout: float = 0.0
    act: str = "linear"
    share_weights: bool = True
    dtype: str = "float32"
    add_bias: bool = False
    generation: str = "prompt"
    short_prompts: str = "paper"
    prompt_end_offset: int = 0
    lora: dict[str, Any] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"component {self.component!r} is not one of {COMPONENTS}")
        if self.generation not in GENERATION_MODES:
            raise ValueError(f"generation {self.generation!r} is not one of {GENERATION_MODES}")
        if self.short_prompts not in SHORT_PROMPT_RULES:
            raise ValueError(f"short_prompts {self.short_prompts!r} is not one of {SHORT_PROMPT_RULES}")
        if not isinstance(self.prompt_end_offset, int) or self.prompt_end_offset < 0:
            raise ValueError(f"prompt_end_offset must be a non-negative integer, got {self.prompt_end_offset!r}")
        self.first, self.last = parse_positions(self.positions)

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(num_layers))
        if self.layers == "middle":
            return [num_layers // 2]
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        bad = [i for i in layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {num_layers} layers")
        return sorted({i % num_layers for i in layers})

    @property
    def tied(self) -> bool:
        return self.share_weights or not (self.first and self.last)


def parse_positions(text: str) -> tuple[int, int]:
    """'f7+l7' -> (7, 7); 'l1' -> (0, 1); 'f3' -> (3, 0)."""
    m = _POSITIONS.match(text.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"positions {text!r} must look like 'f3', 'l1' or 'f3+l3'")
    return int(m.group(1) or 0), int(m.group(2) or 0)

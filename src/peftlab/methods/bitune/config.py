"""Bitune settings: which adapter, which variant (the paper's method or one of its ablations), how the mix is gated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftlab.methods.base import MethodConfig
from peftlab.methods.lora.config import IA3Config, LoraConfig

CAUSAL, BIDIR = "default", "bidir"  # peft adapter names: the answer/causal adapter and the bidirectional one

# variant -> the prompt passes as (adapter, bidirectional?); two passes are mixed (the second one is the causal one)
VARIANTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "bitune": ((BIDIR, True), (CAUSAL, False)),  # the paper's method
    "naive_bidir": ((CAUSAL, True),),  # one adapter; the prompt read only bidirectionally
    "no_mixing": ((BIDIR, True),),  # the bidirectional adapter reads the prompt, nothing is mixed
    "only_causal": ((BIDIR, False), (CAUSAL, False)),  # two adapters and mixing, but both passes causal
    "shared_weights": ((CAUSAL, True), (CAUSAL, False)),  # both passes with one adapter
}
GATES = ("abs", "relu")  # the paper's mixing variants 607 (|w|) and 801 (relu(w))


@dataclass
class BituneConfig(MethodConfig):
    """Bitune settings. ``adapter`` is a LoRA (``use_dora: true`` for DoRA) or IA3 config, as for those methods;
    both adapters get the same settings. The mix gives weight a = g(w) / (g(w) + eps) to the bidirectional
    features, separately for keys and values in every layer; ``init = eps`` starts it at 50/50. The default adapter
    is the authors': LoRA r 8 with alpha 1 (peft's alpha 16 is what a LoRA alone defaults to)."""

    adapter: dict[str, Any] = field(default_factory=lambda: {"name": "lora", "r": 8, "alpha": 1})
    variant: str = "bitune"  # bitune | naive_bidir | no_mixing | only_causal | shared_weights (the ablations)
    gate: str = "abs"  # abs: the paper's variant 607 | relu: variant 801
    eps: float = 0.01
    init: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.adapter, str):
            self.adapter = {"name": self.adapter}
        if self.adapter.get("name", "lora") not in ("lora", "ia3"):
            raise ValueError(f"bitune.adapter.name must be lora or ia3, got {self.adapter.get('name')!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"bitune.variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.gate not in GATES:
            raise ValueError(f"bitune.gate must be one of {GATES}, got {self.gate!r}")
        if self.eps <= 0:
            raise ValueError(f"bitune.eps must be > 0, got {self.eps}")

    @property
    def passes(self) -> tuple[tuple[str, bool], ...]:
        return VARIANTS[self.variant]

    @property
    def adapters(self) -> list[str]:
        return sorted({CAUSAL} | {name for name, _ in self.passes})

    def adapter_config(self) -> LoraConfig | IA3Config:
        """The settings both peft adapters get."""
        settings = dict(self.adapter)
        kind = settings.pop("name", "lora")
        return (LoraConfig if kind == "lora" else IA3Config).from_dict(settings, where="bitune.adapter")

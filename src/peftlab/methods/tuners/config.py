"""LoHa, LoKr, VeRA and OFT settings: each one peft adapter, translated to peft's config and back with nothing lost.

A config names the fields a user sets most; every other peft field stays at peft's default, and a peft folder that
sets one of them is refused by ``from_peft`` rather than read with it dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import peft

from peftlab.methods.base import MethodConfig
from peftlab.methods.lora.config import PeftConfigMixin


@dataclass
class PeftTunerConfig(PeftConfigMixin, MethodConfig):
    """One peft tuner's settings: each field is the peft field of the same name, or of the name in ``PEFT_NAMES``."""

    PEFT_CLASS: ClassVar[type[peft.PeftConfig]]
    PEFT_NAMES: ClassVar[dict[str, str]] = {}  # our field -> peft's, where the names differ
    PEFT_FIXED: ClassVar[dict[str, Any]] = {}  # peft fields peftlab always sets this way
    MIN_R: ClassVar[int] = 1  # OFT takes r=0 (then block_size sets the blocks)

    def __post_init__(self) -> None:
        r = getattr(self, "r", None)
        if not isinstance(r, int) or isinstance(r, bool) or r < self.MIN_R:
            raise ValueError(f"r must be an integer of at least {self.MIN_R}, got {r!r}")
        for name in ("rank_dropout", "module_dropout", "dropout"):
            if not 0 <= getattr(self, name, 0) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    def to_peft(self) -> peft.PeftConfig:
        values = {self.PEFT_NAMES.get(name, name): value for name, value in dataclasses.asdict(self).items()}
        return self.PEFT_CLASS(task_type="CAUSAL_LM", **values, **self.PEFT_FIXED)

    @classmethod
    def from_peft_fields(cls, values: dict[str, Any]) -> PeftTunerConfig:
        ours = {name: values[cls.PEFT_NAMES.get(name, name)] for name in _names(cls)}
        if isinstance(ours.get("target_modules"), (list, set, tuple)):
            ours["target_modules"] = sorted(ours["target_modules"])
        return cls(**ours)


def _names(config: PeftTunerConfig | type[PeftTunerConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config)]


@dataclass
class LoHaConfig(PeftTunerConfig):
    """LoHa: the weight update is a Hadamard product of two low-rank products, (B₁A₁) ⊙ (B₂A₂) · alpha/r, so rank r
    reaches an update of rank up to r² at the cost of two rank-r LoRAs (Hyeon-Woo et al. 2022, FedPara).

    ``rank_dropout`` drops rows of the update, ``module_dropout`` the whole update of a layer, during training.
    """

    PEFT_CLASS = peft.LoHaConfig

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"


@dataclass
class LoKrConfig(PeftTunerConfig):
    """LoKr: the weight update is a Kronecker product W₁ ⊗ W₂ · alpha/r of a small dense factor and a second one,
    low-rank (B₂A₂) where r is small for the layer (Yeh et al. 2024, LyCORIS). ``decompose_both`` makes W₁ low-rank
    too; ``decompose_factor`` picks how the layer's dimensions split between the factors (-1: as evenly as they
    allow)."""

    PEFT_CLASS = peft.LoKrConfig

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    decompose_both: bool = False
    decompose_factor: int = -1
    target_modules: list[str] | str | None = "all-linear"


@dataclass
class VeraConfig(PeftTunerConfig):
    """VeRA: one pair of frozen random projections A [r, in], B [out, r] shared by every target layer; each layer
    trains two scaling vectors only, ΔW = diag(b) · B · diag(d) · A (Kopiczko et al. 2024).

    Set ``r`` far larger than a LoRA rank (peft's default, 256): a layer trains only out + r numbers. It wants a
    larger learning rate than LoRA (the tests use 5x). ``projection_prng_key`` seeds A and B; they are saved with
    the adapter, so a folder loads without drawing them again.
    """

    PEFT_CLASS = peft.VeraConfig
    PEFT_NAMES = {"dropout": "vera_dropout"}
    PEFT_FIXED = {"save_projection": True}

    r: int = 256
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0
    target_modules: list[str] | str | None = "all-linear"


@dataclass
class OFTConfig(PeftTunerConfig):
    """OFT: each target weight is rotated, W ↦ W·R with R block-diagonal and orthogonal (a Cayley transform of a
    skew-symmetric matrix per block), which keeps the angles between the weight's neurons (Qiu et al. 2023; peft's
    OFTv2, Qiu et al. 2025).

    Give either ``block_size`` (the size of each rotation block; it must divide a layer's input size, else peft
    adjusts it with a warning) or ``r``, the number of blocks per layer, with the other 0. ``coft`` keeps R within
    ``eps`` of the identity (constrained OFT); ``block_share`` shares one block over the layer;
    ``use_cayley_neumann`` approximates the Cayley inverse by a Neumann series (peft's default, faster).
    """

    PEFT_CLASS = peft.OFTConfig
    PEFT_NAMES = {"block_size": "oft_block_size"}
    MIN_R = 0

    r: int = 0
    block_size: int = 32
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    target_modules: list[str] | str | None = "all-linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.r == 0) == (self.block_size == 0):
            raise ValueError(f"give either r (blocks per layer) or block_size (their size), with the other 0; got "
                             f"r={self.r}, block_size={self.block_size}")
        if not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"block_size must be a non-negative integer, got {self.block_size!r}")


@dataclass
class AdaLoraConfig(PeftTunerConfig):
    """AdaLoRA: LoRA in SVD form, ΔW = P·diag(λ)·Q, whose rank budget moves to the layers that need it (Zhang et al.
    2023). Every layer starts at ``init_r``; from step ``tinit`` until ``tfinal`` steps before the end, every
    ``delta_t`` steps, the least important singular values are masked (importance: |λ·∇λ| smoothed by ``beta1``
    and ``beta2``) until ``target_r`` per layer remain on average. ``orth_reg_weight`` adds the penalty that keeps P
    and Q orthogonal to the loss. ``total_step`` must be the run's number of optimizer steps
    (``training.max_steps``). ``rank_pattern`` is what training kept, per layer; it is written when training ends
    and saved with the adapter, so a loaded adapter has the ranks it was trained down to.
    """

    PEFT_CLASS = peft.AdaLoraConfig
    PEFT_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout", "delta_t": "deltaT"}

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.total_step, int) or self.total_step < 1:
            raise ValueError(f"total_step must be the run's number of optimizer steps (training.max_steps), got "
                             f"{self.total_step!r}: AdaLoRA's rank schedule is laid out over it")
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"target_r must be in [1, init_r={self.init_r}], got {self.target_r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no steps of total_step="
                             f"{self.total_step} to reallocate ranks in")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

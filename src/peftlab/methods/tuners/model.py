"""LoHa, LoKr, VeRA and OFT as peftlab methods: peft computes, ``PeftAdapterModel`` holds the adapter, and a saved
adapter is a plain peft folder (``adapter_config.json`` + ``adapter_model.safetensors``) beside ``peftlab.json``."""

from __future__ import annotations

from peftlab.methods.lora.model import PeftAdapterMethod
from peftlab.methods.tuners.config import LoHaConfig, LoKrConfig, OFTConfig, VeraConfig


class PeftTunerMethod(PeftAdapterMethod):
    """A peft tuner whose update folds into the weights (``merge_and_unload``) and acts per token (so packed rows
    are fine), but whose tensors are not a sum of weight updates: module arithmetic refuses it."""

    mergeable = True
    routable = False
    supports_packing = True
    lora_adapters = False


class LoHaMethod(PeftTunerMethod):
    name = "loha"
    config_class = LoHaConfig
    peft_type = "LOHA"
    not_composable_because = ("a LoHa update is the Hadamard product (B₁A₁) ⊙ (B₂A₂) of its factors: adding or "
                              "scaling the factors of two adapters does not add or scale their updates (every cross "
                              "term appears), so arithmetic on the tensors is not arithmetic on what they do")


class LoKrMethod(PeftTunerMethod):
    name = "lokr"
    config_class = LoKrConfig
    peft_type = "LOKR"
    not_composable_because = ("a LoKr update is the Kronecker product W₁ ⊗ (B₂A₂) of its factors: adding or scaling "
                              "the factors of two adapters does not add or scale their updates (the product mixes "
                              "them), so arithmetic on the tensors is not arithmetic on what they do")


class VeraMethod(PeftTunerMethod):
    name = "vera"
    config_class = VeraConfig
    peft_type = "VERA"
    not_composable_because = ("a VeRA adapter is two scaling vectors per layer around frozen random projections "
                              "shared by the whole model: two adapters are only comparable on the same projections "
                              "(same r, seed and targets), and even then the update diag(b)·B·diag(d)·A is a product "
                              "of the vectors, so adding them is not adding the updates")


class OFTMethod(PeftTunerMethod):
    name = "oft"
    config_class = OFTConfig
    peft_type = "OFT"
    not_composable_because = ("an OFT adapter multiplies each weight by an orthogonal rotation (W·R), it does not add "
                              "to it: a sum of rotations' parameters is not a rotation of their combined effect, and "
                              "applying two rotations in turn depends on their order")

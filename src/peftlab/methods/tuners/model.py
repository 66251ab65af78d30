"""LoHa, LoKr, VeRA and OFT as peftlab methods: peft computes, ``PeftAdapterModel`` holds the adapter, and a saved
adapter is a plain peft folder (``adapter_config.json`` + ``adapter_model.safetensors``) beside ``peftlab.json``."""

from __future__ import annotations

from dataclasses import replace

import torch
from peft.tuners.tuners_utils import cast_adapter_dtype
from transformers import TrainerCallback

from peftlab.methods.lora.model import PeftAdapterMethod, PeftAdapterModel
from peftlab.methods.tuners.config import AdaLoraConfig, LoHaConfig, LoKrConfig, OFTConfig, VeraConfig


class PeftTunerMethod(PeftAdapterMethod):
    """A peft tuner whose update folds into the weights (``merge_and_unload``) and acts per token (so packed rows
    are fine), but whose tensors are not a sum of weight updates: module arithmetic refuses it."""

    mergeable = True
    routable = False
    supports_packing = True
    lora_adapters = False


class LoHaMethod(PeftTunerMethod):
    name = "loha"
    quantized_bases = frozenset({"int8"})
    config_class = LoHaConfig
    peft_type = "LOHA"
    not_composable_because = ("a LoHa update is the Hadamard product (B₁A₁) ⊙ (B₂A₂) of its factors: adding or "
                              "scaling the factors of two adapters does not add or scale their updates (every cross "
                              "term appears), so arithmetic on the tensors is not arithmetic on what they do")


class LoKrMethod(PeftTunerMethod):
    name = "lokr"
    quantized_bases = frozenset({"int8"})
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


class AdaLoraModel(PeftAdapterModel):
    """A peft AdaLoRA adapter; its rank schedule runs inside Trainer (``training_callbacks``)."""

    def training_callbacks(self) -> list[TrainerCallback]:
        return [RankBudget(self)]

    def _load_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        super()._load_tensors(tensors, name)
        # peft cuts each layer to its kept ranks with new parameters in the base model's dtype; on a bf16/fp16 base
        # they go back to float32, as every adapter peftlab trains and loads is kept
        cast_adapter_dtype(self.model, name)


class RankBudget(TrainerCallback):
    """AdaLoRA's schedule: after every optimizer step, before the gradients are zeroed, peft scores each singular
    value and masks the least important (``update_and_allocate``); at the end the kept ranks go into the config."""

    def __init__(self, wrapper: AdaLoraModel) -> None:
        self.wrapper = wrapper

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        for name, config in self.wrapper.adapters.items():
            if config.total_step != state.max_steps:
                raise ValueError(f"adalora adapter {name!r}: total_step is {config.total_step} but this run takes "
                                 f"{state.max_steps} optimizer steps; set them equal (training.max_steps)")

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.wrapper.model.base_model.update_and_allocate(state.global_step)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        for name, config in self.wrapper.adapters.items():
            kept = self.wrapper.model.peft_config[name].rank_pattern
            self.wrapper.adapters[name] = replace(config, rank_pattern=kept)


class AdaLoraMethod(PeftTunerMethod):
    name = "adalora"
    config_class = AdaLoraConfig
    model_class = AdaLoraModel
    peft_type = "ADALORA"
    not_composable_because = ("an adaptive-rank update P·diag(λ)·Q is scaled per layer by alpha over the number of "
                              "ranks it kept, and those numbers differ between adapters: the factors of two adapters "
                              "do not add up to the sum of their updates. Merge each (peftlab merge) and compose the "
                              "model folders")

"""Bitune (Kopiczko et al., 2024): the prompt read causally and bidirectionally, each with its own adapter.

A saved Bitune module holds both adapters in peft's own layout (the causal one at the top, the bidirectional one in
``bidir/``) and ``bitune.safetensors`` with the 2 x n_layers mixing coefficients (``mixer.key_weight``,
``mixer.value_weight``); ``peftlab.json`` records the variant, gate and eps.
"""

from __future__ import annotations

from pathlib import Path

import peft
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from peftlab.methods import Method, get_method, register
from peftlab.methods.bitune.model import BIDIR, CAUSAL, BituneConfig, BituneModel

WEIGHTS = "bitune.safetensors"


def _adapter_config(config: BituneConfig) -> peft.PeftConfig:
    settings = dict(config.adapter)
    method = get_method(settings.pop("name", "lora"))
    return method.config_class.from_dict(settings, where="bitune.adapter").to_peft()


class BituneMethod(Method):
    name = "bitune"
    config_class = BituneConfig
    trainer_checkpoints = False  # two adapters and a mixer: saved together by save_weights

    def attach(self, model: PreTrainedModel, config: BituneConfig) -> BituneModel:
        adapter = _adapter_config(config)
        wrapped = peft.get_peft_model(model, adapter, adapter_name=CAUSAL)
        if BIDIR in config.adapters:
            wrapped.add_adapter(BIDIR, adapter)
        wrapped.set_requires_grad(config.adapters, True)
        return BituneModel(wrapped, config)

    def save_weights(self, model: BituneModel, folder: Path) -> None:
        model.model.save_pretrained(folder)  # peft writes the second adapter into folder/bidir
        if model.mixer is not None:
            tensors = {f"mixer.{k}": v.detach().contiguous() for k, v in model.mixer.state_dict().items()}
            save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", "gate": model.mixer.gate,
                                                                 "eps": str(model.mixer.eps)})

    def _load_mixer(self, model: BituneModel, folder: Path) -> None:
        if model.mixer is None:
            return
        path = folder / WEIGHTS
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no {WEIGHTS} (the mixing coefficients of variant "
                                    f"{model.bitune_config.variant!r})")
        tensors = {k.removeprefix("mixer."): v for k, v in load_file(str(path)).items()}
        expected = {k: tuple(v.shape) for k, v in model.mixer.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if found != expected:
            raise ValueError(f"{path}: mixer tensors {found} do not fit this model (expected {expected})")
        model.mixer.load_state_dict(tensors)

    def load_weights(self, model: BituneModel, folder: Path) -> None:
        for adapter in model.bitune_config.adapters:
            source = folder if adapter == CAUSAL else folder / adapter
            peft.set_peft_model_state_dict(model.model, peft.utils.load_peft_weights(str(source)),
                                           adapter_name=adapter)
        self._load_mixer(model, folder)

    def load(self, model: PreTrainedModel, folder: Path, config: BituneConfig, trainable: bool) -> BituneModel:
        wrapped = peft.PeftModel.from_pretrained(model, folder, adapter_name=CAUSAL, is_trainable=trainable)
        if BIDIR in config.adapters:
            wrapped.load_adapter(folder / BIDIR, adapter_name=BIDIR, is_trainable=trainable)
        wrapped.set_requires_grad(config.adapters, trainable)
        bitune = BituneModel(wrapped, config)
        self._load_mixer(bitune, folder)
        if bitune.mixer is not None:
            bitune.mixer.requires_grad_(trainable)
        return bitune.train(trainable)


register(BituneMethod())

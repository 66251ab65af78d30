"""ReFT: low-rank interventions on hidden representations (LoReFT and family), native on transformers 5.

A saved ReFT module holds ``reft.safetensors`` (one tensor per intervention parameter, keyed
``{intervention key}.{name}`` with pyreft's intervention keys) and, when a LoRA is trained alongside, a ``lora/``
peft adapter folder. ``peftlab.methods.reft.pyreft_format`` reads and writes pyreft's own layout.
"""

from __future__ import annotations

from pathlib import Path

import peft
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from peftlab.methods import Method, register
from peftlab.methods.lora import LoraConfig
from peftlab.methods.reft.interventions import INTERVENTIONS
from peftlab.methods.reft.model import ReftConfig, ReftModel

WEIGHTS = "reft.safetensors"
LORA_DIR = "lora"


class ReftMethod(Method):
    """One registered method per intervention type (loreft, noreft, direft, direft_orth, consreft, lobireft)."""

    config_class = ReftConfig
    trainer_checkpoints = False
    supports_packing = True  # positions are found per example inside a packed row (see model.prompt_spans)

    def __init__(self, name: str) -> None:
        self.name = name

    def attach(self, model: PreTrainedModel, config: ReftConfig) -> ReftModel:
        if config.lora is not None:
            lora = LoraConfig.from_dict(config.lora, where=f"{self.name}.lora")
            model = peft.get_peft_model(model, lora.to_peft())
        else:
            model.requires_grad_(False)
        return ReftModel(model, config, self.name)

    def save_weights(self, model: ReftModel, folder: Path) -> None:
        tensors = {f"{key}.{name}": t.contiguous() for key, iv in model.interventions.items()
                   for name, t in iv.export_state().items()}
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", "intervention": self.name})
        if model.reft_config.lora is not None:
            model.model.save_pretrained(folder / LORA_DIR)

    def _load_interventions(self, model: ReftModel, folder: Path) -> None:
        path = folder / WEIGHTS
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no {WEIGHTS}")
        tensors = load_file(str(path))
        for key, iv in model.interventions.items():
            state = {name[len(key) + 1:]: t for name, t in tensors.items() if name.startswith(key + ".")}
            if not state:
                raise ValueError(f"{path}: no tensors for intervention {key}; has {sorted(tensors)[:4]}...")
            iv.import_state(state, f"{path}:{key}")
        unknown = {name.split(".", 1)[0] for name in tensors} - set(model.interventions)
        if unknown:
            raise ValueError(f"{path}: interventions {sorted(unknown)} are not in this config")

    def load_weights(self, model: ReftModel, folder: Path) -> None:
        self._load_interventions(model, folder)
        if model.reft_config.lora is not None:
            weights = peft.utils.load_peft_weights(str(folder / LORA_DIR))
            peft.set_peft_model_state_dict(model.model, weights)

    def load(self, model: PreTrainedModel, folder: Path, config: ReftConfig, trainable: bool) -> ReftModel:
        if config.lora is not None:
            model = peft.PeftModel.from_pretrained(model, folder / LORA_DIR, is_trainable=trainable)
        else:
            model.requires_grad_(False)
        wrapped = ReftModel(model, config, self.name)
        self._load_interventions(wrapped, folder)
        wrapped.interventions.requires_grad_(trainable)
        return wrapped.train(trainable)


for _name in INTERVENTIONS:
    register(ReftMethod(_name))

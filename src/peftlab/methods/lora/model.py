"""LoRA, DoRA and IA3 through peft. A saved adapter is a plain peft folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads unchanged."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from peftlab.methods.base import DEFAULT_ADAPTER, Method, PeftlabModel
from peftlab.methods.lora.config import IA3Config, LoraConfig, PeftConfigMixin

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def write_peft_folder(folder: Path, config: peft.PeftConfig, tensors: dict[str, torch.Tensor],
                      base_model: str | None) -> None:
    """One peft adapter folder from its config and its tensors (keys as peft saves them)."""
    config = copy.copy(config)
    config.base_model_name_or_path = base_model
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})


def read_peft_folder(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / PEFT_WEIGHTS
    if not path.exists():
        pickled = folder / "adapter_model.bin"
        raise FileNotFoundError(f"{folder}: no {PEFT_WEIGHTS}" + (
            f"; {pickled.name} is a pickle, which peftlab does not load (it can run code): re-save it with "
            f"safetensors (peft: save_pretrained(..., safe_serialization=True))" if pickled.exists() else ""))
    return load_file(str(path))


def get_peft_model(model: nn.Module, config: peft.PeftConfig, **kwargs) -> peft.PeftModel:
    """``peft.get_peft_model`` without the transformers 5 deprecation warning that peft's own code raises (it reads
    ``is_gradient_checkpointing``, now ``is_activation_checkpointing``): users would see it on every attach."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return peft.get_peft_model(model, config, **kwargs)


class PeftAdapterModel(PeftlabModel):
    """A causal LM with one peft adapter (LoRA, DoRA or IA3) under peftlab's protocol."""

    def add_adapter(self, name: str, config: PeftConfigMixin) -> None:
        try:
            self.model = get_peft_model(self.model, config.to_peft(), adapter_name=name)
        except ValueError as e:
            raise ValueError(f"{self.method.name}: cannot attach to {type(self.model).__name__} "
                             f"({self.model.config.model_type}): {e}. Set target_modules explicitly.") from e
        self.adapters[name] = config

    def adapter_state_dict(self, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        state = peft.get_peft_model_state_dict(self.model, adapter_name=name)
        return {k: v.detach() for k, v in state.items()}

    def _load_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        peft.set_peft_model_state_dict(self.model, tensors, adapter_name=name)

    def _detach(self) -> PreTrainedModel:
        return self.model.unload()

    def _merge(self) -> PreTrainedModel:
        return self.model.merge_and_unload()


class PeftFolderFiles:
    """For methods whose adapters are saved as plain peft folders (their config is a ``PeftConfigMixin``)."""

    def write_files(self, folder: Path, config: PeftConfigMixin, tensors: dict[str, torch.Tensor],
                    base_model: str | None) -> None:
        write_peft_folder(folder, config.to_peft(), tensors, base_model)

    def read_files(self, folder: Path, config: PeftConfigMixin) -> dict[str, torch.Tensor]:
        return read_peft_folder(folder)


class PeftAdapterMethod(PeftFolderFiles, Method):
    """A method that is one peft adapter: peft computes, peftlab keeps the protocol and the format."""

    model_class = PeftAdapterModel
    mergeable = True
    supports_packing = True


class LoraMethod(PeftAdapterMethod):
    name = "lora"
    config_class = LoraConfig
    composable = "low_rank"
    lora_adapters = True
    peft_type = "LORA"

    def why_not_composable(self, config: LoraConfig) -> str | None:
        for setting, bad in (("use_dora", config.use_dora), ("bias", config.bias != "none")):
            if bad:
                return (f"it has {setting}={getattr(config, setting)!r}, so its update is not B·A alone (DoRA "
                        f"renormalises W + ΔW, a trained bias adds a term) and sums of modules are undefined here. "
                        f"Merge it (peftlab merge) and compose the model folders")
        return None


class IA3Method(PeftAdapterMethod):
    name = "ia3"
    config_class = IA3Config
    composable = "scaling"
    peft_type = "IA3"

"""MultiLoRA: many LoRAs in one model, trained and served in one batch, one adapter per example.

Each target linear layer becomes a ``MultiLoraLinear`` holding every adapter stacked; the wrapper keeps the names
(their order is the slot order) and maps each call's ``adapter_names`` to slots (``__base__``: the base model
alone). A saved adapter is a plain peft LoRA folder (peft's key names and config), so every adapter of a module can
be loaded by peft alone, and peft LoRA folders come in as adapters.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from transformers import PreTrainedModel

from peftlab.methods.base import DEFAULT_ADAPTER, Method, PeftlabModel
from peftlab.methods.lora.model import PeftFolderFiles
from peftlab.methods.multilora.config import MultiLoraConfig
from peftlab.methods.multilora.layer import MultiLoraLinear

PEFT_PREFIX = "base_model.model."  # what peft puts before a module's name in its state dict


def target_names(model: PreTrainedModel, targets: list[str] | str | None) -> list[str]:
    """The qualified names of the linear layers ``targets`` selects, as peft selects them: "all-linear" is every
    linear layer but the output head; a list matches a module whose name is, or ends with ".", an entry."""
    head = model.get_output_embeddings()
    wrapped = {n for n, m in model.named_modules() if isinstance(m, MultiLoraLinear)}
    linear = [n for n, m in model.named_modules() if (n in wrapped or isinstance(m, nn.Linear)) and m is not head
              and n.rsplit(".", 1)[0] not in wrapped]
    if targets == "all-linear":
        return linear
    wanted = [targets] if isinstance(targets, str) else list(targets or [])
    return [n for n in linear if any(n == t or n.endswith("." + t) for t in wanted)]


def canonical_targets(model: PreTrainedModel, names: list[str]) -> list[str]:
    """The shortest list that selects exactly ``names``: their last components, unless that selects more."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return short if target_names(model, short) == names else names


class MultiLoraModel(PeftlabModel):
    """A causal LM whose target layers each hold every adapter; a call routes each example to its own."""

    def __init__(self, model: PreTrainedModel, method: Method) -> None:
        super().__init__(model, method)
        self.lora_layers: dict[str, MultiLoraLinear] = {}  # qualified name -> layer (they live inside the model)

    # --- adapters ----------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: MultiLoraConfig) -> None:
        self.add_adapters({name: config})

    def add_adapters(self, configs: dict[str, MultiLoraConfig]) -> None:
        """Append adapters to every target layer at once (one copy of the stacked tensors, however many)."""
        if not configs:
            return
        targets = {name: target_names(self.causal_lm, c.target_modules) for name, c in configs.items()}
        first = next(iter(configs))
        if not targets[first]:
            raise ValueError(f"target_modules {configs[first].target_modules!r} match no linear layer of "
                             f"{type(self.causal_lm).__name__}")
        shared = next(iter(self.adapters.values()), configs[first])
        reference = (list(self.lora_layers) or targets[first], shared.dropout)
        for name, config in configs.items():
            if (targets[name], config.dropout) != reference:
                raise ValueError(f"adapter {name!r} targets {canonical_targets(self.causal_lm, targets[name])} with "
                                 f"dropout {config.dropout}; this model's adapters share targets "
                                 f"{canonical_targets(self.causal_lm, reference[0])} and dropout {reference[1]}")
        if not self.lora_layers:
            self._inject(reference[0], reference[1])
        base_seed = torch.initial_seed()  # each adapter's init depends on its name, not on what trains beside it
        for module, layer in self.lora_layers.items():
            layer.grow([c.r for c in configs.values()], [c.scaling for c in configs.values()],
                       [zlib.crc32(f"{base_seed}/{name}/{module}".encode()) for name in configs])
        written = canonical_targets(self.causal_lm, reference[0])
        for name, config in configs.items():  # the targets by name, so a saved adapter says what it touched
            self.adapters[name] = MultiLoraConfig(**{**config.to_dict(), "target_modules": written})

    def _inject(self, names: list[str], dropout: float) -> None:
        self.causal_lm.requires_grad_(False)
        for name in names:
            parent, child = name.rsplit(".", 1)
            base = self.causal_lm.get_submodule(name)
            layer = MultiLoraLinear(base, self.context, dropout)
            setattr(self.causal_lm.get_submodule(parent), child, layer)
            self.lora_layers[name] = layer

    def remove_adapter(self, name: str) -> None:
        """Drop one adapter from every layer (serving unloads adapters without rebuilding the model)."""
        slot = self._slot(name)
        for layer in self.lora_layers.values():
            layer.drop(slot)
        del self.adapters[name]

    def _slot(self, name: str) -> int:
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} in this model; it has {sorted(self.adapters)}")
        return list(self.adapters).index(name)

    # --- tensors -----------------------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """Adapter ``name`` in peft's keys and shapes (its own rank, not the padded one)."""
        slot, r = self._slot(name), self.adapters[name].r
        state = {}
        for module, layer in self.lora_layers.items():
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = layer.lora_A[slot, :r].detach()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = layer.lora_B[slot, :, :r].detach()
        return state

    def _load_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        slot, r = self._slot(name), self.adapters[name].r
        for module, layer in self.lora_layers.items():
            layer.lora_A[slot, :r] = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"]
            layer.lora_B[slot, :, :r] = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]

    def _detach(self) -> PreTrainedModel:
        for name, layer in self.lora_layers.items():
            parent, child = name.rsplit(".", 1)
            setattr(self.causal_lm.get_submodule(parent), child, layer.base_layer)
        self.lora_layers = {}
        return self.model

    # --- training ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each adapter's gradient to ``max_norm`` on its own (a global norm would couple the adapters: one
        with large gradients would shrink every other's step). Returns the global norm, for logging."""
        squares = sum((layer.lora_A.grad.pow(2).sum((1, 2)) + layer.lora_B.grad.pow(2).sum((1, 2))
                       for layer in self.lora_layers.values() if layer.lora_A.grad is not None),
                      torch.zeros(len(self.adapters)))
        norms = squares.sqrt()
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for layer in self.lora_layers.values():
            if layer.lora_A.grad is not None:
                layer.lora_A.grad.mul_(factor[:, None, None])
                layer.lora_B.grad.mul_(factor[:, None, None])
        return squares.sum().sqrt()


class MultiLoraMethod(PeftFolderFiles, Method):
    name = "multilora"
    config_class = MultiLoraConfig
    model_class = MultiLoraModel
    composable = True
    supports_packing = True
    routable = True

"""MultiLoRA: many LoRAs in one model, trained and served in one batch, one adapter per example.

Each target linear layer becomes a ``MultiLoraLinear`` holding every adapter stacked; the wrapper keeps the names
(their order is the slot order) and maps each call's ``adapter_names`` to slots (``__base__``: the base model
alone). A saved adapter is a plain peft LoRA folder (peft's key names and config), so every adapter of a module can
be loaded by peft alone, and peft LoRA folders come in as adapters.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from peftlab.context import BASE_ADAPTER
from peftlab.methods.base import DEFAULT_ADAPTER, AdapterMismatchError, Method, MethodConfig, PeftlabModel
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


def layer_shapes(model: PreTrainedModel, layers: list[str]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each of ``layers`` (a layer already wrapped by MultiLoRA: its base layer's)."""
    shapes = {}
    for layer in layers:
        linear = model.get_submodule(layer)
        linear = getattr(linear, "base_layer", linear)
        shapes[layer] = (linear.in_features, linear.out_features)
    return shapes


def lora_shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each layer a LoRA's tensors (peft's keys) are on, read off the factors."""
    shapes: dict[str, list[int]] = {}
    for key, tensor in tensors.items():
        layer, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if factor == "A.weight":
            shapes.setdefault(layer, [0, 0])[0] = tensor.shape[1]
        elif factor == "B.weight":
            shapes.setdefault(layer, [0, 0])[1] = tensor.shape[0]
    return {layer: (i, o) for layer, (i, o) in shapes.items()}


def zero_padded(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                rank: int) -> dict[str, torch.Tensor]:
    """A LoRA's tensors (peft's keys) on every layer of ``shapes`` (name -> (in, out)): zeros where it has none.
    This is the one rule by which LoRAs of different targets become adapters of one routed module: a zero factor
    is an exact no-op. Tensors on a layer outside ``shapes`` are refused."""
    out = {}
    for layer, (fan_in, fan_out) in shapes.items():
        for key, shape in ((f"{PEFT_PREFIX}{layer}.lora_A.weight", (rank, fan_in)),
                           (f"{PEFT_PREFIX}{layer}.lora_B.weight", (fan_out, rank))):
            out[key] = tensors.get(key, torch.zeros(shape))
    outside = sorted(set(tensors) - set(out))
    if outside:
        raise AdapterMismatchError(f"LoRA tensors {outside[:3]} are not on the layers this module routes "
                                   f"({sorted(shapes)[:6]}{' ...' if len(shapes) > 6 else ''})")
    return out


def _sorted_targets(targets: list[str] | str | None) -> tuple[str, ...] | str | None:
    return tuple(sorted(targets)) if isinstance(targets, (list, tuple, set)) else targets


def canonical_targets(model: PreTrainedModel, names: list[str]) -> list[str]:
    """The shortest list that selects exactly ``names``: their last components, unless that selects more."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return short if target_names(model, short) == names else names


class MultiLoraModel(PeftlabModel):
    """A causal LM whose target layers each hold every adapter; a call routes each example to its own."""

    def __init__(self, model: PreTrainedModel, method: Method) -> None:
        super().__init__(model, method)
        self.lora_layers: dict[str, MultiLoraLinear] = {}  # qualified name -> layer (they live inside the model)
        self.shared: dict[str, MultiLoraConfig] = {}  # at most one adapter that every example runs with

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

    def add_shared_adapter(self, name: str, config: MultiLoraConfig) -> None:
        """One adapter that every example runs with, beside its own routed one (DIT: a shared reader of per-example
        weight diffs). It lives on the layers of the routed adapters that its ``target_modules`` select."""
        if self.shared:
            raise ValueError(f"this model already has the shared adapter {next(iter(self.shared))!r}")
        if name in self.adapters or name == BASE_ADAPTER:
            raise ValueError(f"adapter name {name!r} is taken; choose another for the shared adapter")
        targets = target_names(self.causal_lm, config.target_modules)
        if not self.lora_layers:
            self._inject(targets, config.dropout)
        outside = sorted(set(targets) - set(self.lora_layers))
        if outside or not targets:
            raise ValueError(f"shared adapter {name!r}: target_modules {config.target_modules!r} select "
                             f"{'no layer' if not targets else outside[:3]} outside this model's adapter layers "
                             f"{canonical_targets(self.causal_lm, list(self.lora_layers))}")
        base_seed = torch.initial_seed()
        for module in targets:
            self.lora_layers[module].add_shared(config.r, config.scaling,
                                                zlib.crc32(f"{base_seed}/{name}/{module}".encode()))
        self.shared[name] = MultiLoraConfig(**{**config.to_dict(),
                                               "target_modules": canonical_targets(self.causal_lm, targets)})

    def remove_shared_adapter(self) -> None:
        for layer in self.lora_layers.values():
            layer.remove_shared()
        self.shared = {}

    def joinable(self, adapter: Any, tensors: dict[str, torch.Tensor]) -> tuple[MultiLoraConfig, dict] | None:
        """A plain LoRA (no DoRA, no trained bias, on linear layers of this model) as one of this model's adapters,
        zero-padded to every linear layer (``join``); None for anything else."""
        from peftlab.methods import get_method

        if not get_method(adapter.method).lora_adapters:
            return None
        try:
            config = MultiLoraConfig.from_dict({**adapter.config, "dropout": 0.0})
        except ValueError:
            return None
        layers = target_names(self.causal_lm, "all-linear")
        if not set(tensors) <= {f"{PEFT_PREFIX}{m}.lora_{f}.weight" for m in layers for f in "AB"}:
            return None
        (joined,) = self.method.join({"": (config, tensors)}, layer_shapes(self.causal_lm, layers)).values()
        return joined

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
    def has_adapter(self, name: str) -> bool:
        return name in self.adapters or name in self.shared

    def _factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adapter ``name``'s (A [r, in], B [out, r]) per module, as views of the layers' tensors."""
        if name in self.shared:
            return {m: (layer.shared_A, layer.shared_B) for m, layer in self.lora_layers.items()
                    if layer.shared_A is not None}
        slot, r = self._slot(name), self.adapters[name].r
        return {m: (layer.lora_A[slot, :r], layer.lora_B[slot, :, :r]) for m, layer in self.lora_layers.items()}

    def adapter_state_dict(self, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """Adapter ``name`` (routed or shared) in peft's keys and shapes (its own rank, not the padded one)."""
        state = {}
        for module, (a, b) in self._factors(name).items():
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.detach()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.detach()
        return state

    def _load_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        for module, (a, b) in self._factors(name).items():
            a.copy_(tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"])
            b.copy_(tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"])

    def _detach(self) -> PreTrainedModel:
        for name, layer in self.lora_layers.items():
            parent, child = name.rsplit(".", 1)
            setattr(self.causal_lm.get_submodule(parent), child, layer.base_layer)
        self.lora_layers, self.shared = {}, {}
        return self.model

    # --- training ----------------------------------------------------------------------------------------------
    clips_its_own_way = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each adapter's gradient (the shared one's too) to ``max_norm`` on its own (a global norm would couple
        the adapters: one with large gradients would shrink every other's step). Returns the global norm."""
        layers = self.lora_layers.values()
        device = next(iter(layers)).lora_A.device
        squares = sum((layer.lora_A.grad.float().pow(2).sum((1, 2)) + layer.lora_B.grad.float().pow(2).sum((1, 2))
                       for layer in layers if layer.lora_A.grad is not None),
                      torch.zeros(len(self.adapters), device=device))
        shared = [p.grad for layer in layers for p in (layer.shared_A, layer.shared_B)
                  if p is not None and p.grad is not None]
        shared_square = sum((g.float().pow(2).sum() for g in shared), torch.zeros((), device=device))
        factor = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for layer in layers:
            if layer.lora_A.grad is not None:
                layer.lora_A.grad.mul_(factor[:, None, None])
                layer.lora_B.grad.mul_(factor[:, None, None])
        for g in shared:
            g.mul_((max_norm / (shared_square.sqrt() + 1e-6)).clamp(max=1.0))
        return (squares.sum() + shared_square).sqrt()


class MultiLoraMethod(PeftFolderFiles, Method):
    name = "multilora"
    config_class = MultiLoraConfig
    model_class = MultiLoraModel
    not_mergeable_because = ("it holds many adapters, one per example: export one (peftlab multilora export) and "
                             "merge that")
    not_composable_because = ("it holds many adapters: export them (peftlab multilora export) and compose the LoRA "
                              "folders")
    supports_packing = True
    routable = True
    lora_adapters = True
    each_adapter_as = "lora"

    def join(self, adapters: dict[str, tuple[MethodConfig, dict[str, torch.Tensor]]],
             shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[MethodConfig, dict]]:
        """LoRAs as adapters of one routed module. Adapters of one set of targets join as they are; otherwise each
        is zero-padded (``zero_padded``) to the union of their layers, or to ``shapes`` (the layers a model routes,
        name -> (in, out)), and every adapter then names those layers as its targets."""
        targets = {_sorted_targets(config.target_modules) for config, _ in adapters.values()}
        if shapes is None and len(targets) == 1:
            return adapters
        if shapes is None:
            shapes = {}
            for _, tensors in adapters.values():
                shapes.update(lora_shapes(tensors))
            shapes = dict(sorted(shapes.items()))
        return {name: (replace(config, target_modules=list(shapes)), zero_padded(tensors, shapes, config.r))
                for name, (config, tensors) in adapters.items()}

    def describe(self, configs: dict[str, dict[str, Any]]) -> dict[str, str]:
        ranks = sorted({c.get("r") for c in configs.values()} - {None})
        if len(ranks) < 2:
            return {}
        return {"ranks": f"{ranks}: served zero-padded to rank {ranks[-1]} in one stacked tensor per layer (exact: "
                         f"the padding is zeros and stays zero)"}

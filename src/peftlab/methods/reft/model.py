"""ReFT on any transformers causal LM through forward hooks that touch only their own handles.

One pre-hook on the causal LM works out, for each call, which positions are intervened (a boolean mask [B, T]
per position group), from the attention mask (either padding side) and the labels (the prompt ends where the
labels begin). Layer hooks then replace h by Φ(h) where the mask is set. During generation a call whose KV cache
already holds tokens is a decode step: in ``prompt`` mode nothing is touched there, so decoding costs what the base
model costs; in ``every_token`` mode each new token is intervened too (and training intervenes every response
token, so the two match).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from peftlab.methods import MethodConfig, ModelWrapper, cache_in
from peftlab.methods.reft.interventions import INTERVENTIONS

COMPONENTS = ("block_output", "block_input", "attention_output", "mlp_output")
GENERATION_MODES = ("prompt", "every_token")
_POSITIONS = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")
IGNORE_INDEX = -100


@dataclass
class ReftConfig(MethodConfig):
    """Where and how to intervene. The intervention type comes from the method name (loreft, direft, ...).

    layers: a list of layer indices, one index, "all", or "middle" (num_layers // 2).
    positions: "f{p}+l{s}": the first p and last s prompt positions (the paper's notation; "l1" = last token).
    share_weights: one intervention per layer for all positions (tied) or one for the prefix, one for the suffix.
    generation: "prompt" (the paper's default: intervene the prompt only) or "every_token".
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
    lora: dict[str, Any] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"component {self.component!r} is not one of {COMPONENTS}")
        if self.generation not in GENERATION_MODES:
            raise ValueError(f"generation {self.generation!r} is not one of {GENERATION_MODES}")
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


def prompt_spans(attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                 position_ids: torch.Tensor | None, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Per token: [start, end) of the prompt of the example it belongs to, and whether it is a real token.

    Padded batches (either side): an example is a row; its prompt runs from the first real token up to the first
    labelled token (training) or to the last real token (inference). Packed rows (position_ids, no attention mask,
    as transformers reads them): an example starts wherever position_ids is 0.
    """
    width = shape[1]
    idx = torch.arange(width, device=_device_of(attention_mask, labels, position_ids))[None].expand(shape)
    labelled = labels != IGNORE_INDEX if labels is not None else None
    if attention_mask is None and position_ids is not None:
        seg = (position_ids == 0).long().cumsum(-1) - 1  # example index of each token within its row
        start = torch.zeros(shape, dtype=torch.long, device=idx.device).scatter_reduce(
            1, seg, idx, "amin", include_self=False).gather(1, seg)
        seg_end = torch.zeros(shape, dtype=torch.long, device=idx.device).scatter_reduce(
            1, seg, idx + 1, "amax", include_self=False).gather(1, seg)
        end = seg_end
        if labelled is not None:
            first_label = torch.full(shape, width, device=idx.device).scatter_reduce(
                1, seg, torch.where(labelled, idx, width), "amin", include_self=True).gather(1, seg)
            end = torch.minimum(first_label, seg_end)
        return start, end, torch.ones(shape, dtype=torch.bool, device=idx.device)
    real = attention_mask.bool() if attention_mask is not None else torch.ones(shape, dtype=torch.bool,
                                                                                 device=idx.device)
    start = (real.cumsum(-1) == 0).sum(-1)
    end = width - (real.flip(-1).cumsum(-1) == 0).sum(-1)
    if labelled is not None:
        end = torch.where(labelled.any(-1), labelled.int().argmax(-1), end)
    return start[:, None].expand(shape), end[:, None].expand(shape), real


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    return next(t.device for t in tensors if t is not None)


def position_masks(start: torch.Tensor, end: torch.Tensor, real: torch.Tensor, first: int, last: int,
                   every_token: bool) -> dict[str, torch.Tensor]:
    """Boolean masks [B, T] for the groups "first", "last" and "all" (= both) of the ReFT positions.

    ``start``/``end`` give each token's prompt span (see ``prompt_spans``). When a prompt of n tokens is shorter
    than first + last, the paper's rule applies: first <- min(first, n // 2) and last <- min(last, ceil(n / 2)),
    so the two never overlap. With ``every_token`` the tokens after the prompt join the "last" group.
    """
    n = end - start
    if first and last:
        short = n < first + last
        p = torch.where(short, (n // 2).clamp(max=first), torch.full_like(n, first))
        s = torch.where(short, ((n + 1) // 2).clamp(max=last), torch.full_like(n, last))
    else:
        p, s = n.clamp(max=first), n.clamp(max=last)
    idx = torch.arange(start.shape[1], device=start.device)[None]
    first_mask = (idx >= start) & (idx < start + p)
    last_mask = (idx >= end - s) & (idx < end)
    if every_token:
        last_mask = last_mask | (real & (idx >= end))
    return {"first": first_mask, "last": last_mask, "all": first_mask | last_mask}


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The list of decoder blocks: the ModuleList as long as ``config.num_hidden_layers``."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: found no list of {n} decoder layers to hook")


def _component_module(layer: nn.Module, component: str) -> nn.Module:
    if component in ("block_output", "block_input"):
        return layer
    names = ("self_attn", "attn", "attention") if component == "attention_output" else ("mlp", "feed_forward")
    for name in names:
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ValueError(f"{type(layer).__name__} has none of {names} for component {component!r}")


def _unwrap(model: nn.Module) -> PreTrainedModel:
    """The causal LM inside a peft wrapper (ReFT stacked on LoRA), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ReftModel(ModelWrapper):
    """A causal LM (optionally with a LoRA) plus ReFT interventions; forward and generate are the model's own."""

    def __init__(self, model: nn.Module, config: ReftConfig, kind: str) -> None:
        super().__init__()
        if kind not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {kind!r}; choose from {sorted(INTERVENTIONS)}")
        self.model = model
        self.reft_config = config
        self.kind = kind
        base = _unwrap(model)
        layers = decoder_layers(base)
        d = base.config.hidden_size
        dtype = getattr(torch, config.dtype)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.interventions = nn.ModuleDict()
        self.groups: dict[str, str] = {}
        self._masks: dict[str, torch.Tensor | None] = {}
        self._handles = [base.register_forward_pre_hook(self._on_call, with_kwargs=True)]
        groups = ["all"] if config.tied else ["first", "last"]
        kwargs = {"dropout": config.dropout, "act": config.act, "dtype": dtype}
        if kind in ("noreft", "direft"):
            kwargs["add_bias"] = config.add_bias
        for layer in config.layer_indices(len(layers)):
            keys = []
            for k, group in enumerate(groups):
                key = f"layer_{layer}_comp_{config.component}_unit_pos_nunit_1#{k}"
                self.interventions[key] = INTERVENTIONS[kind](d, config.rank, **kwargs)
                self.groups[key] = group
                keys.append(key)
            self._handles.append(self._hook(_component_module(layers[layer], config.component), keys))
        self.interventions.to(next(base.parameters()).device)
        self.train(model.training)

    # --- hooks -------------------------------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        cache = cache_in(kwargs)
        if cache is not None and cache.get_seq_length() > 0:  # a decode step of generate()
            new = None
            if self.reft_config.generation == "every_token":
                new = torch.ones(shape, dtype=torch.bool, device=self._device())
            self._masks = {"first": None, "last": new, "all": new}
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"ReFT needs a 2-D attention mask [batch, tokens], got shape {tuple(mask.shape)}")
        if mask is None and kwargs.get("position_ids") is None:
            mask = torch.ones(shape, dtype=torch.long, device=self._device())
        spans = prompt_spans(mask, kwargs.get("labels"), kwargs.get("position_ids"), shape)
        self._masks = position_masks(*spans, self.reft_config.first, self.reft_config.last,
                                     self.reft_config.generation == "every_token")

    def _intervene(self, keys: list[str], h: torch.Tensor) -> torch.Tensor:
        for key in keys:
            mask = self._masks.get(self.groups[key])
            if mask is None:
                continue
            if mask.shape != h.shape[:2]:
                raise RuntimeError(f"{key}: position mask {tuple(mask.shape)} does not fit hidden states "
                                   f"{tuple(h.shape)}; was the model called with packed or sliced inputs?")
            h = torch.where(mask[..., None], self.interventions[key](h), h)
        return h

    def _hook(self, module: nn.Module, keys: list[str]) -> torch.utils.hooks.RemovableHandle:
        if self.reft_config.component == "block_input":
            def pre_hook(mod, args, kwargs):
                if args:
                    return (self._intervene(keys, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self._intervene(keys, kwargs["hidden_states"])}
            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(mod, args, output):
            if isinstance(output, tuple):
                return (self._intervene(keys, output[0]), *output[1:])
            return self._intervene(keys, output)
        return module.register_forward_hook(hook)

    def remove_hooks(self) -> None:
        """Detach from the model (only peftlab's own hooks are removed)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- the model's interface ---------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

"""ReFT on any transformers causal LM through forward hooks that touch only their own handles.

One pre-hook on the causal LM works out, for each call, which positions are intervened (a boolean mask [B, T]
per position group), from the attention mask (either padding side) or the packed positions, and from where each
prompt ends (``prompt_lengths`` in the call's context; without it the whole input is the prompt). Layer hooks then
replace h by Φ(h) where the mask is set. During generation a call whose KV cache already holds tokens is a decode
step: in ``prompt`` mode nothing is touched there, so decoding costs what the base model costs; in
``every_token`` mode each new token is intervened too (and training intervenes every answer token, so the two
match).

A saved ReFT adapter holds ``reft.safetensors`` (one tensor per intervention parameter, keyed
``{intervention key}.{name}`` with pyreft's intervention keys) and, when a LoRA is trained alongside, a ``lora/``
peft adapter folder. ``peftlab.methods.reft.pyreft_format`` reads and writes pyreft's own layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from peftlab.context import per_token
from peftlab.methods.base import DEFAULT_ADAPTER, Method, PeftlabModel, is_decode_step
from peftlab.methods.lora import LoraConfig, get_peft_model, read_peft_folder, write_peft_folder
from peftlab.methods.reft.config import ReftConfig
from peftlab.methods.reft.layer import INTERVENTIONS

WEIGHTS = "reft.safetensors"
LORA = "lora"  # the folder, and the key prefix, of a LoRA trained alongside


def prompt_spans(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 prompt_lengths: torch.Tensor | None, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Per token: [start, end) of the prompt of the example it belongs to, and whether it is a real token.

    Padded batches (either side): an example is a row; its prompt runs from its first real token for
    ``prompt_lengths`` tokens, or to its last real token. Packed rows (position_ids, no attention mask, as
    transformers reads them): an example starts wherever position_ids is 0.
    """
    width = shape[1]
    device = next(t.device for t in (attention_mask, position_ids) if t is not None)
    idx = torch.arange(width, device=device)[None].expand(shape)
    if attention_mask is None:
        seg = (position_ids == 0).long().cumsum(-1) - 1  # example index of each token within its row
        start = idx - position_ids
        end = torch.zeros(shape, dtype=torch.long, device=device).scatter_reduce(
            1, seg, idx + 1, "amax", include_self=False).gather(1, seg)
        if prompt_lengths is not None:
            end = torch.minimum(start + per_token(prompt_lengths, shape), end)
        return start, end, torch.ones(shape, dtype=torch.bool, device=device)
    real = attention_mask.bool()
    start = (real.cumsum(-1) == 0).sum(-1)
    end = width - (real.flip(-1).cumsum(-1) == 0).sum(-1)
    if prompt_lengths is not None:
        end = torch.minimum(start + per_token(prompt_lengths, shape)[:, 0], end)
    return start[:, None].expand(shape), end[:, None].expand(shape), real


def position_masks(start: torch.Tensor, end: torch.Tensor, real: torch.Tensor, first: int, last: int,
                   every_token: bool, short_prompts: str = "paper", end_offset: int = 0) -> dict[str, torch.Tensor]:
    """Boolean masks [B, T] for the groups "first", "last" and "all" (= both) of the ReFT positions.

    ``start``/``end`` give each token's prompt span (see ``prompt_spans``). When a prompt of n tokens is shorter
    than first + last, the paper's rule applies: first <- min(first, n // 2) and last <- min(last, ceil(n / 2)),
    so the two never overlap. ``short_prompts="pyreft"`` is pyreft's rule instead: first <- min(first, n // 2) and
    last <- min(last, n // 2) on every prompt (a one-token prompt gets no intervention). With ``every_token`` the
    tokens after the prompt join the "last" group. ``end_offset`` ends the positions' prompt that many tokens early
    (pyreft's ``last_position = n - 1``: 1), the short-prompt rule counting the shortened prompt.
    """
    prompt_end, end = end, torch.maximum(end - end_offset, start)
    n = end - start
    if short_prompts == "pyreft":
        p, s = (n // 2).clamp(max=first), (n // 2).clamp(max=last)
    elif first and last:
        short = n < first + last
        p = torch.where(short, (n // 2).clamp(max=first), torch.full_like(n, first))
        s = torch.where(short, ((n + 1) // 2).clamp(max=last), torch.full_like(n, last))
    else:
        p, s = n.clamp(max=first), n.clamp(max=last)
    idx = torch.arange(start.shape[1], device=start.device)[None]
    first_mask = (idx >= start) & (idx < start + p)
    last_mask = (idx >= end - s) & (idx < end)
    if every_token:
        last_mask = last_mask | (real & (idx >= prompt_end))
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


class ReftModel(PeftlabModel):
    """A causal LM (optionally with a LoRA) plus ReFT interventions; forward and generate are the model's own."""

    def __init__(self, model: PreTrainedModel, method: Method) -> None:
        super().__init__(model, method)
        self.kind = method.name
        self.interventions = nn.ModuleDict()
        self.groups: dict[str, str] = {}
        self._masks: dict[str, torch.Tensor | None] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def reft_config(self) -> ReftConfig:
        return next(iter(self.adapters.values()))

    def add_adapter(self, name: str, config: ReftConfig) -> None:
        if config.lora is not None:
            lora = LoraConfig.from_dict(config.lora, where=f"{self.kind}.lora")
            self.model = get_peft_model(self.model, lora.to_peft())
        else:
            self.model.requires_grad_(False)
        base = self.causal_lm
        layers = decoder_layers(base)
        targets = {i: _component_module(layers[i], config.component) for i in config.layer_indices(len(layers))}
        self._handles.append(base.register_forward_pre_hook(self._on_call, with_kwargs=True))
        groups = ["all"] if config.tied else ["first", "last"]
        kwargs = {"dropout": config.dropout, "act": config.act, "dtype": getattr(torch, config.dtype)}
        if self.kind in ("noreft", "direft"):
            kwargs["add_bias"] = config.add_bias
        # config.seed draws the initial weights only: the caller's random stream goes on as if nothing was drawn
        with torch.random.fork_rng(devices=[], enabled=config.seed is not None):
            if config.seed is not None:
                torch.manual_seed(config.seed)
            for layer, target in targets.items():
                keys = []
                for k, group in enumerate(groups):
                    key = f"layer_{layer}_comp_{config.component}_unit_pos_nunit_1#{k}"
                    self.interventions[key] = INTERVENTIONS[self.kind](base.config.hidden_size, config.rank, **kwargs)
                    self.groups[key] = group
                    keys.append(key)
                self._handles.append(self._hook(target, config, keys))
        self.interventions.to(next(base.parameters()).device).train(self.training)
        self.adapters[name] = config

    def parameter_details(self) -> dict[str, Any]:
        """The interventions and each one's parameters (2dr + r for LoReFT: R as its d·r entries, as pyreft counts)."""
        counts = {key: sum(p.numel() for p in iv.parameters()) for key, iv in self.interventions.items()}
        return {"interventions": len(counts), "per_intervention": counts}

    # --- tensors -----------------------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        if name not in self.adapters:
            raise KeyError(f"this {self.kind} model has no adapter {name!r}; it has {sorted(self.adapters)}")
        state = {f"{key}.{n}": t for key, iv in self.interventions.items() for n, t in iv.export_state().items()}
        if self.reft_config.lora is not None:
            state.update({f"{LORA}.{k}": v.detach() for k, v in peft.get_peft_model_state_dict(self.model).items()})
        return state

    def _load_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        for key, iv in self.interventions.items():
            iv.import_state({k[len(key) + 1:]: t for k, t in tensors.items() if k.startswith(key + ".")}, key)
        lora = lora_part(tensors)
        if lora:
            peft.set_peft_model_state_dict(self.model, lora)

    def _detach(self) -> PreTrainedModel:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.model.unload() if isinstance(self.model, peft.PeftModel) else self.model

    # --- hooks -------------------------------------------------------------------------------------------------
    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        config = self.reft_config
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = ids.shape if ids is not None else kwargs["inputs_embeds"].shape[:2]
        device = next(self.causal_lm.parameters()).device
        if is_decode_step(kwargs):
            new = torch.ones(shape, dtype=torch.bool, device=device) if config.generation == "every_token" else None
            self._masks = {"first": None, "last": new, "all": new}
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"ReFT needs a 2-D attention mask [batch, tokens], got shape {tuple(mask.shape)}")
        if mask is None and kwargs.get("position_ids") is None:
            mask = torch.ones(shape, dtype=torch.long, device=device)
        spans = prompt_spans(mask, kwargs.get("position_ids"), self.context.fields.prompt_lengths, shape)
        self._masks = position_masks(*spans, config.first, config.last, config.generation == "every_token",
                                     config.short_prompts, config.prompt_end_offset)

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

    def _hook(self, module: nn.Module, config: ReftConfig, keys: list[str]) -> torch.utils.hooks.RemovableHandle:
        if config.component == "block_input":
            def pre_hook(mod, args, kwargs):
                if args:
                    return (self._intervene(keys, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self._intervene(keys, kwargs["hidden_states"])}
            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(mod, args, output):
            if isinstance(output, tuple):
                return (self._intervene(keys, output[0]), *output[1:])
            return self._intervene(keys, output)
        # prepend: run before hooks registered earlier (transformers' output_hidden_states capture), so they record
        # the intervened states whichever was attached first
        return module.register_forward_hook(hook, prepend=True)


def lora_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of the LoRA trained alongside the interventions, keyed as peft saves them."""
    return {k[len(LORA) + 1:]: t for k, t in tensors.items() if k.startswith(LORA + ".")}


class ReftMethod(Method):
    """One registered method per intervention type (loreft, noreft, direft, direft_orth, consreft, lobireft)."""

    config_class = ReftConfig
    model_class = ReftModel
    supports_packing = True  # positions are found per example inside a packed row (see prompt_spans)
    not_mergeable_because = ("an intervention edits hidden states at chosen positions of the prompt (h + Rᵀ(Wh + b − "
                             "Rh)), not the weights: the same weights at every position cannot do it")
    not_composable_because = ("an intervention edits hidden states through its learned projection R, which enters "
                              "nonlinearly (h + Rᵀ(Wh + b − Rh)): a sum of interventions' parameters is not a sum of "
                              "their effects, and applying two in turn depends on their order")

    def __init__(self, name: str) -> None:
        if name not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {name!r}; choose from {sorted(INTERVENTIONS)}")
        self.name = name

    def write_files(self, folder: Path, config: ReftConfig, tensors: dict[str, torch.Tensor],
                    base_model: str | None) -> None:
        own = {k: t.contiguous() for k, t in tensors.items() if not k.startswith(LORA + ".")}
        save_file(own, str(folder / WEIGHTS), metadata={"format": "pt", "intervention": self.name})
        if config.lora is not None:
            peft_config = LoraConfig.from_dict(config.lora, where=f"{self.name}.lora").to_peft()
            write_peft_folder(folder / LORA, peft_config, lora_part(tensors), base_model)

    def read_files(self, folder: Path, config: ReftConfig) -> dict[str, torch.Tensor]:
        path = folder / WEIGHTS
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no {WEIGHTS}")
        tensors = load_file(str(path))
        if config.lora is not None:
            tensors.update({f"{LORA}.{k}": t for k, t in read_peft_folder(folder / LORA).items()})
        return tensors

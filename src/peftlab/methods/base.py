"""The method protocol: a config, a ``Method`` that knows its files, and a ``PeftlabModel`` that owns what it attached.

A ``Method`` is what is registered: its name, its config class, its capability flags, how to attach it to a model
(``attach``) and how its tensors are laid out in a module folder (``write_files``/``read_files``, no model needed).
A ``PeftlabModel`` is a base model with one method's trainable parts, held under adapter names: it moves them as
plain tensors (``adapter_state_dict``/``load_adapter_state_dict``), gives the base model back (``unload``) and
binds each call's per-example fields (``peftlab.context``) for its layers and hooks to read.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from abc import ABC, ABCMeta, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from peftlab.config import from_dict
from peftlab.context import BASE_ADAPTER, CallContext, ExampleFields
from peftlab.quantize import QuantizationError, quantization_of

DEFAULT_ADAPTER = "default"


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's settings; JSON-serialisable, every field has a default."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str = "config") -> MethodConfig:
        return from_dict(cls, values, where)


class AdapterMismatchError(ValueError, RuntimeError):
    """Saved tensors that do not fit the model they are loaded into; the message names the keys and shapes."""


class Method(ABC):
    """One tuning method: its config, what it allows, how it attaches and how its tensors sit in a folder."""

    name: str
    config_class: ClassVar[type[MethodConfig]]
    mergeable: ClassVar[bool] = False  # its trained parts fold into the base weights (``peftlab merge``)
    not_mergeable_because: ClassVar[str] = "its trained parts are not a weight update"
    # the algebra module arithmetic applies to its tensors: "low_rank" (factor pairs B·A whose products add) or
    # "scaling" (vectors l that multiply activations: 1 + Σcᵢ(lᵢ − 1)); None: no arithmetic is defined
    composable: ClassVar[str | None] = None
    not_composable_because: ClassVar[str] = "its trained parts are not an additive weight update"
    supports_packing: ClassVar[bool] = False  # examples may share one row (see data.Collator)
    routable: ClassVar[bool] = False  # one batch may use a different adapter per example
    lora_adapters: ClassVar[bool] = False  # its adapters are plain LoRAs: a server routes them in its shared lane
    # the base quantizations (peftlab.quantize) it trains on; peft's LoHa and LoKr compute wrong shapes on 4-bit layers
    quantized_bases: ClassVar[frozenset[str]] = frozenset({"int8", "nf4", "fp4"})
    each_adapter_as: ClassVar[str | None] = None  # routable: the single-adapter method each adapter is alone
    peft_type: ClassVar[str | None] = None  # the peft_type of a plain peft folder this method reads ("LORA")

    def make_config(self, values: MethodConfig | dict[str, Any] | None, where: str | None = None) -> MethodConfig:
        if isinstance(values, MethodConfig):
            return values
        return self.config_class.from_dict(values, where=where or f"method {self.name!r}")

    model_class: ClassVar[type[PeftlabModel]]

    def attach(self, model: nn.Module, config: MethodConfig | dict[str, Any] | None = None,
               name: str = DEFAULT_ADAPTER) -> PeftlabModel:
        """``model`` with fresh trainable parts under adapter ``name``; only they require grad. Attaching to a
        model of this method adds another adapter (where the method holds several)."""
        return self.attach_many(model, {name: self.make_config(config)})

    def attach_many(self, model: nn.Module, configs: dict[str, MethodConfig]) -> PeftlabModel:
        """``attach`` for several adapters at once (a routable method builds them in one go)."""
        if isinstance(model, PeftlabModel) and model.method is not self:
            raise ValueError(f"cannot attach {self.name!r} to a model that carries {model.method.name!r}; "
                             f"unload() it first")
        quantized = quantization_of(model)
        if quantized is not None and quantized not in self.quantized_bases:
            raise QuantizationError(f"{self.name} does not train on a base quantized as {quantized}; it does on "
                                    f"{', '.join(sorted(self.quantized_bases)) or 'none'} (or full precision)")
        wrapper = model if isinstance(model, PeftlabModel) else self.model_class(model, self)
        taken = sorted(set(configs) & (set(wrapper.adapters) | {BASE_ADAPTER}))
        if taken:
            raise ValueError(f"this model already has adapters named {taken}" if BASE_ADAPTER not in taken else
                             f"{BASE_ADAPTER!r} names the base model; choose another adapter name")
        if len(wrapper.adapters) + len(configs) > 1 and not self.routable:
            raise ValueError(f"a {self.name} model holds one adapter; only routable methods (multilora) hold "
                             f"several (asked for {sorted([*wrapper.adapters, *configs])})")
        wrapper.add_adapters(configs)
        return wrapper

    def join(self, adapters: dict[str, tuple[MethodConfig, dict[str, torch.Tensor]]],
             shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[MethodConfig, dict]]:
        """Single adapters (config, tensors) by name, made ready to be the adapters of one module of this method
        (a routable method's rule for adapters that differ, such as their targets); ``shapes`` names the layers a
        model routes, name -> (in, out)."""
        raise ValueError(f"method {self.name!r} holds one adapter; join adapters into a routable method")

    def why_not_composable(self, config: MethodConfig) -> str | None:
        """None when module arithmetic is defined on an adapter of ``config``; else the reason, for the user."""
        return None if self.composable else self.not_composable_because

    def describe(self, configs: dict[str, dict[str, Any]]) -> dict[str, str]:
        """What ``peftlab info`` adds about a module of this method whose adapters have ``configs`` (by name)."""
        return {}

    @abstractmethod
    def write_files(self, folder: Path, config: MethodConfig, tensors: dict[str, torch.Tensor],
                    base_model: str | None) -> None:
        """Write one adapter's tensors (from ``adapter_state_dict``) into ``folder``, in open formats."""

    @abstractmethod
    def read_files(self, folder: Path, config: MethodConfig) -> dict[str, torch.Tensor]:
        """Read back what ``write_files`` wrote: the tensors ``load_adapter_state_dict`` takes."""


class PeftlabModel(nn.Module, metaclass=ABCMeta):
    """A causal LM with one method's trainable parts. Forward and generate are the model's own, plus the
    per-example fields of ``peftlab.context``; every attribute it does not define is the wrapped model's, so
    Trainer, generation and user code see the model they know."""

    def __init__(self, model: PreTrainedModel, method: Method) -> None:
        super().__init__()
        self.model = model  # what a call runs: the causal LM, or peft's wrapper around it
        self.method = method
        self.adapters: dict[str, MethodConfig] = {}
        self.context = CallContext()
        self.prompt_format = None  # how training prompts were rendered (a data.PromptFormat), saved with the module
        self._slot_lookup: tuple[tuple, torch.Tensor] | None = None  # the last call's names -> slots, on its device
        self._requires_grad = [p.requires_grad for p in model.parameters()]  # what unload() gives back
        self.train(model.training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The base causal LM inside any peft wrapper."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    # --- adapters ----------------------------------------------------------------------------------------------
    @abstractmethod
    def add_adapter(self, name: str, config: MethodConfig) -> None:
        """Create fresh trainable parts under ``name``."""

    def add_adapters(self, configs: dict[str, MethodConfig]) -> None:
        for name, config in configs.items():
            self.add_adapter(name, config)

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` in place (a server unloads adapters without rebuilding the model)."""
        raise NotImplementedError(f"a {self.method.name} model holds one adapter: unload() gives the base model back")

    def parameter_details(self) -> dict[str, Any]:
        """What a parameter report adds for this method beyond the trainable and frozen counts."""
        return {}

    @abstractmethod
    def adapter_state_dict(self, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """The trained tensors of adapter ``name`` by key, detached (the base model's are not included)."""

    @abstractmethod
    def _load_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        """Copy checked tensors into adapter ``name``."""

    @abstractmethod
    def _detach(self) -> PreTrainedModel:
        """Remove every hook and injected layer; return the causal LM."""

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], name: str = DEFAULT_ADAPTER,
                                where: str = "tensors") -> None:
        """Fill adapter ``name`` with ``tensors``; keys and shapes must be exactly this adapter's."""
        if not self.has_adapter(name):
            raise KeyError(f"{where}: this model has no adapter {name!r}; it has {sorted(self.adapters)}")
        expected = {k: tuple(v.shape) for k, v in self.adapter_state_dict(name).items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected:
            raise AdapterMismatchError(f"{where}: tensors do not fit adapter {name!r} of this {self.method.name} "
                                       f"model: missing {missing[:4]}, unexpected {unexpected[:4]}"
                                       f"{' ...' if len(missing) > 4 or len(unexpected) > 4 else ''}")
        for key, shape in expected.items():
            if found[key] != shape:
                raise AdapterMismatchError(f"{where}: tensors do not fit this model: size mismatch for {key}: "
                                           f"torch.Size({list(found[key])}) in the module, "
                                           f"torch.Size({list(shape)}) in the model")
        self._load_tensors(tensors, name)

    def unload(self) -> PreTrainedModel:
        """The base model exactly as it was: every hook removed, every injected layer unwrapped."""
        return self._restore(self._detach())

    def merge_and_unload(self) -> PreTrainedModel:
        """The base model with the trained parts folded into its weights (only where the method is mergeable)."""
        return self._restore(self._merge())

    def _merge(self) -> PreTrainedModel:
        raise NotImplementedError(f"method {self.method.name!r} cannot be folded into the base weights "
                                  f"(it is not a weight update); serve it with its base model instead")

    def _restore(self, base: PreTrainedModel) -> PreTrainedModel:
        """Give ``base`` its parameters' ``requires_grad`` back and leave this wrapper empty."""
        for p, flag in zip(base.parameters(), self._requires_grad, strict=True):
            p.requires_grad_(flag)
        self.adapters = {}
        self.context.clear()
        return base

    # --- training ----------------------------------------------------------------------------------------------
    @property
    def _hf_peft_config_loaded(self) -> bool:
        """What transformers' Trainer asks a quantized model before it trains it: are trainable adapters attached
        on top of the frozen (quantized) base? They are, once this wrapper holds an adapter."""
        return bool(self.adapters)

    # True where ``clip_grad_norm_`` is not the global norm over every trainable parameter; training then calls it
    # instead of accelerate's clipping (which knows sharded gradients), once the fp16 loss scale is off the gradients
    clips_its_own_way: ClassVar[bool] = False

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients down to a norm of at most ``max_norm``; return the norm they had."""
        return nn.utils.clip_grad_norm_([p for p in self.parameters() if p.requires_grad], max_norm)

    def joinable(self, adapter: Any, tensors: dict[str, torch.Tensor]) -> tuple[MethodConfig, dict] | None:
        """A single adapter (a manifest ``Adapter`` and its tensors) made into one of this model's adapters
        (config, tensors), or None when it cannot join (a model of a non-routable method joins none). A server
        puts every module that can join into one routed lane."""
        return None

    def training_callbacks(self) -> list[Any]:
        """Trainer callbacks the method needs while it trains (AdaLoRA: its rank schedule after each step)."""
        return []

    # --- calls -------------------------------------------------------------------------------------------------
    def bind(self, kwargs: dict[str, Any]) -> None:
        """Take the per-example fields out of a call's arguments and make them this call's context."""
        fields = ExampleFields.pop(kwargs)
        slots = only = None
        if fields.adapter_names is not None:
            if fields.adapter_index is None:
                raise ValueError("adapter_names given without adapter_index (which example uses which adapter)")
            unknown = sorted(set(fields.adapter_names) - set(self.adapters) - {BASE_ADAPTER})
            if unknown:
                raise ValueError(f"adapters {unknown} are not in this model; it has {sorted(self.adapters)}")
            if BASE_ADAPTER in fields.adapter_names and not self.method.routable:
                raise ValueError(f"{BASE_ADAPTER!r} (the base model alone) needs a routable method; "
                                 f"{self.method.name!r} is not")
            slot = {name: i for i, name in enumerate(self.adapters)} | {BASE_ADAPTER: -1}
            key = (tuple(slot), tuple(fields.adapter_names), fields.adapter_index.device)
            if self._slot_lookup is None or self._slot_lookup[0] != key:  # a decode loop repeats the same names
                self._slot_lookup = key, torch.tensor([slot[n] for n in fields.adapter_names], device=key[2])
            slots = self._slot_lookup[1][fields.adapter_index]
            if len(set(fields.adapter_names)) == 1:  # known on the host: layers need not look at slots on the device
                only = slot[fields.adapter_names[0]]
        self.context.bind(fields, slots, only)

    def forward(self, *args, **kwargs):
        self.bind(kwargs)
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self.bind(kwargs)
        return self.model.generate(*args, **kwargs)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any, **fields: Any) -> torch.Tensor:
        """Read left-padded prompts into ``cache``; the logits [B, vocab] after each prompt's last token.

        A server calls this once per prompt, then decodes with plain forward calls on the cache; methods whose
        prompt pass is not a plain forward (Bitune) override it. ``fields`` are the per-example ones of
        ``peftlab.context`` (adapter_names, adapter_index).
        """
        out = self(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                   logits_to_keep=1, **{cache_arg(self.causal_lm): cache}, **fields)
        return out.logits[:, -1]

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any,
               **fields: Any) -> torch.Tensor:
        """One decode step on a cache that ``prefill`` filled: the logits [B, vocab] after ``input_ids`` [B, 1]."""
        return self.prefill(input_ids, attention_mask, position_ids, cache, **fields)


# transformers 5.x renames the forward argument past_key_values to cache (the old name works until 5.40): hooks
# read whichever one generate() passed, and our own calls use the name the model's forward declares.
CACHE_ARGS = ("cache", "past_key_values")


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward call's keyword arguments, under either name (None if there is none)."""
    return next((kwargs[name] for name in CACHE_ARGS if kwargs.get(name) is not None), None)


def is_decode_step(kwargs: dict[str, Any]) -> bool:
    """Whether a forward call continues a KV cache that already holds tokens (a decode step of ``generate()``)."""
    cache = cache_in(kwargs)
    return cache is not None and cache.get_seq_length() > 0


def cache_arg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache (looked up once per model class)."""
    return _cache_arg_of(type(model))


@functools.cache
def _cache_arg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


# transformers 5.2x renames gradient checkpointing to activation checkpointing (the training flag, the model's
# ``*_enable`` and ``is_*``; the old names warn there): peftlab reads and names whichever this transformers has.
CHECKPOINTING = ("activation_checkpointing" if hasattr(PreTrainedModel, "activation_checkpointing_enable")
                 else "gradient_checkpointing")


def is_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` recomputes activations in its backward pass (transformers' checkpointing is on)."""
    return bool(getattr(model, f"is_{CHECKPOINTING}", False))

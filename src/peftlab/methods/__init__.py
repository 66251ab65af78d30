"""The method registry: every tuning method is a config dataclass plus a ``Method`` that attaches, saves and loads.

A method plugs into training, saving, ``info`` and the CLI by subclassing ``Method`` and calling ``register``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedModel

from peftlab.config import from_dict


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's settings; JSON-serialisable, every field has a default."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str = "config") -> MethodConfig:
        return from_dict(cls, values, where)


class Method(ABC):
    """How one method attaches to a base model and how its trained part is saved and restored."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    padding_side: ClassVar[str] = "right"
    supports_packing: ClassVar[bool] = False  # True if examples may share one row (see data.Collator)
    trainer_checkpoints: ClassVar[bool] = True  # Trainer saves/restores checkpoints itself (peft models)
    mergeable: ClassVar[bool] = False  # whether ``merge`` can fold the trained parts into the base weights

    @abstractmethod
    def attach(self, model: PreTrainedModel, config: MethodConfig) -> nn.Module:
        """Wrap ``model`` with fresh trainable parts; only they require grad."""

    @abstractmethod
    def save_weights(self, model: nn.Module, folder: Path) -> None:
        """Write the trained parts into ``folder`` (open formats only)."""

    @abstractmethod
    def load(self, model: PreTrainedModel, folder: Path, config: MethodConfig, trainable: bool) -> nn.Module:
        """Attach the parts saved in ``folder`` to ``model``."""

    def load_weights(self, model: nn.Module, folder: Path) -> None:
        """Restore ``save_weights`` output into an attached model in place (resuming from a checkpoint)."""
        raise NotImplementedError(f"method {self.name!r} relies on Trainer's own checkpoints")

    def merge(self, model: nn.Module) -> PreTrainedModel:
        """Fold the trained parts into the base weights (only where ``mergeable``)."""
        raise NotImplementedError(f"method {self.name!r} cannot be folded into the base weights")


class ModelWrapper(nn.Module):
    """Base of methods that wrap a model (``self.model``) and add parts of their own: everything the wrapper does
    not define is the wrapped model's, so Trainer, generation and user code see the model they know."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


# transformers 5.x renames the forward argument past_key_values to cache (the old name works until 5.40): hooks
# read whichever one generate() passed, and our own calls use the name the model's forward declares.
CACHE_ARGS = ("cache", "past_key_values")


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward call's keyword arguments, under either name (None if there is none)."""
    return next((kwargs[name] for name in CACHE_ARGS if kwargs.get(name) is not None), None)


def cache_arg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache (looked up once per model class)."""
    return _cache_arg_of(type(model))


@functools.cache
def _cache_arg_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


from peftlab.methods import bitune, lora, reft  # noqa: E402,F401  (registers every method)

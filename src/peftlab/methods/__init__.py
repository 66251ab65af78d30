"""The method registry. A method is a folder in peft's shape: ``config.py`` (its dataclass), ``layer.py`` (the
module or hook code, where there is one), ``model.py`` (the ``PeftlabModel`` that attaches it) and ``__init__.py``,
which registers it with an explicit ``register_method`` call. See ``methods.base`` for the protocol.
"""

from __future__ import annotations

from peftlab.config import ConfigError
from peftlab.methods.base import (
    DEFAULT_ADAPTER,
    AdapterMismatchError,
    Method,
    MethodConfig,
    PeftlabModel,
    cache_arg,
    cache_in,
)

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make ``method`` known by its name to training, module folders, ``info`` and the CLI."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def lora_router() -> Method:
    """The routable method whose adapters are plain LoRAs: the one module every LoRA can join (a server's shared
    lane, ``multilora import``)."""
    return next(m for m in METHODS.values() if m.routable and m.lora_adapters)


from peftlab.methods import bitune, lora, multilora, reft, tuners  # noqa: E402,F401  (each registers its methods)

__all__ = ["DEFAULT_ADAPTER", "METHODS", "AdapterMismatchError", "Method", "MethodConfig", "PeftlabModel",
           "cache_arg", "cache_in", "get_method", "lora_router", "register_method"]

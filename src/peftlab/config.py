"""YAML configs with defaults: dataclasses filled from a file plus ``--set key.sub=value`` overrides."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader read as YAML 1.2 where it matters: ``1e-3`` is a float (PyYAML alone leaves it a string) and only
    true/false are booleans (PyYAML reads ``no``, ``on``, ``yes`` as booleans: ``save_strategy: no`` became False)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class ConfigError(ValueError):
    """A config file or override that does not fit; the message names the file and the key."""


def from_dict(cls: type[T], values: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``, recursing into dataclass fields; unknown keys are an error."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            values[name] = from_dict(kind, value, f"{where}.{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def set_dotted(tree: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. training.learning_rate=1e-3)")
    key, raw = override.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if isinstance(child, str):  # `method: lora` shorthand grows into a mapping when a setting is added
            child = {"name": child}
        node[part] = child if isinstance(child, dict) else {}
        node = node[part]
    try:
        node[leaf] = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None


def load_yaml(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping (or start from nothing) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    for override in overrides:
        set_dotted(tree, override)
    return tree

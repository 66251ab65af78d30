"""Module folders, read and written as tensors: no model needed (module arithmetic and DIT build modules this way).

A module folder holds ``peftlab.json`` (the manifest: base model, prompt format, library version and one or more
named adapters, each with its method, config and sub-folder) beside each adapter's files in its method's own
layout. The first adapter's files sit at the top, so a LoRA module is a plain peft adapter folder; further
adapters sit in a sub-folder named after them (peft's own convention for several adapters).

Reads: manifest v2 (this), v1 (one adapter; written by peftlab 0.1) and plain peft folders (no ``peftlab.json``:
the adapter's real config is read from ``adapter_config.json``). Writes are atomic and always v2.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors import safe_open

import peftlab
from peftlab.config import from_dict
from peftlab.data import PromptFormat
from peftlab.io import atomic_dir, is_incomplete
from peftlab.methods import DEFAULT_ADAPTER, METHODS, MethodConfig, get_method, lora_router

MANIFEST = "peftlab.json"
FORMAT = "peftlab-module"
FORMAT_VERSION = 2


class ModuleError(ValueError):
    """A folder that is not a complete, readable peftlab module; the message names the file at fault."""


@dataclass
class Adapter:
    """One named adapter of a module: its method, its settings and where its files are (relative to the folder)."""

    method: str
    config: dict[str, Any]
    path: str = "."

    def method_config(self, where: str) -> MethodConfig:
        return get_method(self.method).make_config(self.config, where)


@dataclass
class Manifest:
    """What ``peftlab.json`` says: the adapters by name (the first is the default), and what they were made for."""

    adapters: dict[str, Adapter]
    base_model: str | None = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    peftlab_version: str | None = None
    base_quantization: str | None = None  # how the base was quantized in training (peftlab.quantize), if it was

    @property
    def method(self) -> str:
        """The method of the module's adapters (all of one method)."""
        methods = {a.method for a in self.adapters.values()}
        if len(methods) != 1:
            raise ModuleError(f"the module mixes methods {sorted(methods)}")
        return methods.pop()

    def to_json(self) -> dict[str, Any]:
        quantized = {"base_quantization": self.base_quantization} if self.base_quantization else {}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "base_model": self.base_model, **quantized,
                "peftlab_version": peftlab.__version__, "prompt_format": asdict(self.prompt_format),
                "adapters": {name: asdict(a) for name, a in self.adapters.items()}}


@dataclass
class Module:
    """A module as data: its manifest and, per adapter name, its tensors (the keys its method's model uses)."""

    manifest: Manifest
    tensors: dict[str, dict[str, torch.Tensor]]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModuleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModuleError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _manifest_from_json(data: dict[str, Any], path: Path) -> Manifest:
    version = data.get("format_version", 1)
    fmt = from_dict(PromptFormat, data.get("prompt_format"), f"{path}: prompt_format")
    if version == 1:
        if "method" not in data:
            raise ModuleError(f"{path}: no 'method' field")
        adapters = {DEFAULT_ADAPTER: Adapter(data["method"], data.get("config") or {})}
    elif version == FORMAT_VERSION:
        raw = data.get("adapters")
        if not isinstance(raw, dict) or not raw:
            raise ModuleError(f"{path}: 'adapters' must map adapter names to {{method, config, path}}")
        adapters = {}
        for name, entry in raw.items():
            if not isinstance(entry, dict) or "method" not in entry:
                raise ModuleError(f"{path}: adapter {name!r} has no 'method'")
            adapters[name] = from_dict(Adapter, entry, f"{path}: adapters.{name}")
    else:
        raise ModuleError(f"{path}: format_version {version} is newer than this peftlab reads ({FORMAT_VERSION}); "
                          f"upgrade peftlab")
    return Manifest(adapters, data.get("base_model"), fmt, data.get("peftlab_version"), data.get("base_quantization"))


def _manifest_from_peft(path: Path) -> Manifest:
    """A plain peft adapter folder, with the config it was really trained with."""
    data = _read_json(path)
    readable = {m.peft_type: name for name, m in METHODS.items() if m.peft_type}  # each method names its own
    method = readable.get(str(data.get("peft_type")))
    if method is None:
        raise ModuleError(f"{path}: peft_type {data.get('peft_type')!r} is not one peftlab reads "
                          f"({sorted(readable)})")
    try:
        peft_config = peft.PeftConfig.from_pretrained(str(path.parent))
        config = get_method(method).config_class.from_peft(peft_config)
    except (ValueError, TypeError) as e:
        raise ModuleError(f"{path}: {e}") from None
    return Manifest({DEFAULT_ADAPTER: Adapter(method, config.to_dict())}, data.get("base_model_name_or_path"))


def read_manifest(folder: str | Path) -> Manifest:
    """What a module folder holds, without reading its tensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModuleError(f"{folder}: no such module folder")
    if is_incomplete(folder):
        raise ModuleError(f"{folder}: an interrupted save left this folder incomplete; save again")
    manifest, peft_config = folder / MANIFEST, folder / "adapter_config.json"
    if manifest.exists():
        return _manifest_from_json(_read_json(manifest), manifest)
    if peft_config.exists():
        return _manifest_from_peft(peft_config)
    raise ModuleError(f"{folder}: neither {MANIFEST} nor adapter_config.json found; not a module folder")


def read(folder: str | Path) -> Module:
    """A module folder as its manifest and its tensors."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    tensors = {}
    for name, adapter in manifest.adapters.items():
        where = f"{folder / MANIFEST}: adapter {name!r}"
        try:
            config = adapter.method_config(where)
            tensors[name] = get_method(adapter.method).read_files(folder / adapter.path, config)
        except (FileNotFoundError, ValueError) as e:
            raise ModuleError(f"{where}: {e}") from None
    return Module(manifest, tensors)


def write(folder: str | Path, manifest: Manifest, tensors: dict[str, dict[str, torch.Tensor]],
          overwrite: bool = False) -> Path:
    """Write a module folder atomically from its manifest and tensors (what ``read`` gives back)."""
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        write_into(tmp, manifest, tensors)
    return Path(folder)


def write_into(folder: Path, manifest: Manifest, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write the module's files into an existing folder (a Trainer checkpoint, whose completion Trainer marks)."""
    if set(tensors) != set(manifest.adapters):
        raise ValueError(f"tensors for adapters {sorted(tensors)} do not match the manifest's "
                         f"{sorted(manifest.adapters)}")
    placed = {}
    for i, (name, adapter) in enumerate(manifest.adapters.items()):
        placed[name] = replace(adapter, path="." if i == 0 else name)
        target = folder / placed[name].path
        if i and target.exists():
            raise ValueError(f"adapter name {name!r} collides with a file of adapter "
                             f"{next(iter(manifest.adapters))!r}; choose another name")
        target.mkdir(parents=True, exist_ok=True)
        get_method(adapter.method).write_files(target, adapter.method_config(f"adapter {name!r}"), tensors[name],
                                               manifest.base_model)
    text = json.dumps(replace(manifest, adapters=placed).to_json(), indent=2)
    (folder / MANIFEST).write_text(text + "\n")


@dataclass
class ModuleInfo:
    """A module folder described: its manifest and the shape of every tensor in it, by ``file:key``."""

    folder: Path
    manifest: Manifest
    tensors: dict[str, list[int]]

    @property
    def method(self) -> str:
        return self.manifest.method

    @property
    def config(self) -> dict[str, Any]:
        return next(iter(self.manifest.adapters.values())).config

    @property
    def base_model(self) -> str | None:
        return self.manifest.base_model

    @property
    def prompt_format(self) -> PromptFormat:
        return self.manifest.prompt_format

    @property
    def peftlab_version(self) -> str | None:
        return self.manifest.peftlab_version

    @property
    def trainable_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensors.values())


def read_info(folder: str | Path) -> ModuleInfo:
    """What a saved module is, without loading any model or tensor."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    shapes = {}
    for f in sorted(folder.rglob("*.safetensors")):  # with sub-adapters (ReFT's lora/, Bitune's bidir/)
        with safe_open(f, framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[f"{f.relative_to(folder).as_posix()}:{key}"] = list(st.get_slice(key).get_shape())
    return ModuleInfo(folder, manifest, shapes)


def combine(sources: dict[str, str | Path], method: str | None = None) -> Module:
    """Single-adapter folders (plain peft LoRA folders, peftlab LoRA modules) as the named adapters of one module of
    a routable ``method``, without a model: same base model, same prompt format, configs ``method`` accepts, joined
    by the method's rule (``Method.join``: for MultiLoRA, LoRAs of different targets are zero-padded)."""
    target = get_method(method) if method else lora_router()
    method = target.name
    if not target.routable:
        raise ModuleError(f"method {method!r} holds one adapter; combine folders into a routable method")
    joining: dict[str, tuple[MethodConfig, dict[str, torch.Tensor]]] = {}
    reference: tuple[Path, Manifest] | None = None
    for name, folder in sources.items():
        module = read(folder)
        if len(module.manifest.adapters) != 1:
            raise ModuleError(f"{folder}: holds adapters {sorted(module.manifest.adapters)}; combine takes one per "
                              f"folder")
        (adapter,), (state,) = module.manifest.adapters.values(), module.tensors.values()
        try:
            config = target.make_config(adapter.config, where=f"{folder}")
        except ValueError as e:
            raise ModuleError(f"{folder}: a {adapter.method} module, which a {method} module cannot hold as one of "
                              f"its adapters (it holds LoRAs: peft LoRA folders, lora or multilora modules): {e}") \
                from None
        if reference is None:
            reference = (Path(folder), module.manifest)
        for what, mine, theirs in (("base_model", module.manifest.base_model, reference[1].base_model),
                                   ("prompt_format", module.manifest.prompt_format, reference[1].prompt_format)):
            if mine != theirs:
                raise ModuleError(f"{folder} has {what} {mine!r}, {reference[0]} has {theirs!r}: the adapters of one "
                                  f"module share them")
        joining[name] = (config, state)
    return joined(joining, method, reference[1].base_model, reference[1].prompt_format)


def joined(adapters: dict[str, tuple[MethodConfig, dict[str, torch.Tensor]]], method: str,
           base_model: str | None, prompt_format: PromptFormat | None = None,
           shapes: dict[str, tuple[int, int]] | None = None) -> Module:
    """Adapters (config, tensors) by name as one module of a routable ``method``, joined by the method's rule
    (``Method.join``); ``shapes``: the layers a model routes (name -> (in, out)), else the adapters' own."""
    ready = get_method(method).join(adapters, shapes)
    return Module(Manifest({name: Adapter(method, config.to_dict()) for name, (config, _) in ready.items()},
                           base_model, prompt_format or PromptFormat()),
                  {name: state for name, (_, state) in ready.items()})


def split(module: Module) -> dict[str, Module]:
    """Each adapter of ``module`` (of a routable method) as a module of its own, of the method its adapters are
    alone (``Method.each_adapter_as``: a MultiLoRA adapter is a plain LoRA)."""
    method = get_method(module.manifest.method).each_adapter_as
    if method is None:
        raise ModuleError(f"a {module.manifest.method} module holds one adapter; there is nothing to split")
    return {name: Module(replace(module.manifest, adapters={DEFAULT_ADAPTER: Adapter(method, adapter.config)}),
                         {DEFAULT_ADAPTER: module.tensors[name]})
            for name, adapter in module.manifest.adapters.items()}

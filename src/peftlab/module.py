"""Trained modules: attach a method to a model, save it as a folder, read it back.

A module folder holds ``peftlab.json`` (method, config, base model, library version) beside the method's own
safetensors files (for LoRA/IA3: peft's ``adapter_config.json`` + ``adapter_model.safetensors``). Saves are atomic.
A plain peft adapter folder (no ``peftlab.json``) is read too, so peft users can bring their adapters.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import peftlab
from peftlab.config import from_dict
from peftlab.data import PromptFormat
from peftlab.io import atomic_dir, is_incomplete
from peftlab.methods import MethodConfig, get_method

MANIFEST = "peftlab.json"
_PEFT_TYPES = {"LORA": "lora", "IA3": "ia3"}


class ModuleError(ValueError):
    """A folder that is not a complete, readable peftlab module; the message names the file at fault."""


@dataclass
class ModuleInfo:
    method: str
    config: dict[str, Any]
    base_model: str | None
    peftlab_version: str | None
    folder: Path
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    tensors: dict[str, list[int]] = field(default_factory=dict)

    @property
    def trainable_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensors.values())


def attach(model: PreTrainedModel, method: str, config: MethodConfig | dict | None = None) -> nn.Module:
    """Give ``model`` fresh trainable parts of ``method``; the result remembers what it is for ``save``."""
    m = get_method(method)
    if not isinstance(config, MethodConfig):
        config = m.config_class.from_dict(config, where=f"method {method!r}")
    wrapped = m.attach(model, config)
    wrapped.peftlab_spec = (method, config)
    return wrapped


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Trainable parameters and their share of the frozen base model (the papers' denominator).

    For ReFT this counts 2dr + r per LoReFT intervention (R counted as its d·r entries, as pyreft does).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    report = {"trainable_parameters": trainable, "base_parameters": base,
              "trainable_percent": 100 * trainable / base if base else float("nan")}
    interventions = getattr(model, "interventions", None)
    if isinstance(interventions, nn.ModuleDict):
        report["interventions"] = len(interventions)
        report["per_intervention"] = {k: sum(p.numel() for p in iv.parameters()) for k, iv in interventions.items()}
    return report


def base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or None


def save(model: nn.Module, folder: str | Path, overwrite: bool = False,
         prompt_format: PromptFormat | None = None) -> Path:
    """Write the trained parts of ``model`` (from ``attach`` or ``load``) to ``folder`` atomically.

    ``prompt_format`` records how training prompts were rendered, so generation renders them the same way.
    """
    spec = getattr(model, "peftlab_spec", None)
    if spec is None:
        raise ValueError("this model has no peftlab method attached (use peftlab.attach or peftlab.load first)")
    method, config = spec
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        get_method(method).save_weights(model, tmp)
        manifest = {"format": "peftlab-module", "format_version": 1, "method": method,
                    "config": config.to_dict(), "base_model": base_name(model),
                    "peftlab_version": peftlab.__version__}
        if prompt_format is not None:
            manifest["prompt_format"] = asdict(prompt_format)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def _tensor_shapes(folder: Path) -> dict[str, list[int]]:
    shapes = {}
    for f in sorted(folder.rglob("*.safetensors")):  # with sub-adapters (ReFT's lora/, Bitune's bidir/)
        with safe_open(f, framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                shapes[f"{f.relative_to(folder).as_posix()}:{key}"] = list(st.get_slice(key).get_shape())
    return shapes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModuleError(f"{path}: not valid JSON ({e})") from None


def read_info(folder: str | Path) -> ModuleInfo:
    """What a saved module is, without loading any model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModuleError(f"{folder}: no such module folder")
    if is_incomplete(folder):
        raise ModuleError(f"{folder}: an interrupted save left this folder incomplete; save again")
    manifest, peft_config = folder / MANIFEST, folder / "adapter_config.json"
    if manifest.exists():
        data = _read_json(manifest)
        if "method" not in data:
            raise ModuleError(f"{manifest}: no 'method' field")
        info = ModuleInfo(data["method"], data.get("config") or {}, data.get("base_model"),
                          data.get("peftlab_version"), folder,
                          from_dict(PromptFormat, data.get("prompt_format"), f"{manifest}: prompt_format"))
    elif peft_config.exists():
        data = _read_json(peft_config)
        method = _PEFT_TYPES.get(str(data.get("peft_type")))
        if method is None:
            raise ModuleError(f"{peft_config}: peft_type {data.get('peft_type')!r} is not one peftlab reads "
                              f"({sorted(_PEFT_TYPES)})")
        info = ModuleInfo(method, {}, data.get("base_model_name_or_path"), None, folder)
    else:
        raise ModuleError(f"{folder}: neither {MANIFEST} nor adapter_config.json found; not a module folder")
    info.tensors = _tensor_shapes(folder)
    return info


def load(folder: str | Path, model: PreTrainedModel, trainable: bool = False) -> nn.Module:
    """Attach the module saved in ``folder`` to ``model`` (the base model it was trained on)."""
    info = read_info(folder)
    method = get_method(info.method)
    config = method.config_class.from_dict(info.config, where=str(info.folder / MANIFEST))
    wrapped = method.load(model, info.folder, config, trainable)
    wrapped.peftlab_spec = (info.method, config)
    return wrapped


def load_with_base(folder: str | Path, base_model: str | None = None, dtype: str = "float32",
                   device: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load the base model named in the module (or ``base_model``) and attach the module to it."""
    from peftlab.models import load_model

    info = read_info(folder)
    name = base_model or info.base_model
    if not name:
        raise ModuleError(f"{info.folder}: the module does not name its base model; pass base_model")
    model, tokenizer = load_model(name, dtype=dtype, device=device)
    return load(folder, model), tokenizer


def merge(folder: str | Path, out: str | Path, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Fold a module into its base weights and save a full model folder (with tokenizer) atomically."""
    method = get_method(read_info(folder).method)
    if not method.mergeable:
        raise NotImplementedError(f"{folder}: method {method.name!r} cannot be folded into the base weights "
                                  f"(it is not a weight update); serve it with its base model instead")
    model, tokenizer = load_with_base(folder, base_model)
    merged = method.merge(model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)

"""Modules on models: attach a method, save what it trained, load it back, fold it in, and load for inference.

``load`` is ``attach`` + ``load_adapter_state_dict``: one construction path, whatever the folder's version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftlab.data import PromptFormat
from peftlab.io import atomic_dir
from peftlab.methods import DEFAULT_ADAPTER, MethodConfig, PeftlabModel, get_method
from peftlab.module import (
    Adapter,
    Manifest,
    Module,
    ModuleError,
    ModuleInfo,
    combine,
    read,
    read_info,
    write,
    write_into,
)
from peftlab.quantize import dequantized, quantization_of

log = logging.getLogger(__name__)


def attach(model: nn.Module, method: str, config: MethodConfig | dict | None = None,
           name: str = DEFAULT_ADAPTER) -> PeftlabModel:
    """Give ``model`` fresh trainable parts of ``method`` under adapter ``name``."""
    return get_method(method).attach(model, config, name)


def manifest_of(model: PeftlabModel, prompt_format: PromptFormat | None = None) -> Manifest:
    """The manifest that describes ``model``'s adapters (``prompt_format``: how its training prompts looked)."""
    adapters = {name: Adapter(model.method.name, config.to_dict()) for name, config in model.adapters.items()}
    return Manifest(adapters, base_name(model), prompt_format or model.prompt_format or PromptFormat(),
                    base_quantization=quantization_of(model.causal_lm))


def tensors_of(model: PeftlabModel) -> dict[str, dict[str, Any]]:
    return {name: model.adapter_state_dict(name) for name in model.adapters}


def _check_attached(model: nn.Module) -> PeftlabModel:
    if not isinstance(model, PeftlabModel):
        raise ValueError("this model has no peftlab method attached (use peftlab.attach or peftlab.load first)")
    return model


def save(model: PeftlabModel, folder: str | Path, overwrite: bool = False,
         prompt_format: PromptFormat | None = None) -> Path:
    """Write the trained parts of ``model`` to ``folder`` atomically, as a module folder.

    ``prompt_format`` records how training prompts were rendered, so generation renders them the same way.
    """
    model = _check_attached(model)
    return write(folder, manifest_of(model, prompt_format), tensors_of(model), overwrite=overwrite)


def save_into(model: PeftlabModel, folder: Path) -> None:
    """``save`` into an existing folder, not atomically: for Trainer checkpoints, whose completion Trainer marks."""
    folder.mkdir(parents=True, exist_ok=True)
    write_into(folder, manifest_of(_check_attached(model)), tensors_of(model))


def load(folder: str | Path, model: nn.Module, trainable: bool = False) -> PeftlabModel:
    """Attach the module saved in ``folder`` to ``model`` (the base model it was trained on)."""
    return load_module(read(folder), model, trainable, where=str(folder))


def load_module(module: Module, model: nn.Module, trainable: bool = False, where: str = "module") -> PeftlabModel:
    """Attach a module given as data (``module.read``, ``module.combine``) to ``model``."""
    method = get_method(module.manifest.method)
    configs = {name: adapter.method_config(f"{where}: adapter {name!r}")
               for name, adapter in module.manifest.adapters.items()}
    wrapped = method.attach_many(model, configs)
    for name, tensors in module.tensors.items():
        wrapped.load_adapter_state_dict(tensors, name, where=f"{where} (adapter {name!r})")
    wrapped.prompt_format = module.manifest.prompt_format
    if not trainable:
        wrapped.requires_grad_(False)
    return wrapped.train(trainable)


def restore(model: PeftlabModel, folder: str | Path) -> None:
    """Put the tensors saved in ``folder`` into ``model``'s adapters in place (resuming from a checkpoint)."""
    for name, tensors in read(folder).tensors.items():
        model.load_adapter_state_dict(tensors, name, where=f"{folder} (adapter {name!r})")


def base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or None


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Trainable parameters and their share of the frozen base model (the papers' denominator), and what the method
    adds (``PeftlabModel.parameter_details``: ReFT's count per intervention, R counted as its d·r entries)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    report = {"trainable_parameters": trainable, "base_parameters": base,
              "trainable_percent": 100 * trainable / base if base else float("nan")}
    if isinstance(model, PeftlabModel):
        report.update(model.parameter_details())
    return report


@dataclass
class Loaded:
    """A model ready for inference: a base model, or a module on its base model, with the prompt format it expects."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat
    base_model: str
    info: ModuleInfo | None = None  # the module's, when one was loaded


def load_for_inference(adapter: str | Path | None = None, model: str | None = None, dtype: str = "float32",
                       device: str | None = None, adapters: dict[str, str | Path] | None = None,
                       quantize: str | None = None) -> Loaded:
    """The one loader behind the CLI, evaluations and recipes: the base model ``model`` (default: the module's,
    else the embedded default), with the module in ``adapter`` attached, or the single-adapter folders
    ``adapters`` (name -> folder) combined into one MultiLoRA model that serves them side by side. The base is
    quantized as ``quantize`` says, else as the module's base was in training (a different choice is warned of)."""
    from peftlab.models import DEFAULT_MODEL, load_model

    if adapter is not None and adapters:
        raise ValueError("give one module folder or several adapter folders, not both")
    module = combine(adapters) if adapters else read(adapter) if adapter is not None else None
    info = read_info(adapter) if adapter is not None else None
    name = model or (module.manifest.base_model if module is not None else None) or DEFAULT_MODEL
    trained_on = module.manifest.base_quantization if module is not None else None
    if quantize is not None and module is not None and quantize != (trained_on or "none"):
        log.warning("%s was trained on a base quantized as %s; loading it on a %s base as asked", adapter or adapters,
                    trained_on or "none (full precision)", quantize)
    quantize = trained_on if quantize is None else quantize
    base, tokenizer = load_model(name, dtype=dtype, device=device, quantize=None if quantize == "none" else quantize)
    if module is None:
        return Loaded(base, tokenizer, PromptFormat(), name)
    where = str(adapter) if adapter is not None else ", ".join(f"{k}={v}" for k, v in adapters.items())
    return Loaded(load_module(module, base, where=where), tokenizer, module.manifest.prompt_format, name, info)


def merged_model(folder: str | Path, base_model: str | None = None, dtype: str = "float32",
                 device: str | None = None) -> Loaded:
    """A module folded into its base weights: a plain transformers model (``Loaded.model``) with the tokenizer. The
    one merge path (``peftlab merge``, compose's merged export, GGUF export). A module trained on a quantized base
    is merged into that base dequantized (the weights it was trained against), in full precision: load the result
    with ``--quantize`` to quantize it again."""
    method = get_method(read_info(folder).method)
    if not method.mergeable:
        raise NotImplementedError(f"{folder}: a {method.name} module cannot be folded into the base weights: "
                                  f"{method.not_mergeable_because}")
    loaded = load_for_inference(folder, base_model, dtype, device)
    if quantization_of(loaded.model.causal_lm) is not None:  # dequantise, then merge: W_q + ΔW in full precision
        base = dequantized(loaded.model.unload())
        loaded = replace(loaded, model=load_module(read(folder), base, where=str(folder)))
    merged = loaded.model.merge_and_unload()
    for key, weight in merged.state_dict().items():  # W + ΔW in the model's own dtype (float16 overflows first)
        if weight.is_floating_point() and not bool(weight.isfinite().all()):
            raise ModuleError(f"{folder}: merged into the base, {key} is not finite in {weight.dtype} (inf or NaN); "
                              f"nothing was written")
    return replace(loaded, model=merged)


def merge(folder: str | Path, out: str | Path, base_model: str | None = None, overwrite: bool = False,
          extra_files: dict[str, str] | None = None, dtype: str = "float32", device: str | None = None) -> Path:
    """Fold a module into its base weights and save a full model folder (with tokenizer, and ``extra_files``:
    name -> text) atomically."""
    merged = merged_model(folder, base_model, dtype, device)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        merged.model.save_pretrained(tmp)
        merged.tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


__all__ = ["Loaded", "ModuleError", "attach", "base_name", "load", "load_for_inference", "load_module", "merge",
           "merged_model",
           "parameter_report", "restore", "save", "save_into"]

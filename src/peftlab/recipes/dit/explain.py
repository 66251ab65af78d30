"""``peftlab explain``: a trained DIT adapter applied to any LoRA of its base model, which then says what it learned.

Only LoRA weight diffs are read (plain peft folders, peftlab LoRA modules, each adapter of a MultiLoRA module): DIT
was trained on low-rank additive diffs, and IA3, ReFT and Bitune change the model in other ways. A LoRA on fewer
layers than the DIT adapter is zero on the others (exact); the DIT adapter's base model must be the LoRA's.
"""

from __future__ import annotations

from pathlib import Path

from peftlab.methods.multilora import MultiLoraConfig
from peftlab.methods.multilora.model import layer_shapes, target_names
from peftlab.module import ModuleError, joined, read
from peftlab.recipes.dit.adapter import add_dit, read_dit

READABLE = ("lora", "multilora")


def lora_diffs(folder: str | Path, base_model: str | None) -> dict[str, tuple[MultiLoraConfig, dict]]:
    """The LoRA diffs in ``folder`` by name (``NAME`` alone for a single adapter, ``NAME/ADAPTER`` for several)."""
    module = read(folder)
    method = module.manifest.method
    if method not in READABLE:
        raise ModuleError(f"{folder}: a {method} module is not a LoRA weight diff; DIT reads LoRA diffs only "
                          f"({', '.join(READABLE)})")
    theirs = module.manifest.base_model
    if base_model and theirs and theirs != base_model:
        raise ModuleError(f"{folder} was trained on {theirs!r}, the DIT adapter on {base_model!r}: a DIT adapter "
                          f"reads diffs of its own base model only")
    out = {}
    for name, adapter in module.manifest.adapters.items():
        try:
            config = MultiLoraConfig.from_dict(adapter.config, where=f"{folder}: adapter {name!r}")
        except ValueError as e:
            raise ModuleError(f"{folder}: adapter {name!r}: {e}") from None
        label = Path(folder).name if len(module.manifest.adapters) == 1 else f"{Path(folder).name}/{name}"
        out[label] = (config, module.tensors[name])
    return out


def explain(folders: list[str | Path], dit_folder: str | Path, model=None, tokenizer=None,
            max_new_tokens: int = 24) -> dict[str, str]:
    """What the DIT adapter in ``dit_folder`` makes each LoRA of ``folders`` say it was trained on, by name."""
    from peftlab.adapters import load_module
    from peftlab.models import load_model
    from peftlab.recipes.dit.evaluate import ask

    dit = read_dit(dit_folder)
    diffs = {k: v for folder in folders for k, v in lora_diffs(folder, dit.base_model).items()}
    if model is None:
        model, tokenizer = load_model(dit.base_model)
    layers = sorted({n for config, _ in [*diffs.values(), (dit.config, None)]
                     for n in target_names(model, config.target_modules)})
    module = joined(diffs, "multilora", dit.base_model, shapes=layer_shapes(model, layers))
    wrapped = load_module(module, model, where="explain")
    add_dit(wrapped, dit)
    answers = ask(wrapped, tokenizer, list(diffs), dit.question, max_new_tokens)
    wrapped.unload()
    return dict(zip(diffs, answers, strict=True))


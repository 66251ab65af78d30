"""pyreft's checkpoint layout, read and written so pyreft users can bring (and take) their interventions.

pyreft (through pyvene) saves a folder with ``config.json`` (pyvene's IntervenableConfig: one
``representations`` row per intervention) and one ``intkey_{key}.bin`` per intervention, a ``torch.save`` of its
state dict. That is pickle: peftlab reads it with ``torch.load(weights_only=True)``, which loads tensors only and
runs no code, and writes it only when asked to export. pyreft's config does not record positions, dropout,
or activation; pass them when importing (defaults: last prompt token, no dropout, linear). The dtype is read from
the saved tensors; short prompts are cut by pyreft's rule (``short_prompts: pyreft``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.io import atomic_dir
from peftlab.methods import get_method
from peftlab.methods.lora import LoraConfig, read_peft_folder, write_peft_folder
from peftlab.methods.reft.config import ReftConfig
from peftlab.methods.reft.layer import PYREFT_NAMES
from peftlab.methods.reft.model import LORA, ReftModel, lora_part

_KEY = re.compile(r"^layer[._](\d+)[._]comp[._](.+?)[._]unit[._]pos[._]nunit[._]1#(\d+)$")
_ROTATION_PARAMETRIZED = ("rotate_layer.parametrizations.weight.original",
                          "rotate_layer.parametrizations.weight.0.base")
# pyvene's RepresentationConfig fields, in order (config.json stores each row as a list)
_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension", "intervention_type",
           "intervention", "subspace_partition", "group_key", "intervention_link_key", "moe_key",
           "source_representation", "hidden_source_representation", "latent_dim")


def is_pyreft_folder(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    return config.exists() and "representations" in json.loads(config.read_text(encoding="utf-8"))


def _to_pyreft_state(kind: str, state: dict[str, torch.Tensor], d: int, r: int) -> dict[str, torch.Tensor]:
    if kind == "loreft":  # pyreft overrides LoReFT's state_dict with these three tensors
        return {"weight": state["learned_source.weight"], "bias": state["learned_source.bias"],
                "rotate_layer": state["rotate_layer"]}
    if kind in ("noreft", "direft"):
        return {"embed_dim": torch.tensor(d), "interchange_dim": torch.tensor(d), **state}
    raise NotImplementedError(f"writing {kind} in pyreft's layout is not supported (pyreft stores its rotation "
                              f"as torch's internal parametrisation state); save it in peftlab's format")


def _from_pyreft_state(kind: str, saved: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    if kind == "loreft":
        missing = {"weight", "bias", "rotate_layer"} - set(saved)
        if missing:
            raise ValueError(f"{where}: LoReFT state lacks {sorted(missing)}")
        return {"learned_source.weight": saved["weight"], "learned_source.bias": saved["bias"],
                "rotate_layer": saved["rotate_layer"]}
    state = {k: v for k, v in saved.items() if k not in ("embed_dim", "interchange_dim")}
    if _ROTATION_PARAMETRIZED[0] in state:  # Direft/Consreft/Lobireft: rebuild R from torch's parametrisation
        original, base = state.pop(_ROTATION_PARAMETRIZED[0]), state.pop(_ROTATION_PARAMETRIZED[1])
        holder = nn.Module()
        holder.weight = nn.Parameter(torch.empty_like(original))
        holder = torch.nn.utils.parametrizations.orthogonal(holder)
        holder.load_state_dict({"parametrizations.weight.original": original,
                                "parametrizations.weight.0.base": base})
        state["rotate_layer"] = holder.weight.detach()
    return state


def save_pyreft(model: ReftModel, folder: str | Path, overwrite: bool = False) -> Path:
    """Write ``model``'s interventions in pyreft's layout (``config.json`` + ``intkey_*.bin``). pyreft keeps no
    LoRA: one trained alongside goes beside them as a plain peft folder, ``lora/``, never silently dropped."""
    import transformers

    cfg, rows, keys = model.reft_config, [], pyreft_order(model.interventions)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        for key in keys:
            iv, layer = model.interventions[key], int(_KEY.match(key).group(1))
            row = dict.fromkeys(_FIELDS)
            row.update(layer=layer, component=cfg.component, unit="pos", max_number_of_units=1,
                       low_rank_dimension=cfg.rank)
            rows.append([row[f] for f in _FIELDS])
            torch.save(_to_pyreft_state(model.kind, iv.export_state(), iv.d, iv.r), tmp / f"intkey_{key}.bin")
        config = {"model_type": None, "representations": rows,
                  "intervention_types": [f"<class 'pyreft.interventions.{PYREFT_NAMES[model.kind]}'>"] * len(keys),
                  "sorted_keys": keys, "intervention_dimensions": [iv.d for iv in model.interventions.values()],
                  "intervention_constant_sources": [True] * len(keys), "mode": "parallel",
                  "transformers_version": transformers.__version__}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if cfg.lora is not None:
            peft_config = LoraConfig.from_dict(cfg.lora, where=f"{model.kind}.lora").to_peft()
            write_peft_folder(tmp / LORA, peft_config, lora_part(model.adapter_state_dict()),
                              getattr(model.causal_lm.config, "name_or_path", None))
    return Path(folder)


def pyreft_order(keys) -> list[str]:
    """Intervention keys in the order pyreft lists them: every ``#0`` ("first" positions) by layer, then every
    ``#1`` ("last"), as its ``layers += layers`` builds them. pyvene gives the first half of this list the first
    positions and the second half the last ones, so a layer-by-layer order would pair them wrongly."""
    def place(key: str) -> tuple[int, int]:
        m = _KEY.match(key)
        return int(m.group(3)), int(m.group(1))
    return sorted(keys, key=place)


def read_pyreft_config(folder: str | Path, positions: str = "l1", **settings: Any) -> tuple[str, ReftConfig]:
    """The intervention type and a ReftConfig for a pyreft folder; ``settings`` fill what pyreft does not store."""
    from peftlab.module import ModuleError  # (peftlab.module reads modules of every method: imported when used)

    path = Path(folder) / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    kinds = {re.search(r"\.(\w+)'>$", t).group(1) for t in data.get("intervention_types", [])}
    by_pyreft = {v: k for k, v in PYREFT_NAMES.items()}
    if len(kinds) != 1 or next(iter(kinds)) not in by_pyreft:
        raise ModuleError(f"{path}: intervention types {sorted(kinds)} are not one of {sorted(by_pyreft)}")
    rows = [dict(zip(_FIELDS, row, strict=False)) for row in data["representations"]]
    layers = sorted({row["layer"] for row in rows})
    components, ranks = {row["component"] for row in rows}, {row["low_rank_dimension"] for row in rows}
    if len(components) != 1 or len(ranks) != 1:
        raise ModuleError(f"{path}: mixed components {components} or ranks {ranks} are not supported")
    per_layer = len(rows) // len(layers)
    if per_layer not in (1, 2):
        raise ModuleError(f"{path}: {per_layer} interventions per layer; peftlab reads 1 (tied) or 2 (untied)")
    settings = {"short_prompts": "pyreft", **settings}  # behave as in pyreft unless told otherwise
    config = ReftConfig(layers=layers, component=components.pop(), rank=ranks.pop(), positions=positions,
                        share_weights=per_layer == 1, **settings)
    if per_layer == 2 and config.tied:
        raise ModuleError(f"{path}: two interventions per layer (untied: one for the first positions, one for the "
                          f"last), but positions {positions!r} name one group; give the positions it was trained "
                          f"with, e.g. --positions f5+l5")
    return by_pyreft[next(iter(kinds))], config


def load_pyreft(folder: str | Path, model: nn.Module, positions: str = "l1", **settings: Any) -> ReftModel:
    """Attach the interventions of a pyreft folder to ``model`` (the base model they were trained on). The
    interventions' dtype is the one their saved tensors have, unless ``dtype`` is given. A ``lora/`` peft folder
    beside them (what ``save_pyreft`` writes for a LoRA trained alongside) comes back as that LoRA."""
    from peftlab.module import ModuleError, read_info

    folder = Path(folder)
    lora = folder / LORA if (folder / LORA / "adapter_config.json").exists() else None
    if lora is not None:
        settings["lora"] = read_info(lora).config
    files = {_canonical_key(p.name[len("intkey_"):-len(".bin")]): p for p in folder.glob("intkey_*.bin")}
    saved = {key: torch.load(path, map_location="cpu", weights_only=True) for key, path in files.items()}
    dtypes = {str(t.dtype).removeprefix("torch.") for state in saved.values() for k, t in state.items()
              if t.is_floating_point() and t.dim() == 2 and "rotate" not in k}  # peftlab keeps R in fp32
    if settings.get("dtype") is None and len(dtypes) == 1:
        settings["dtype"] = dtypes.pop()
    settings = {k: v for k, v in settings.items() if v is not None}
    kind, config = read_pyreft_config(folder, positions, **settings)
    wrapped = get_method(kind).attach(model, config)
    for key, iv in wrapped.interventions.items():
        if key not in files:
            raise ModuleError(f"{folder}: no intkey file for intervention {key}; found {sorted(files)}")
        iv.import_state(_from_pyreft_state(kind, saved[key], str(files[key])), str(files[key]))
    if lora is not None:
        wrapped.load_adapter_state_dict({**wrapped.adapter_state_dict(), **{f"{LORA}.{k}": v for k, v in
                                                                         read_peft_folder(lora).items()}},
                                        where=str(lora))
    return wrapped.eval()


def _canonical_key(key: str) -> str:
    """pyvene wrote keys with dots before February 2025 (``layer.15.comp.block_output...``)."""
    m = _KEY.match(key)
    if not m:
        return key
    return f"layer_{m.group(1)}_comp_{m.group(2).replace('.', '_')}_unit_pos_nunit_1#{m.group(3)}"

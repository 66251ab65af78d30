"""Arithmetic on dense tensors: IA3 vectors and full-model task vectors (with TIES and DARE).

IA3 (PEM's operators): each vector acts through its deviation from one, l − 1, so a combination is
l = 1 + Σ cᵢ·(lᵢ − 1). That gives PEM's negation l' = 2 − l (c = −1), its scaled negation 1 − λ(l − 1) and, for
weights summing to one, its weighted addition Σ cᵢlᵢ; it never rescales every activation as a raw Σ cᵢlᵢ would.

Full models: θ = θ₀ + Σ cᵢ·(θᵢ − θ₀), tensor by tensor from the safetensors files (one shard in memory at a time),
in float32, cast back once. Options on the task vectors τᵢ = θᵢ − θ₀, per tensor:
- DARE (Yu et al. 2023): drop each entry with probability p, rescale the rest by 1/(1 − p); seeded.
- TIES (Yadav et al. 2023): keep each τᵢ's top ``density`` share by magnitude, elect each entry's sign from
  Σ cᵢτᵢ, and average, entry by entry, the cᵢτᵢ that agree with it (the paper's disjoint mean: divided by how
  many agree). Equal coefficients λ are the paper's λ: "x + y" is TIES with λ = 1.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from peftlab.compose.operands import ComposeError, Operand, check_finite
from peftlab.io import atomic_dir


def scaling_combine(operands: list[Operand], coefficients: dict[str, float]) -> dict[str, torch.Tensor]:
    """l = 1 + Σ cᵢ(lᵢ − 1) for every scaling vector (IA3's)."""
    return {key: 1 + sum(coefficients[o.name] * (o.tensors[key].float() - 1) for o in operands)
            for key in operands[0].tensors}


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Drop entries with probability ``drop``, rescale the survivors by 1/(1 − drop)."""
    keep = torch.rand(delta.shape, generator=generator) >= drop
    return delta * keep / (1 - drop)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries largest in magnitude, zero the rest."""
    k = max(1, round(density * delta.numel()))
    if k >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (delta.abs() >= threshold)


def combine_deltas(deltas: list[torch.Tensor], coefficients: list[float], ties: float | None = None,
                   dare_drop: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Σ cᵢτᵢ, or with ``ties`` TIES' disjoint mean; DARE (``dare_drop``) first, as in DARE-TIES."""
    if dare_drop is not None:
        deltas = [dare(d, dare_drop, generator) for d in deltas]
    if ties is None:
        return sum(c * d for c, d in zip(coefficients, deltas, strict=True))
    weighted = [c * trim(d, ties) for c, d in zip(coefficients, deltas, strict=True)]
    sign = torch.sign(sum(weighted))
    agree = [(torch.sign(w) == sign) & (w != 0) for w in weighted]
    return sum(w * a for w, a in zip(weighted, agree, strict=True)) / sum(agree).clamp(min=1)


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Where each tensor of a model folder lives (single file or shards)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    files = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            files.update(dict.fromkeys(st.keys(), f))  # noqa: SIM118
    return files


def task_vectors(base: Path, operands: list[Operand], coefficients: dict[str, float], out: Path,
                 ties: float | None = None, dare_drop: float | None = None, seed: int = 0,
                 overwrite: bool = False, record: Callable[[dict], str] | None = None) -> dict:
    """Write θ₀ + Σ cᵢ(θᵢ − θ₀) as a model folder shaped like ``base`` (same shards, config and tokenizer files);
    ``record`` turns the returned summary into the text of ``compose.json``, written with the folder."""
    if ties is not None and not 0 < ties <= 1:
        raise ComposeError(f"--ties density must be in (0, 1], got {ties}")
    if dare_drop is not None and not 0 <= dare_drop < 1:
        raise ComposeError(f"--dare drop rate must be in [0, 1), got {dare_drop}")
    where = {o.name: _tensor_files(o.folder) for o in operands}
    base_files = _tensor_files(base)
    for o in operands:
        missing = sorted(set(base_files) - set(where[o.name]))
        extra = sorted(set(where[o.name]) - set(base_files))
        if missing or extra:
            raise ComposeError(f"{o} and the base {base} hold different tensors: missing {missing[:3]}, extra "
                               f"{extra[:3]}")
    generator = torch.Generator().manual_seed(seed)
    names = [o.name for o in operands]
    shards = sorted(set(base_files.values()))
    changed = 0
    with atomic_dir(out, overwrite=overwrite) as tmp, ExitStack() as files:
        handles = {f: files.enter_context(safe_open(f, framework="pt"))
                   for f in {f for w in where.values() for f in w.values()}}
        for f in base.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        for shard in tqdm(shards, desc="compose: task vectors", unit="shard", disable=len(shards) < 2):
            result = {}
            with safe_open(shard, framework="pt") as st:
                for key in st.keys():  # noqa: SIM118
                    theta0 = st.get_tensor(key)
                    if not theta0.is_floating_point():
                        result[key] = theta0
                        continue
                    deltas = []
                    for name in names:
                        theta = handles[where[name][key]].get_tensor(key)
                        if theta.shape != theta0.shape:
                            raise ComposeError(f"{key}: shape {tuple(theta.shape)} in {name}, {tuple(theta0.shape)} "
                                               f"in the base {base}")
                        deltas.append(theta.float() - theta0.float())
                    mixed = combine_deltas(deltas, [coefficients[n] for n in names], ties, dare_drop, generator)
                    changed += int(bool(mixed.any()))
                    result[key] = (theta0.float() + mixed).to(theta0.dtype)
            check_finite(result)  # in the base's dtype, as written
            save_file(result, str(tmp / shard.name), metadata={"format": "pt"})
        summary = {"tensors_changed": changed, "tensors": len(base_files), "ties_density": ties,
                   "dare_drop": dare_drop, "seed": seed}
        if record is not None:
            (tmp / "compose.json").write_text(record(summary))
    return summary

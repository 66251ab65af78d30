"""The named inputs of a composition, read without a model, and the checks made before any arithmetic.

An operand is a single-adapter module folder (a LoRA or IA3 module, a plain peft folder) or a full model folder
(``config.json`` + safetensors; a task vector against ``--base``). Operands of one composition are all of one
kind and were made for the same base model, the same targets and shapes and the same prompt format; each
mismatch names both folders. Inputs are only read, never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from peftlab.methods import MethodConfig, get_method
from peftlab.module import MANIFEST, Manifest, ModuleError, read


class ComposeError(ValueError):
    """A composition that is undefined or inconsistent; the message names the operands at fault."""


@dataclass
class Operand:
    """One named input: a module (``manifest``, ``config``, ``tensors``) or a full model folder (``kind == "full"``)."""

    name: str
    folder: Path
    kind: str  # the algebra of the module's method (Method.composable: "low_rank", "scaling"), or "full"
    manifest: Manifest | None = None
    config: MethodConfig | None = None
    tensors: dict[str, torch.Tensor] | None = None
    method: str | None = None  # the module's method; None for a model folder

    def __str__(self) -> str:
        return f"{self.name} ({self.folder})"


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def read_operand(name: str, folder: str | Path) -> Operand:
    """Read ``folder`` as operand ``name``; refuses what arithmetic is not defined on, with the reason."""
    folder = Path(folder)
    if not name.isidentifier():
        raise ComposeError(f"module name {name!r} ({folder}) must be an identifier (letters, digits, _), so the "
                           f"expression can name it")
    if not (folder / MANIFEST).exists() and not (folder / "adapter_config.json").exists():
        if _is_model_folder(folder):
            return Operand(name, folder, "full")
        raise ComposeError(f"{name}: {folder} is neither a module folder (peftlab.json / adapter_config.json) nor "
                           f"a model folder (config.json + *.safetensors)")
    try:
        module = read(folder)
    except ModuleError as e:
        raise ComposeError(f"{name}: {e}") from None
    if len(module.manifest.adapters) != 1:
        raise ComposeError(f"{name}: {folder} holds adapters {sorted(module.manifest.adapters)}; compose takes one "
                           f"adapter per folder (peftlab multilora export writes each as a LoRA folder)")
    (adapter_name, adapter), = module.manifest.adapters.items()
    method = get_method(adapter.method)
    config = adapter.method_config(f"{folder}")
    reason = method.why_not_composable(config)
    if reason:
        raise ComposeError(f"{name}: {folder} is a {method.name} module, which compose cannot do arithmetic on: "
                           f"{reason}")
    return Operand(name, folder, method.composable, module.manifest, config, module.tensors[adapter_name],
                   method.name)


def shapes(operand: Operand) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape by key: a module's tensors, or a model folder's (read from the file headers)."""
    if operand.tensors is not None:
        return {k: tuple(v.shape) for k, v in operand.tensors.items()}
    found = {}
    for f in sorted(operand.folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                found[key] = tuple(st.get_slice(key).get_shape())
    return found


def check_compatible(operands: list[Operand], base: str | None = None) -> None:
    """Same kind, same base model (``base`` overrides the recorded names), same prompt format, same targets and
    shapes. LoRA ranks may differ: only each target layer's (out, in) must agree."""
    first = operands[0]
    for other in operands[1:]:
        if (other.kind, other.method) != (first.kind, first.method):
            raise ComposeError(f"{first} is {first.method or first.kind}, {other} is {other.method or other.kind}: "
                               f"compose operands of one method "
                               f"(merge LoRA/IA3 into model folders with peftlab merge to mix them)")
        if first.kind == "full":
            continue
        mine, theirs = first.manifest, other.manifest
        if base is None and mine.base_model and theirs.base_model and mine.base_model != theirs.base_model:
            raise ComposeError(f"{first} was trained on {mine.base_model!r}, {other} on {theirs.base_model!r}; if "
                               f"these name the same weights, say so with --base NAME")
        if mine.prompt_format != theirs.prompt_format:
            raise ComposeError(f"{first} was trained with prompt format {mine.prompt_format}, {other} with "
                               f"{theirs.prompt_format}; a composed module has one")
    reference = _layer_shapes(first)
    for other in operands[1:]:
        got = _layer_shapes(other)
        missing, extra = sorted(set(reference) - set(got)), sorted(set(got) - set(reference))
        if missing or extra:
            raise ComposeError(f"{other} and {first} target different layers: {other.name} lacks "
                               f"{missing[:3]}{'...' if len(missing) > 3 else ''} and has "
                               f"{extra[:3]}{'...' if len(extra) > 3 else ''} beyond {first.name}'s")
        wrong = next((k for k in reference if got[k] != reference[k]), None)
        if wrong is not None:
            raise ComposeError(f"{wrong}: shape {got[wrong]} in {other}, {reference[wrong]} in {first}")


def _layer_shapes(operand: Operand) -> dict[str, tuple[int, ...]]:
    """What must agree between operands: a LoRA's (out, in) per target layer, every tensor's shape otherwise."""
    found = shapes(operand)
    if operand.kind != "low_rank":
        return found
    layers: dict[str, tuple[int, ...]] = {}
    for key in found:
        layer, factor = split_lora_key(key, operand)
        if factor == "A":
            layers[layer] = (found[key.replace(".lora_A.", ".lora_B.")][0], found[key][1])
    return layers


def split_lora_key(key: str, operand: Operand) -> tuple[str, str]:
    """``...q_proj.lora_A.weight`` as (``...q_proj``, ``"A"``); other keys (embedding LoRAs, magnitudes) refused."""
    for factor in ("A", "B"):
        suffix = f".lora_{factor}.weight"
        if key.endswith(suffix):
            return key[: -len(suffix)], factor
    raise ComposeError(f"{operand}: tensor {key!r} is not a LoRA factor of a linear layer (lora_A/lora_B.weight); "
                       f"compose handles linear-layer LoRAs only")


def check_output(out: str | Path, folders: dict[str, str | Path]) -> None:
    """Refuse an output that is, lies inside or holds an input folder: writing it would replace or alter that input
    (real paths are compared, so links and ``..`` do not hide it)."""
    target = Path(out).resolve()
    for name, folder in folders.items():
        source = Path(folder).resolve()
        relation = ("is" if target == source else "is inside" if source in target.parents
                    else "holds" if target in source.parents else None)
        if relation:
            raise ComposeError(f"-o {out} {relation} the folder of input {name} ({folder}): writing it would alter "
                               f"that input; choose an output outside the inputs")


def check_finite(tensors: dict[str, torch.Tensor], what: str = "the result") -> None:
    """Refuse inf or NaN before anything is written: a coefficient finite in float64 (1e39) overflows float32."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ComposeError(f"{what}: {key} is not finite in {tensor.dtype} (inf or NaN): a coefficient is too "
                               f"large for the dtype it is written in")


def base_of(operands: list[Operand], base: str | None) -> str | None:
    """The base model the result is for: ``base`` if given, else the operands' recorded one."""
    return base or next((o.manifest.base_model for o in operands if o.manifest and o.manifest.base_model), None)


def describe(operands: list[Operand]) -> dict[str, dict]:
    return {o.name: {"folder": str(o.folder), "kind": o.method or o.kind,
                     "config": o.config.to_dict() if o.config is not None else None}
            for o in operands}

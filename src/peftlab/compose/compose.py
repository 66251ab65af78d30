"""``compose``: evaluate an expression over named modules and write the result, saying what the export cost.

Every result folder carries ``compose.json``: the expression, each module's coefficient, the operands, the mode,
the export and its measured error, so a composed module can be traced back and rebuilt.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

from peftlab.compose import lora
from peftlab.compose.dense import scaling_combine, task_vectors
from peftlab.compose.expression import Expression
from peftlab.compose.operands import (
    ComposeError,
    Operand,
    base_of,
    check_compatible,
    check_finite,
    check_output,
    describe,
    read_operand,
)
from peftlab.io import atomic_dir
from peftlab.methods import DEFAULT_ADAPTER
from peftlab.module import Adapter, Manifest, write_into

MODES = ("exact", "pem")
EXPORTS = ("adapter", "svd", "merged")
RECORD = "compose.json"


def compose(expression: str | Expression, modules: dict[str, str | Path], out: str | Path, *, mode: str = "exact",
            export: str = "adapter", rank: int | None = None, energy: float | None = None,
            base: str | None = None, ties: float | None = None, dare: float | None = None, seed: int = 0,
            numbers: dict[str, float] | None = None, overwrite: bool = False) -> dict:
    """Write ``expression`` over ``modules`` (name -> folder) to ``out``; returns what ``compose.json`` records.

    mode: ``exact`` (ΔW = Σ cᵢsᵢBᵢAᵢ) or ``pem`` (PEM's factor-wise rule, LoRA only; its error is measured).
    export: ``adapter`` (LoRA: rank-concatenated, exact; IA3: its vectors), ``svd`` (LoRA truncated to ``rank`` or
    to the smallest rank keeping ``energy``, error reported) or ``merged`` (a full model folder). Full model folders
    compose as task vectors against ``base`` (``ties``: TIES density, ``dare``: DARE drop rate, seeded).
    ``numbers`` binds the expression's other names (a λ).
    """
    if mode not in MODES or export not in EXPORTS:
        raise ComposeError(f"mode must be one of {MODES} and export one of {EXPORTS}; got {mode!r}, {export!r}")
    expression = expression if isinstance(expression, Expression) else Expression(expression)
    coefficients = expression.evaluate(numbers, modules=list(modules))
    for name, c in coefficients.items():
        if not math.isfinite(c):
            raise ComposeError(f"the coefficient of {name} is {c} in {expression.text!r}: it must be a finite number")
    unused = sorted(set(modules) - set(coefficients))
    if unused:
        raise ComposeError(f"modules {unused} are given but the expression {expression.text!r} does not use them")
    check_output(out, modules)
    operands = [read_operand(name, modules[name]) for name in coefficients]
    check_compatible(operands, base)
    kind = operands[0].kind
    if (ties is not None or dare is not None) and kind != "full":
        raise ComposeError("TIES and DARE act on dense task vectors: fold the modules into model folders first "
                           "(peftlab merge) and compose those with --base")
    if (rank is not None or energy is not None) and export != "svd":
        raise ComposeError("--rank and --energy choose the SVD export's rank: add --export svd")
    record = {"expression": expression.text, "numbers": numbers or {}, "coefficients": coefficients, "mode": mode,
              "export": export, "operands": describe(operands)}
    if kind == "full":
        if export == "svd" or mode == "pem":
            raise ComposeError("full model folders compose as task vectors into a model folder (no --export svd, "
                               "no --mode pem)")
        if base is None:
            raise ComposeError("full model folders compose as task vectors θ₀ + Σcᵢ(θᵢ − θ₀): name θ₀ with --base")
        from peftlab.models import resolve_model_path

        record.update(base_model=base, export="merged")
        theta0 = Path(resolve_model_path(base))
        check_output(out, {"--base": theta0})

        def written(summary: dict) -> str:
            record["result"] = summary
            return _text(record)

        task_vectors(theta0, operands, coefficients, Path(out), ties, dare, seed, overwrite, record=written)
        return record
    config, tensors, record["result"] = _adapter(kind, operands, coefficients, mode, export, rank, energy)
    check_finite(tensors)
    if "note" in record["result"]:
        print(f"compose: note: {record['result']['note']}", file=sys.stderr)
    manifest = Manifest({DEFAULT_ADAPTER: Adapter(operands[0].method, config.to_dict())}, base_of(operands, base),
                        operands[0].manifest.prompt_format)
    record["base_model"] = manifest.base_model
    if export == "merged":
        _merged(out, manifest, config, tensors, base, overwrite, _text(record))
        return record
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_into(tmp, manifest, {DEFAULT_ADAPTER: tensors})
        (tmp / RECORD).write_text(_text(record))
    return record


def _text(record: dict) -> str:
    return json.dumps(record, indent=2) + "\n"


def _adapter(kind: str, operands: list[Operand], coefficients: dict[str, float], mode: str, export: str,
             rank: int | None, energy: float | None) -> tuple:
    """(config, tensors, report) of the composed adapter."""
    if kind == "scaling":
        if export == "svd":
            raise ComposeError("--export svd truncates a LoRA's rank; IA3 vectors have none")
        return operands[0].config, scaling_combine(operands, coefficients), {
            "rule": "l = 1 + Σ cᵢ(lᵢ − 1) (PEM's additive form; exact and pem coincide)"}
    layers = lora.terms(operands, coefficients)
    template = operands[0].config
    if mode == "pem":
        if export == "svd":
            raise ComposeError("--mode pem keeps the modules' rank; it has no SVD export (use --mode exact)")
        factors, report = lora.pem(layers, operands)
        return (*lora.to_peft(factors, report["rank"], template), report)
    if export == "svd":
        factors, k, report = lora.truncate(layers, rank, energy)
        return (*lora.to_peft(factors, k, template), report)
    factors = {layer: lora.concat(layer_terms) for layer, layer_terms in layers.items()}
    total = next(iter(factors.values()))[0].shape[1]  # Σr, the same on every layer (operands share their layers)
    return (*lora.to_peft(factors, total, template), {"rank": total, "relative_error": 0.0,
                                                      "rule": "rank concatenation (exact)"})


def _merged(out: str | Path, manifest: Manifest, config, tensors: dict, base: str | None, overwrite: bool,
            record: str) -> None:
    """The composed adapter folded into its base model's weights: a full model folder (with ``compose.json``),
    written by the one merge path (``peftlab merge``) from the composed module."""
    from peftlab.adapters import merge

    with tempfile.TemporaryDirectory(prefix="peftlab-compose-") as tmp:
        write_into(Path(tmp), manifest, {DEFAULT_ADAPTER: tensors})
        merge(tmp, out, base_model=base, overwrite=overwrite, extra_files={RECORD: record})

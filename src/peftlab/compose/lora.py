"""Exact LoRA arithmetic: a combination Σ cᵢ·aᵢ of LoRAs is, on each target layer, ΔW = Σ cᵢ·sᵢ·BᵢAᵢ
(sᵢ = alpha/r, or alpha/√r with rsLoRA, each module's own), kept as its factors until it is written.

- ``concat``: A = [c₁s₁A₁; c₂s₂A₂; ...], B = [B₁ B₂ ...], rank Σrᵢ, scale 1. Exact, negative weights included.
- ``truncate``: the best rank-k approximation of that ΔW (Eckart–Young), computed from the factors through two QR
  decompositions and the SVD of a small Σr × Σr core, never from a dense ΔW; its relative error is reported.
- ``pem``: PEM's factor-wise rule (rank preserved): A = Σ (|cᵢ|/Σ|c|)·Aᵢ, B = Σ cᵢsᵢBᵢ. Exact only when every Aᵢ is
  the same (PEM trains all modules from one shared initialisation); the drift of the A's and the resulting error
  against the exact ΔW are measured and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from peftlab.compose.operands import ComposeError, Operand, check_finite, split_lora_key
from peftlab.methods.lora.config import LoraConfig

Factors = tuple[torch.Tensor, torch.Tensor]  # (B [out, r], A [r, in]): ΔW = B @ A


@dataclass
class LoraResult:
    """A composed LoRA: its config (scale 1: alpha = r), its tensors by peft key, and what the export cost."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    report: dict


@dataclass
class Term:
    """One module's share of one layer: coefficient c, the module's scale s and its raw factors (ΔW = c·s·B·A)."""

    coefficient: float
    scale: float
    b: torch.Tensor  # [out, r]
    a: torch.Tensor  # [r, in]


def terms(operands: list[Operand], coefficients: dict[str, float]) -> dict[str, list[Term]]:
    """Per target layer, the term of every operand with a non-zero coefficient."""
    layers: dict[str, list[Term]] = {}
    for operand in operands:
        c = coefficients[operand.name]
        if c == 0:
            continue
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in operand.tensors.items():
            layer, factor = split_lora_key(key, operand)
            pairs.setdefault(layer, {})[factor] = tensor.float()
        for layer, pair in pairs.items():  # c·s·A is what concat writes, and what the SVD must not get as inf
            check_finite({f"{layer}.lora_A.weight": c * operand.config.scaling * pair["A"]}, f"{operand} × {c:g}")
            layers.setdefault(layer, []).append(Term(c, operand.config.scaling, pair["B"], pair["A"]))
    if not layers:
        raise ComposeError("every coefficient is zero: the result is the base model itself, with nothing to write")
    return layers


def concat(layer_terms: list[Term]) -> Factors:
    """The exact rank-Σr factors of Σ cᵢ·sᵢ·BᵢAᵢ."""
    return (torch.cat([t.b for t in layer_terms], dim=1),
            torch.cat([t.coefficient * t.scale * t.a for t in layer_terms], dim=0))


def dense(layer_terms: list[Term]) -> torch.Tensor:
    """ΔW itself (for checks; the exports never build it)."""
    return sum(t.coefficient * t.scale * (t.b.double() @ t.a.double()) for t in layer_terms).float()


def _svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᵀ) of B @ A with U [out, q], Vᵀ [q, in], q ≤ rank: B = Q₁R₁, Aᵀ = Q₂R₂, B·A = Q₁(R₁R₂ᵀ)Q₂ᵀ."""
    q1, r1 = torch.linalg.qr(b.double())
    q2, r2 = torch.linalg.qr(a.double().T)
    u, s, vt = torch.linalg.svd(r1 @ r2.T)
    return q1 @ u, s, vt @ q2.T


def frobenius(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B @ A‖_F without forming B @ A: the norm of its singular values."""
    return float(torch.linalg.vector_norm(_svd(b, a)[1]))


def rank_for_energy(spectra: list[torch.Tensor], energy: float) -> int:
    """The smallest rank that keeps at least ``energy`` of Σσ² on every layer."""
    if not 0 < energy <= 1:
        raise ComposeError(f"energy must be in (0, 1], got {energy}")
    need = 1
    for s in spectra:
        total = float((s ** 2).sum())
        if total > 0:
            kept = torch.cumsum(s.double() ** 2, 0) / total
            need = max(need, int((kept < energy - 1e-12).sum()) + 1)
    return need


def truncate(layers: dict[str, list[Term]], rank: int | None = None,
             energy: float | None = None) -> tuple[dict[str, Factors], int, dict]:
    """The best rank-``rank`` factors of each layer's ΔW (or the smallest rank keeping ``energy`` of it
    everywhere), σ split as √σ into both factors; and the relative Frobenius error per layer and overall."""
    if (rank is None) == (energy is None):
        raise ComposeError("an SVD export needs a rank or an energy to keep (--rank K or --energy 0.99), not both")
    svds = {layer: _svd(*concat(t)) for layer, t in layers.items()}
    if energy is not None:
        rank = rank_for_energy([s for _, s, _ in svds.values()], energy)
    if rank < 1:
        raise ComposeError(f"rank must be at least 1, got {rank}")
    sum_r = sum(t.a.shape[0] for t in next(iter(layers.values())))  # the same on every layer
    capped = {}
    if rank > sum_r:  # a sum of rank-rᵢ products has at most Σr non-zero σ: more rank would only add zero rows
        capped = {"requested_rank": rank, "note": f"--rank {rank} is above Σr = {sum_r}, the most ΔW can have: "
                                                  f"rank {sum_r} written, which loses nothing"}
        rank = sum_r
    out, errors, dropped_total, energy_total = {}, {}, 0.0, 0.0
    for layer, (u, s, vt) in svds.items():
        k = min(rank, len(s))
        root = s[:k].sqrt()
        b, a = u[:, :k] * root, root[:, None] * vt[:k]
        if k < rank:  # zero-pad: every layer of one peft adapter has the same rank
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
            a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], 0)
        out[layer] = (b.float(), a.float())
        dropped, total = float((s[k:] ** 2).sum()), float((s ** 2).sum())
        errors[layer] = (dropped / total) ** 0.5 if total > 0 else 0.0
        dropped_total, energy_total = dropped_total + dropped, energy_total + total
    report = {"rank": rank, "relative_error": (dropped_total / energy_total) ** 0.5 if energy_total else 0.0,
              "max_layer_relative_error": max(errors.values()), "layer_relative_error": errors, **capped}
    return out, rank, report


def pem(layers: dict[str, list[Term]], operands: list[Operand]) -> tuple[dict[str, Factors], dict]:
    """PEM's factor-wise combination (rank preserved) and how far it is from the exact ΔW."""
    ranks = {o.name: o.config.r for o in operands}
    if len(set(ranks.values())) != 1:
        raise ComposeError(f"--mode pem averages the A factors, so every LoRA needs the same rank; got {ranks}")
    out, drift, error, gaps, sizes = {}, {}, {}, 0.0, 0.0
    for layer, layer_terms in layers.items():
        total = sum(abs(t.coefficient) for t in layer_terms)
        mean_a = sum(abs(t.coefficient) / total * t.a for t in layer_terms)
        b = sum(t.coefficient * t.scale * t.b for t in layer_terms)
        check_finite({f"{layer}.lora_B.weight": b})
        out[layer] = (b, mean_a)
        norm = float(mean_a.norm())
        drift[layer] = max(float((t.a - mean_a).norm()) / norm if norm else 0.0 for t in layer_terms)
        exact_b, exact_a = concat(layer_terms)
        size = frobenius(exact_b, exact_a)
        gap = frobenius(torch.cat([b, exact_b], 1), torch.cat([mean_a, -exact_a], 0))
        error[layer] = gap / size if size else 0.0
        gaps, sizes = gaps + gap ** 2, sizes + size ** 2
    report = {"rank": next(iter(ranks.values())), "max_a_drift": max(drift.values()),
              "relative_error": (gaps / sizes) ** 0.5 if sizes else 0.0,
              "max_layer_relative_error": max(error.values()), "layer_a_drift": drift,
              "layer_relative_error": error}
    if report["max_a_drift"] > 0.1:
        report["warning"] = (f"the A factors differ by up to {report['max_a_drift']:.0%} between modules (PEM's "
                             f"rule needs one shared initialisation); the result is {report['relative_error']:.1%} "
                             f"off the exact ΔW: use --mode exact")
    return out, report


def to_peft(layers: dict[str, Factors], rank: int, template: LoraConfig) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Factors per layer as a peft LoRA's config and tensors (alpha = r: the scale is already in the factors)."""
    config = replace(template, r=rank, alpha=rank, use_rslora=False)
    tensors = {}
    for layer, (b, a) in layers.items():
        tensors[f"{layer}.lora_A.weight"] = a.contiguous()
        tensors[f"{layer}.lora_B.weight"] = b.contiguous()
    return config, tensors

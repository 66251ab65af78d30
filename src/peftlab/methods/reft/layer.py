"""The ReFT intervention functions Φ(h), with the paper's math and pyreft's parameter names.

d is the hidden size, r the rank. R ∈ R^{r×d} has orthonormal rows; ``rotate_layer.weight`` (= Rᵀ, [d, r]) is
the Q factor of an unconstrained [d, r] matrix (a QR parametrisation). So the only state is that [d, r] matrix
(no d×d buffer as with torch's default orthogonal map), weight decay cannot break orthonormality (Q ignores scale;
torch's Householder map without trivialisation zeroes a column once decay moves its stored sign), and an assigned
R is kept exactly and stays orthonormal through further training.
W, b form ``learned_source`` (Linear d→r); W₂ is ``proj_layer`` (Linear d→r).

Dropout acts on the whole intervened vector h + Δ, as in pyreft. Φ computes in fp32 (R is always fp32; W, b may
be stored in another dtype) and returns the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.activations import ACT2FN

from peftlab.methods.base import AdapterMismatchError

_ROTATION_ORIGINAL = "rotate_layer.parametrizations.weight.original"


class _QFactor(nn.Module):
    """Maps any full-rank [d, r] matrix to the Q of its QR decomposition, signs fixed so that Q maps to itself."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(a)
        return q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1)

    def right_inverse(self, q: torch.Tensor) -> torch.Tensor:
        return q


class _Rotation(nn.Module):
    def __init__(self, d: int, r: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, r))
        nn.init.orthogonal_(self.weight)


def rotation(d: int, r: int) -> nn.Module:
    """A [d, r] matrix with orthonormal columns at every step (R = weight.T has orthonormal rows)."""
    if r > d:
        raise ValueError(f"rank {r} exceeds the hidden size {d}")
    module = _Rotation(d, r)
    parametrize.register_parametrization(module, "weight", _QFactor())
    return module


class Intervention(nn.Module):
    """Base: holds rank, dropout and activation; subclasses define ``delta`` (Φ(h) = h + Δ(h))."""

    def __init__(self, d: int, r: int, dropout: float = 0.0, act: str | None = "linear") -> None:
        super().__init__()
        self.d, self.r = d, r
        self.dropout = nn.Dropout(dropout)
        self.act = ACT2FN["linear" if act in (None, "linear") else act]

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h32 = h.float()
        return self.dropout(h32 + self.delta(h32)).to(h.dtype)

    def export_state(self) -> dict[str, torch.Tensor]:
        """Trained tensors by name; R is written as its [d, r] matrix (``rotate_layer``), not its parametrisation."""
        state = {}
        for name, p in self.named_parameters():
            if name == _ROTATION_ORIGINAL:
                state["rotate_layer"] = self.rotate_layer.weight.detach().clone()
            else:
                state[name] = p.detach().clone()
        return state

    @torch.no_grad()
    def import_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load ``export_state`` tensors; R goes through the parametrisation, so it stays orthonormal in training."""
        expected = {k: tuple(v.shape) for k, v in self.export_state().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if expected != got:
            raise ValueError(f"{where}: tensors {got} do not fit this {type(self).__name__} (rank {self.r}, "
                             f"hidden size {self.d}), which expects {expected}")
        for name, tensor in state.items():
            if name == "rotate_layer":
                gram = tensor.float().T @ tensor.float()
                deviation = (gram - torch.eye(self.r, device=gram.device)).abs().max()
                if deviation > 1e-3:
                    raise AdapterMismatchError(
                        f"{where}: rotate_layer does not have orthonormal columns (max |RᵀR - I| = "
                        f"{deviation:.3g})" + (
                            "; it is all zeros, which is what pyreft's LoReFT becomes when trained with weight "
                            "decay on R (torch's Householder map reads its diagonal with .int()): retrain it with "
                            "weight_decay 0 for rotate_layer" if not tensor.any() else ""))
                stored = self.rotate_layer.parametrizations.weight.original  # R is set in place: where it lives
                self.rotate_layer.weight = tensor.to(device=stored.device, dtype=torch.float32)
            else:
                target = self.get_parameter(name)
                target.copy_(tensor.to(target.dtype))


class _Linear(Intervention):
    """Φ built from the learned source act(Wh + b) (``learned_source``) and either an orthonormal R
    (``rotate_layer``) or a free projection W₂ (``proj_layer``)."""

    def __init__(self, d: int, r: int, dtype: torch.dtype = torch.float32, orthonormal: bool = True,
                 add_bias: bool = False, **kw) -> None:
        super().__init__(d, r, **kw)
        if orthonormal:
            self.rotate_layer = rotation(d, r)
        else:
            self.proj_layer = nn.Linear(d, r, bias=add_bias).to(dtype)
        self.learned_source = nn.Linear(d, r).to(dtype)

    def source(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.learned_source(h.to(self.learned_source.weight.dtype))).float()


class LoReFT(_Linear):
    """h + Rᵀ(act(Wh + b) − Rh): edit h only inside the r-dim subspace spanned by R (the paper's eq. 2)."""

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        rt = self.rotate_layer.weight  # computed once per call: [d, r]
        return (self.source(h) - h @ rt) @ rt.T


class OrthDiReFT(_Linear):
    """h + Rᵀ act(Wh + b) with R orthonormal: pyreft's ``DireftIntervention`` (an ablation in the paper)."""

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.source(h) @ self.rotate_layer.weight.T


class NoReFT(_Linear):
    """h + W₂ᵀ(act(W₁h + b) − W₂h): LoReFT without the orthogonality constraint."""

    def __init__(self, d: int, r: int, **kw) -> None:
        super().__init__(d, r, orthonormal=False, **kw)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        w2 = self.proj_layer
        return (self.source(h) - w2(h.to(w2.weight.dtype)).float()) @ w2.weight.float()


class DiReFT(_Linear):
    """h + W₂ᵀ act(W₁h + b): the paper's DiReFT (eq. 3), pyreft's ``NodireftIntervention``."""

    def __init__(self, d: int, r: int, **kw) -> None:
        super().__init__(d, r, orthonormal=False, **kw)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return self.source(h) @ self.proj_layer.weight.float()


class _Constant(Intervention):
    """Φ built from a learned constant b (``learned_source``, U[0, 1) at init as in pyreft) and an orthonormal R."""

    def __init__(self, d: int, r: int, dtype: torch.dtype = torch.float32, **kw) -> None:
        super().__init__(d, r, **kw)
        self.rotate_layer = rotation(d, r)
        self.learned_source = nn.Parameter(torch.rand(r))


class ConsReFT(_Constant):
    """h + Rᵀ(b − Rh): set the subspace coordinates to a learned constant b (no dropout, as in pyreft)."""

    def __init__(self, d: int, r: int, **kw) -> None:
        super().__init__(d, r, **kw)
        self.dropout = nn.Identity()

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        rt = self.rotate_layer.weight
        return (self.learned_source - h @ rt) @ rt.T


class LobiReFT(_Constant):
    """h + Rᵀb: a learned constant shift inside the subspace (BitFit-like)."""

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        return (self.learned_source @ self.rotate_layer.weight.T).expand_as(h)


INTERVENTIONS: dict[str, type[Intervention]] = {
    "loreft": LoReFT, "noreft": NoReFT, "direft": DiReFT, "direft_orth": OrthDiReFT,
    "consreft": ConsReFT, "lobireft": LobiReFT,
}
# pyreft's class names, for reading and writing its checkpoints
PYREFT_NAMES = {"loreft": "LoreftIntervention", "noreft": "NoreftIntervention", "direft": "NodireftIntervention",
                "direft_orth": "DireftIntervention", "consreft": "ConsreftIntervention",
                "lobireft": "LobireftIntervention"}

"""Bitune's parts that are not the model's: the learned key/value mixer and the bidirectional attention mask."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache


class KVMixer(nn.Module):
    """Per-layer coefficients that blend the causal and the other pass's keys (and, separately, values).

    Kept and computed in fp32 whatever the model's dtype, as the paper does.
    """

    def __init__(self, n_layers: int, gate: str = "abs", eps: float = 0.01, init: float = 0.01) -> None:
        super().__init__()
        self.gate, self.eps = gate, eps
        self.key_weight = nn.Parameter(torch.full((n_layers,), float(init)))
        self.value_weight = nn.Parameter(torch.full((n_layers,), float(init)))

    def share(self, weight: torch.Tensor) -> torch.Tensor:
        """The share of the bidirectional (other) features, in [0, 1)."""
        g = weight.abs() if self.gate == "abs" else weight.relu()
        return g / (g + self.eps)

    def forward(self, causal: DynamicCache, other: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.key_weight)
        if len(causal.layers) != n or len(other.layers) != n:
            raise ValueError(f"mixer has {n} layers but the caches have {len(causal.layers)}/{len(other.layers)}")
        a_k, a_v = self.share(self.key_weight), self.share(self.value_weight)
        return [(_blend(c.keys, o.keys, a_k[i]), _blend(c.values, o.values, a_v[i]))
                for i, (c, o) in enumerate(zip(causal.layers, other.layers, strict=True))]


def _blend(causal: torch.Tensor, other: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return ((1 - a) * causal.float() + a * other.float()).to(causal.dtype)


def bidirectional_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, L, L]: every token sees every real token (pads see themselves, to stay finite)."""
    allowed = mask.bool()[:, None, None, :] | torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)

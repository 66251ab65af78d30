"""The batched LoRA layer: N adapters stacked in one tensor per factor, one adapter per example (or per token).

A: [N, r, in] and B: [N, out, r] in peft's orientation (``lora_A.weight`` is [r, in]); an adapter of smaller rank
fills its first rows/columns and leaves zeros (exact: the zeros get zero gradients and stay zero). ``lora_delta``
is the kernel: no dense per-example ΔW, no Python loop over adapters; a GPU kernel (punica-style SGMV/BGMV) can
replace it without touching its callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.context import CallContext, per_row


@dataclass
class TokenGroups:
    """Tokens grouped by adapter: where each token goes in a padded [groups, longest, features] block, or, with
    few adapters, a one-hot ``weights`` [tokens, groups] that masks every adapter's output to its own tokens."""

    order: torch.Tensor  # token indices sorted by adapter
    groups: torch.Tensor  # the adapter of each group
    slot: torch.Tensor  # for each sorted token, its flat position in the block
    longest: int
    weights: torch.Tensor | None = None

    MASKED_UP_TO = 256  # adapters x rank: beyond this, grouping beats computing every adapter on every token

    @classmethod
    def of(cls, slots: torch.Tensor, rank: int, masked_up_to: int = MASKED_UP_TO) -> TokenGroups:
        tokens = slots.reshape(-1)
        order = torch.argsort(tokens, stable=True)
        groups, counts = torch.unique_consecutive(tokens[order], return_counts=True)
        longest = int(counts.max())
        group_of = torch.repeat_interleave(torch.arange(len(groups), device=slots.device), counts)
        position = torch.arange(len(order), device=slots.device) - torch.repeat_interleave(counts.cumsum(0) - counts,
                                                                                            counts)
        weights = None
        if len(groups) * rank <= masked_up_to:
            weights = ((tokens[:, None] == groups[None]) & (groups[None] >= 0)).float()
        return cls(order, groups, group_of * longest + position, longest, weights)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
               slots: torch.Tensor, groups: TokenGroups | None = None) -> torch.Tensor:
    """scaling[s] · B[s] A[s] x for each token x of ``x`` [R, T, in], s its adapter (-1: none, a zero delta).

    ``slots`` is per row [R] (gather each row's factors: two batched matmuls, BGMV-like) or per token [R, T]
    (tokens grouped by adapter into a padded [G, L, in] block: a segmented matmul, SGMV-like; ``groups``, the
    grouping, is the same for every layer of a call and can be computed once).
    """
    if slots.dim() == 1:
        keep = (slots >= 0).to(x.dtype)
        s = slots.clamp(min=0)
        h = torch.bmm(x, lora_a[s].transpose(1, 2))  # [R, T, r]
        return torch.bmm(h, lora_b[s].transpose(1, 2)) * (scaling[s] * keep)[:, None, None]
    groups = groups or TokenGroups.of(slots, lora_a.shape[1])
    rows, width, features = x.shape
    flat = x.reshape(rows * width, features)
    if groups.weights is not None:  # few adapters: every token through all of them, each masked to its own
        used, rank = groups.groups.clamp(min=0), lora_a.shape[1]
        h = flat @ lora_a[used].reshape(-1, features).T  # [n, G * r]
        h = (h.view(len(flat), len(used), rank) * (groups.weights * scaling[used])[:, :, None]).flatten(1)
        return (h @ lora_b[used].permute(1, 0, 2).reshape(lora_b.shape[1], -1).T).reshape(rows, width, -1)
    block = flat.new_zeros(len(groups.groups) * groups.longest, features).index_copy(0, groups.slot, flat[groups.order])
    grouped = lora_delta(block.view(len(groups.groups), groups.longest, features), lora_a, lora_b, scaling,
                         groups.groups)  # [G, L, out]: one adapter per group
    out = grouped.new_empty(rows * width, grouped.shape[-1])
    out[groups.order] = grouped.reshape(-1, grouped.shape[-1]).index_select(0, groups.slot)
    return out.reshape(rows, width, -1)


def lora_delta_all(x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor, weights: torch.Tensor
                   ) -> torch.Tensor:
    """``lora_delta`` for one adapter per row, computed as every adapter on every row, each row masked to its own:
    ``a_rows`` [N·r, in] and ``b_rows`` [N·r, out] are the N adapters side by side, ``weights`` [R, N] each row's
    scaling on its adapter and 0 elsewhere (``row_weights``). Two plain matmuls and no per-row gather of factors,
    which on a decode step (one token per row) costs more than the extra arithmetic while N·r is small."""
    rows, adapters = weights.shape
    h = (x @ a_rows.T).view(rows, -1, adapters, a_rows.shape[0] // adapters) * weights[:, None, :, None]
    return h.flatten(2) @ b_rows


def row_weights(slots: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """[R, N]: row i's scaling at its adapter's column, 0 elsewhere (and everywhere for slot -1, the base)."""
    return (slots[:, None] == torch.arange(len(scaling), device=slots.device)[None]).to(scaling.dtype) * scaling


class MultiLoraLinear(nn.Module):
    """``base(x) + lora_delta(dropout(x))`` with the adapter of each example read from the call's context, plus an
    optional shared LoRA (``shared_A`` [r, in], ``shared_B`` [out, r]) that every example runs with beside its own:
    DIT trains one such adapter on top of many per-example weight diffs, in one batch."""

    def __init__(self, base_layer: nn.Linear, context: CallContext, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        device, features = base_layer.weight.device, (base_layer.in_features, base_layer.out_features)
        self.lora_A = nn.Parameter(torch.zeros(0, 0, features[0], device=device))
        self.lora_B = nn.Parameter(torch.zeros(0, features[1], 0, device=device))
        self.register_buffer("scaling", torch.zeros(0, device=device))
        self.register_parameter("shared_A", None)
        self.register_parameter("shared_B", None)
        self.shared_scaling = 0.0
        self._side_by_side: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def side_by_side(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [N·r, in], B [N·r, out]) for ``lora_delta_all``, kept until the factors change (replaced when adapters
        are added or removed; their version counters move when they are written in place)."""
        key = (id(self.lora_A), self.lora_A._version, id(self.lora_B), self.lora_B._version)
        if self._side_by_side is None or self._side_by_side[0] != key:
            a, b = self.lora_A.detach(), self.lora_B.detach()
            self._side_by_side = key, (a.reshape(-1, a.shape[2]), b.transpose(1, 2).reshape(-1, b.shape[1]))
        return self._side_by_side[1]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @torch.no_grad()
    def grow(self, ranks: list[int], scalings: list[float], seeds: list[int]) -> None:
        """Append one adapter per entry (A: peft's Kaiming-uniform init drawn from its own seed, B: zeros), padding
        ranks to the largest."""
        rank = max([self.rank, *ranks])
        old_a, old_b = self.lora_A, self.lora_B
        n_old, n_new = old_a.shape[0], len(ranks)
        a = old_a.new_zeros(n_old + n_new, rank, old_a.shape[2])
        b = old_b.new_zeros(n_old + n_new, old_b.shape[1], rank)
        a[:n_old, :old_a.shape[1]], b[:n_old, :, :old_b.shape[2]] = old_a, old_b
        bound = 1 / math.sqrt(a.shape[2])  # kaiming_uniform_(a=sqrt(5)) on a [r, in] matrix, as peft inits lora_A
        for i, (r, seed) in enumerate(zip(ranks, seeds, strict=True)):
            uniform = torch.rand(r, a.shape[2], generator=torch.Generator().manual_seed(seed))
            a[n_old + i, :r] = (uniform * 2 - 1) * bound
        self.lora_A = nn.Parameter(a, requires_grad=old_a.requires_grad)
        self.lora_B = nn.Parameter(b, requires_grad=old_b.requires_grad)
        self.scaling = torch.cat([self.scaling, torch.tensor(scalings, device=a.device)])
        self._side_by_side = None

    @torch.no_grad()
    def add_shared(self, rank: int, scaling: float, seed: int) -> None:
        """The shared adapter, initialised as ``grow`` initialises a routed one (B zero: it starts as a no-op)."""
        device, features = self.lora_A.device, (self.base_layer.in_features, self.base_layer.out_features)
        uniform = torch.rand(rank, features[0], generator=torch.Generator().manual_seed(seed)).to(device)
        self.shared_A = nn.Parameter((uniform * 2 - 1) / math.sqrt(features[0]))
        self.shared_B = nn.Parameter(torch.zeros(features[1], rank, device=device))
        self.shared_scaling = scaling

    def remove_shared(self) -> None:
        self.shared_A = self.shared_B = None
        self.shared_scaling = 0.0

    @torch.no_grad()
    def drop(self, slot: int) -> None:
        keep = [i for i in range(self.lora_A.shape[0]) if i != slot]
        self.lora_A = nn.Parameter(self.lora_A[keep], requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(self.lora_B[keep], requires_grad=self.lora_B.requires_grad)
        self.scaling = self.scaling[keep]
        self._side_by_side = None

    def _one_lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling) -> torch.Tensor:
        """scaling · B A dropout(x) for one LoRA that every example runs with (the shared adapter, or a call whose
        examples all name one adapter): plain matmuls, no per-example gather."""
        return (self.dropout(x).to(a.dtype) @ a.T @ b.T) * scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.shared_A is not None:
            y = y + self._one_lora(x, self.shared_A, self.shared_B, self.shared_scaling).to(y.dtype)
        if self.lora_A.shape[0] == 0:  # only the shared adapter
            return y
        slots, only = self.context.adapter_slots, self.context.only_slot
        if slots is None:
            if self.lora_A.shape[0] != 1:
                raise ValueError(f"this MultiLoRA model holds {self.lora_A.shape[0]} adapters: name one per example "
                                 f"(the record's 'adapter' field, generate(adapters=...), or '__base__')")
            only = 0
        if only is not None:  # every example on one adapter
            if only < 0:
                return y
            return y + self._one_lora(x, self.lora_A[only], self.lora_B[only], self.scaling[only]).to(y.dtype)
        if slots.dim() == 1:
            slots = per_row(slots, x.shape[0])
        elif tuple(slots.shape) != tuple(x.shape[:2]):
            raise ValueError(f"per-token adapters {tuple(slots.shape)} do not fit inputs {tuple(x.shape[:2])}")
        x = self.dropout(x).to(self.lora_A.dtype)
        if slots.dim() == 1 and x.shape[1] == 1 and not torch.is_grad_enabled() \
                and self.lora_A.shape[0] * self.rank <= TokenGroups.MASKED_UP_TO:  # a decode step
            weights = self.context.memo("row_weights", lambda: row_weights(slots, self.scaling))  # one per call
            return y + lora_delta_all(x, *self.side_by_side(), weights).to(y.dtype)
        groups = self.context.memo("token_groups", lambda: TokenGroups.of(slots, self.rank)) \
            if slots.dim() == 2 else None
        delta = lora_delta(x, self.lora_A, self.lora_B, self.scaling, slots, groups)
        return y + delta.to(y.dtype)

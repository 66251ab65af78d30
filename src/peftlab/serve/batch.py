"""A lane: one model and the sequences it decodes together, joining and leaving between decode steps.

The running batch is left-padded: row i of the KV cache holds sequence i's prompt and answer so far, right-aligned,
with an attention mask over the padding. New sequences are read in one prefill call of their own (left-padded
among themselves) and their cache rows are appended, the shorter side padded on the left; finished rows are
dropped and padding that no row needs any more is cut off. Every row keeps one sampled token that is not yet in
the cache (``pending``); a decode step feeds all of them at once and returns the logits of the next ones.

Positions count each row's real tokens, as an unpadded forward would, so a row's answer does not depend on
what it was batched with (up to float rounding).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from peftlab.context import BASE_ADAPTER
from peftlab.methods import PeftlabModel


@dataclass
class Row:
    """What a lane needs to know about one sequence: its prompt and the adapter it runs with."""

    prompt_ids: list[int]
    adapter: str = BASE_ADAPTER


@dataclass
class Lane:
    """One model (a MultiLoRA model routing each row to its adapter, or one module of any method) and its batch."""

    model: PeftlabModel
    routable: bool  # rows may name different adapters (a MultiLoRA model); otherwise every row uses the module
    rows: list[Row] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # [rows, cached tokens]: 1 where a real token is cached
    pending: torch.Tensor | None = None  # [rows]: the last sampled token of each row, not yet in the cache
    routes: dict | None = None  # the rows' adapter fields, kept until rows join or leave

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __len__(self) -> int:
        return len(self.rows)

    def _fields(self, rows: list[Row]) -> dict:
        if not self.routable:
            return {}
        names = sorted({r.adapter for r in rows})
        index = torch.tensor([names.index(r.adapter) for r in rows], device=self.device)
        return {"adapter_names": names, "adapter_index": index}

    @torch.no_grad()
    def prefill(self, rows: list[Row]) -> torch.Tensor:
        """Read ``rows``' prompts and append them to the batch; the logits [len(rows), vocab] of their first
        answer token (the caller samples it and hands it back through ``set_pending``)."""
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model.prefill(ids, mask, positions, cache, **self._fields(rows))
        self._append(rows, cache, mask)
        return logits

    def _append(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        self.routes = None
        if self.cache is None:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows += rows

    def set_pending(self, tokens: torch.Tensor) -> None:
        """The sampled tokens of the newest rows (after ``prefill``) or of every row (after ``decode``)."""
        tokens = tokens.to(self.device)
        if self.pending is None or len(tokens) == len(self.rows):
            self.pending = tokens
        else:
            self.pending = torch.cat([self.pending, tokens])

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        """Feed every row's pending token; the logits [rows, vocab] of each row's next token."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        if self.routes is None:
            self.routes = self._fields(self.rows)
        return self.model.decode(self.pending[:, None], self.mask, positions, self.cache, **self.routes)

    def keep(self, keep: list[bool]) -> None:
        """Drop the rows where ``keep`` is False, and the padding columns no remaining row needs."""
        if all(keep):
            return
        self.routes = None
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
        self.rows = [r for r, k in zip(self.rows, keep, strict=True) if k]
        if not self.rows:
            self.cache = self.mask = self.pending = None
            return
        mask = self.mask[index]
        start = int(mask.any(0).int().argmax())  # the first column some row still reads
        self.mask, self.pending = mask[:, start:], self.pending[index]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` padded with zeros on the left of dimension ``dim`` (1: a mask [B, T]; 2: keys [B, H, T, D])."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else nucleus sampling at the row's temperature and top_p;
    a row with its own generator (a request's ``seed``) draws from it, so its answer does not depend on its
    neighbours."""
    tokens = logits.argmax(-1)
    sampled = (temperature > 0).nonzero().flatten().tolist()
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    probs = torch.softmax(logits[rows].float() / temperature[rows, None], -1)
    ordered, order = probs.sort(-1, descending=True)
    outside = ordered.cumsum(-1) - ordered > top_p[rows, None]  # beyond the nucleus (the top token always stays)
    ordered = ordered.masked_fill(outside, 0)
    draws = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
    own = [i for i, row in enumerate(sampled) if generators[row] is not None]
    shared = [i for i, row in enumerate(sampled) if generators[row] is None]
    if shared:
        draws[shared] = torch.multinomial(ordered[shared], 1).flatten()
    for i in own:
        draws[i] = torch.multinomial(ordered[i], 1, generator=generators[sampled[i]]).item()
    tokens[rows] = order.gather(1, draws[:, None]).flatten()
    return tokens


def clone_sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose modules are its own (hooks and injected layers stay on the copy) but whose
    parameters and buffers are the original's tensors: one base model in memory, however many lanes."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)

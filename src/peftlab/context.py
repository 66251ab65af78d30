"""Per-example information in one model call: which adapter each example uses, where each prompt ends.

These fields travel explicitly from a record through ``data.encode`` and ``data.Collator`` to the forward or
generate call of a ``PeftlabModel``, which binds them to its ``CallContext``; layers and hooks read them there, on
every forward the call makes (decode steps included). Nothing is inferred from a convention such as labels.

Shapes: one value per row ``[B]`` in a padded batch; one per token ``[1, T]`` in a packed row (each token carries
its example's value). ``generate()`` repeats each row for beams and ``num_return_sequences``; ``CallContext``
repeats per-row fields to match the rows it sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

BASE_ADAPTER = "__base__"  # the name that routes an example to the base model alone (peft's convention)


@dataclass
class ExampleFields:
    """What a call knows per example, under the keyword names a forward/generate call takes."""

    prompt_lengths: torch.Tensor | None = None  # prompt tokens of each example, counted from its first real token
    adapter_names: list[str] | None = None  # the adapters this batch uses
    adapter_index: torch.Tensor | None = None  # each example's adapter, as an index into adapter_names

    @classmethod
    def pop(cls, kwargs: dict[str, Any]) -> ExampleFields:
        """Take the fields out of a call's keyword arguments (the wrapped model does not know them)."""
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})


class CallContext:
    """The fields of the latest call, for layers and hooks. A call replaces them; they stay until the next call,
    because gradient checkpointing runs the layers again during backward, after the call returned."""

    def __init__(self) -> None:
        self.fields = ExampleFields()
        self.adapter_slots: torch.Tensor | None = None  # per example: the index of its adapter in the model
        self.only_slot: int | None = None  # the slot of every example, when the call names one adapter
        self._memo: dict[str, Any] = {}

    def bind(self, fields: ExampleFields, adapter_slots: torch.Tensor | None = None,
             only_slot: int | None = None) -> None:
        self.fields, self.adapter_slots, self.only_slot, self._memo = fields, adapter_slots, only_slot, {}

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per call, shared by every layer that asks (e.g. how a packed row's tokens group)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def clear(self) -> None:
        self.bind(ExampleFields())


def per_row(values: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row ``values`` for a call of ``rows`` rows: generate() repeats each example k times in place (beams,
    samples), so each value is repeated k times."""
    if rows % len(values):
        raise ValueError(f"{len(values)} examples do not divide the {rows} rows of this call")
    return values if rows == len(values) else values.repeat_interleave(rows // len(values))


def per_token(values: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """``values`` per row ``[B]`` or per token ``[B, T]`` as a ``[rows, T]`` tensor for a call of ``shape``.

    A call with k times as many rows as examples is generate() repeating each example k times (beams, samples):
    each value is repeated k times in place, as generate repeats the prompts.
    """
    rows, width = shape
    if values.dim() == 2:
        if tuple(values.shape) != (rows, width):
            raise ValueError(f"per-token field of shape {tuple(values.shape)} does not fit a call of {rows}x{width}")
        return values
    return per_row(values, rows)[:, None].expand(rows, width)

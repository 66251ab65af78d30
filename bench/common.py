"""Shared by the benchmarks: wall time of generation and of one training step, medians with their spread, memory
from /proc, the trainable-parameter lines."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def memory_mb(field: str = "VmRSS") -> float:
    """This process's memory from /proc/self/status in MiB: ``VmRSS`` now, ``VmHWM`` its peak. (Not ru_maxrss: a
    child started by exec inherits its parent's, so it would report the parent's peak.)"""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))) / 1024


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def generation_times(model, batch: dict, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the whole generation) with exactly ``new_tokens`` tokens."""
    settings = {"do_sample": False, "eos_token_id": None, "pad_token_id": batch["pad"]}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    first = timed(lambda: model.generate(**inputs, max_new_tokens=1, **settings))
    whole = timed(lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         **settings))
    return first, whole


def train_step_time(model, batch: dict) -> float:
    """One forward + backward + AdamW step, after a warm-up step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    return timed(step)


def print_trainable(reports: dict) -> None:
    """One line per contender: trainable parameters and their share of the frozen base model."""
    for name, report in reports.items():
        print(f"trainable        {name:<6} {report['trainable_parameters']:>9,} "
              f"({report['trainable_percent']:.4f}% of {report['base_parameters']:,})")

"""Training data for Re-Tuning and its two baselines: every (prompt, response) of every problem, deduplicated,
filtered and oversampled by sub-problem size, as JSONL records ``peftlab train`` reads.

The research note's tables (drop most mid-size prompts, repeat the base cases hundreds of times) are config here:
``keep`` and ``repeat`` map a sub-problem size to a fraction kept or a repeat factor. A fixed repeat factor gives a
smaller share the wider the range of lengths, so ``share`` instead raises a size to at least a given share of the
whole data.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import ConfigError
from peftlab.data import PromptFormat
from peftlab.recipes.retune.tasks import METHODS, get_task

# Prompts are raw text (the task templates already end in "\nSolution: " / "\nAnswer: ") behind one start token.
# A model whose tokenizer adds no BOS (SmolLM2, Qwen2) would put the problem's first digit at position 0, where
# attention sinks and copies it badly: the first Re-Tuning module here copied it right 11% of the time, and 41%
# with a newline put in front at inference only. The paper's LLaMA always had a BOS there.
PROMPT_FORMAT = PromptFormat("plain", "\n{prompt}")


def parse_lengths(spec: str | int | list[int]) -> list[int]:
    """``"1-8"``, ``"2,4,8"``, ``8`` or a list -> sorted lengths."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, list):
        return sorted(int(x) for x in spec)
    lengths: set[int] = set()
    try:
        for part in str(spec).split(","):
            lo, _, hi = part.strip().partition("-")
            lengths.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(f"lengths: expected e.g. '1-8' or '2,4,8', got {spec!r}") from None
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"lengths: need positive lengths, got {spec!r}")
    return sorted(lengths)


@dataclass
class RetuneData:
    """Which problems become training data and how."""

    task: str = "addition"
    method: str = "retune"  # baseline | scratchpad | retune
    lengths: str | list[int] = "1-8"
    problems_per_length: int = 200
    seed: int = 0
    dedup: bool = True  # one example per distinct prompt (sub-problems repeat across problems)
    keep: dict[int, float] = field(default_factory=dict)  # sub-problem size -> fraction of its examples kept
    repeat: dict[int, int] | None = None  # sub-problem size -> times each example is repeated (None: the task's)
    share: dict[int, float] = field(default_factory=dict)  # sub-problem size -> least share of the data (after repeat)

    def __post_init__(self) -> None:
        task = get_task(self.task)
        if self.repeat is None:
            self.repeat = task.repeat
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        self.keep = {int(k): float(v) for k, v in self.keep.items()}
        self.repeat = {int(k): int(v) for k, v in self.repeat.items()}
        self.share = {int(k): float(v) for k, v in self.share.items()}
        if any(not 0 < v < 1 for v in self.share.values()) or sum(self.share.values()) >= 1:
            raise ConfigError(f"share: each fraction must be in (0, 1) and their sum below 1, got {self.share}")


def sample_problems(task_name: str, lengths: list[int], per_length: int, seed: int) -> list[Any]:
    """Distinct random training problems per length (fewer where a length has fewer distinct problems)."""
    task, rng = get_task(task_name), random.Random(seed)
    problems = []
    for length in lengths:
        found: dict[Any, None] = {}
        for _ in range(per_length * 20):
            if len(found) == per_length:
                break
            found[task.sample_training(length, rng)] = None
        problems += list(found)
    return problems


def build(config: RetuneData) -> list[dict[str, Any]]:
    task, rng = get_task(config.task), random.Random(config.seed + 1)
    records, seen = [], set()
    for problem in sample_problems(config.task, parse_lengths(config.lengths), config.problems_per_length,
                                   config.seed):
        for prompt, response, size in task.examples(problem, config.method):
            if config.dedup and prompt in seen:
                continue
            seen.add(prompt)
            if rng.random() >= config.keep.get(size, 1.0):
                continue
            record = {"prompt": prompt, "response": response, "task": task.name, "method": config.method,
                      "size": size}
            records += [record] * config.repeat.get(size, 1)
    records += top_up(records, config.share, rng)
    rng.shuffle(records)
    return records


def top_up(records: list[dict[str, Any]], share: dict[int, float], rng: random.Random) -> list[dict[str, Any]]:
    """Copies of the records of each size in ``share`` that raise it to that share of the final data.

    Sizes already at their share are left as they are.
    """
    by_size: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_size.setdefault(record["size"], []).append(record)
    if missing := sorted(set(share) - set(by_size)):
        raise ConfigError(f"share: no examples of sub-problem size {missing} to oversample "
                          f"(sizes present: {sorted(by_size)})")
    raised: set[int] = set()  # raising a size only grows the total, so a size once below its share stays below
    total = float(len(records))
    while below := {s for s in set(share) - raised if len(by_size[s]) < share[s] * total}:
        raised |= below
        total = (len(records) - sum(len(by_size[s]) for s in raised)) / (1 - sum(share[s] for s in raised))
    extra = []
    for size in sorted(raised):
        group = by_size[size]
        needed = math.ceil(share[size] * total) - len(group)
        extra += group * (needed // len(group)) + rng.sample(group, needed % len(group))
    return extra

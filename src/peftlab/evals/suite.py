"""Suites (which families are trained, which held out) and seeded, non-overlapping train/validation/test splits.

**Splits.** Which split an instance belongs to is a pure function of its family and content key (a hash:
80 % train, 10 % validation, 10 % test), never of the seed or the order of drawing. Sampling a split draws
instances from the family's generator, seeded by ``(family, split, seed)``, and keeps those whose key hashes into
that split, deduplicated by key and by exact prompt text. So no prompt, and no problem in another wording, is ever
in two splits, for any seeds; and the same seed always gives the same instances.

**Suites.** A suite names its trained families (in the train split and in evaluation) and its held-out families
(only in evaluation: the training data never contains any of their instances, so they measure transfer). Built-in
suites are in ``SUITES``; a YAML file ``{name, trained: [...], held_out: [...], description}`` works wherever a
suite name does.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftlab.config import ConfigError
from peftlab.evals.tasks import FAMILIES, Instance, get_family

SPLITS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}


@dataclass
class Suite:
    name: str
    trained: list[str]
    held_out: list[str] = field(default_factory=list)
    description: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.trained + self.held_out) - set(FAMILIES))
        if unknown:
            raise ConfigError(f"suite {self.name!r}: unknown families {unknown}; known: {sorted(FAMILIES)}")
        both = sorted(set(self.trained) & set(self.held_out))
        if both:
            raise ConfigError(f"suite {self.name!r}: families both trained and held out: {both}")
        if not self.trained and not self.held_out:
            raise ConfigError(f"suite {self.name!r}: no families")

    @property
    def families(self) -> list[str]:
        return self.trained + self.held_out

    def families_for(self, split: str) -> list[str]:
        """Families present in a split: held-out families never appear in ``train``."""
        check_split(split)
        return list(self.trained) if split == "train" else self.families


ALL = sorted(FAMILIES)
SUITES: dict[str, Suite] = {
    "core": Suite("core", trained=["arithmetic", "fact_choice", "table_lookup", "list_ops", "string_ops",
                                   "unit_conversion", "format_following"],
                  held_out=["compare_count", "calendar", "sequence"],
                  description="7 trained families, 3 held out to measure transfer"),
    "all": Suite("all", trained=ALL, description="every family trained, none held out"),
    "heldout-only": Suite("heldout-only", trained=[], held_out=ALL,
                          description="every family held out: evaluation only, no training data"),
}


def get_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a YAML file with ``name``, ``trained``, ``held_out``, ``description``."""
    if name_or_path in SUITES:
        return SUITES[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a suite file must be a mapping")
        unknown = sorted(set(data) - {"name", "trained", "held_out", "description"})
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {unknown}; known: description, held_out, name, trained")
        return Suite(data.get("name", path.stem), list(data.get("trained") or []), list(data.get("held_out") or []),
                     data.get("description", ""))
    raise ConfigError(f"unknown suite {name_or_path!r}; built-in: {sorted(SUITES)}, or a .yaml suite file")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {list(SPLITS)}")


def split_of(instance: Instance) -> str:
    """The split an instance belongs to, from a hash of its content key (independent of seed and wording)."""
    digest = hashlib.sha256(instance.key.encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return next(s for s, (lo, hi) in SPLITS.items() if lo <= u < hi)


def sample(family: str, split: str, n: int, seed: int = 0, max_draws: int | None = None) -> list[Instance]:
    """``n`` distinct instances of ``family`` in ``split``, the same for the same seed."""
    check_split(split)
    make = get_family(family).make
    rng = random.Random(f"peftlab-evals/{family}/{split}/{seed}")
    out, keys, prompts = [], set(), set()
    max_draws = max_draws or 400 * n + 1000
    for _ in range(max_draws):
        inst = make(rng)
        if inst.key in keys or inst.prompt in prompts or split_of(inst) != split:
            continue
        keys.add(inst.key)
        prompts.add(inst.prompt)
        out.append(inst)
        if len(out) == n:
            return out
    raise ValueError(f"{family}/{split}: only {len(out)} distinct instances in {max_draws} draws (asked for {n})")


def make_split(suite: Suite, split: str, n: int, seed: int = 0) -> dict[str, list[Instance]]:
    """``n`` instances per family of the suite present in ``split``."""
    return {f: sample(f, split, n, seed) for f in suite.families_for(split)}


def training_records(suite: Suite, n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """``{"prompt", "response"}`` records (``n`` per trained family, interleaved) for ``peftlab train``."""
    if split == "test":
        raise ConfigError("training data from the test split would leak the evaluation; use train or validation")
    per_family = make_split(suite, split, n, seed)
    records = []
    for i in range(n):
        for fam in per_family:
            inst = per_family[fam][i]
            records.append({"prompt": inst.prompt, "response": inst.answer, "family": fam})
    return records



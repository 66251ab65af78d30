"""Results for scripts and for people: JSON written atomically, and PNG plots with one look across peftlab."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftlab.io import write_text


def portable_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` relative to ``root`` (default: the working directory) when it lies inside it, so a result file
    reads the same on every clone; a path outside stays as given."""
    root = Path(root or Path.cwd()).resolve()
    resolved = Path(path).resolve()
    return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(path)


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON, atomically (a reader never sees half a file)."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def over_seeds(per_seed: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """A figure measured once per seed, in the one shape every result file gives it: the mean, the sample standard
    deviation over the seeds (0 for one seed), the seeds and the value each gave."""
    if len(per_seed) != len(seeds):
        raise ValueError(f"{len(per_seed)} values for {len(seeds)} seeds {list(seeds)}")
    values = [float(v) for v in per_seed]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": list(seeds), "per_seed": values}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of a proportion ``successes / n`` (sound at 0, 1 and small n, unlike mean ± 2 se)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> dict[str, Any]:
    """Paired comparison of two scorers on the same items: the discordant counts (right only by ``first``, right
    only by ``second``) and the exact two-sided binomial p-value of that split under no difference."""
    from math import comb

    if len(first) != len(second):
        raise ValueError(f"{len(first)} and {len(second)} items: a paired test needs the same items")
    only_first = sum(bool(a) and not bool(b) for a, b in zip(first, second, strict=True))
    only_second = sum(bool(b) and not bool(a) for a, b in zip(first, second, strict=True))
    n, k = only_first + only_second, min(only_first, only_second)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_first": only_first, "only_second": only_second, "p_value": p}


@contextmanager
def plot(path: str | Path, xlabel: str, ylabel: str, title: str | None = None,
         figsize: tuple[float, float] = (6.5, 4.0)) -> Iterator[Any]:
    """Yield matplotlib axes to draw on; on exit, label them, add a grid (and a legend if anything is labelled)
    and save a PNG to ``path``. Headless: no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)

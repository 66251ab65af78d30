"""λ search: compose every point of a grid, score each on a validation split, keep the best.

``--search "lam=0.1:1.0:0.1"`` binds ``lam`` in the expression (``lam*a + (1-lam)*b``) to 0.1, 0.2, ..., 1.0;
several ``--search`` flags make a product grid. The score is ``peftlab eval``'s mean accuracy on chosen families
of the validation split (never the test split), or any ``package.module:function`` taking a module folder and
returning a number, higher being better. The best candidate becomes the output folder, with ``search.json`` (every
point and its score) and ``search.png`` beside it.
"""

from __future__ import annotations

import importlib
import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from peftlab.compose.compose import compose
from peftlab.compose.operands import ComposeError, check_output
from peftlab.report import plot, write_json

Scorer = Callable[[Path], float]


def parse_grid(spec: str) -> tuple[str, list[float]]:
    """``name=start:stop:step`` (stop included) or ``name=v1,v2,...``."""
    name, sep, values = spec.partition("=")
    try:
        if not sep or not name.strip().isidentifier():
            raise ValueError
        if ":" in values:
            start, stop, step = (float(v) for v in values.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            return name.strip(), [round(start + i * step, 10) for i in range(count)]
        return name.strip(), [float(v) for v in values.split(",")]
    except ValueError:
        raise ComposeError(f"--search {spec!r}: write NAME=START:STOP:STEP (e.g. lam=0.1:1.0:0.1) or "
                           f"NAME=V1,V2,...") from None


def eval_scorer(families: list[str], n: int = 50, split: str = "validation", suite: str = "core",
                model: str | None = None, seed: int = 0) -> Scorer:
    """Mean accuracy over ``families`` on ``split`` with ``peftlab eval``'s generated suite."""
    if split == "test":
        raise ComposeError("a λ search scores on validation data; choosing λ on the test split would leak it")
    from peftlab.evals.runner import load_candidate, run
    from peftlab.evals.suite import get_suite

    def score(folder: Path) -> float:
        is_model = not (folder / "peftlab.json").exists()
        candidate = load_candidate(None, str(folder)) if is_model else load_candidate(str(folder), model)
        report = run([candidate], get_suite(suite), split=split, n=n, seeds=(seed,), families=families,
                     keep_examples=0, progress=False)
        return report["models"][0]["summary"]["all"]["mean"]

    return score


def import_scorer(spec: str) -> Scorer:
    """``package.module:function``, a callable taking a module folder and returning a number (higher is better)."""
    module, sep, function = spec.partition(":")
    if not sep:
        raise ComposeError(f"--scorer {spec!r}: write package.module:function")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ComposeError(f"--scorer {spec!r}: {e}") from None


def search(expression: str, modules: dict[str, str | Path], out: str | Path, grid: dict[str, list[float]],
           scorer: Scorer, overwrite: bool = False, **options) -> dict:
    """Compose and score every grid point; the best becomes ``out``. Returns the table written to search.json."""
    out = Path(out)
    check_output(out, modules)  # the best candidate replaces out, and out's parent holds the scratch folder
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    scratch = out.parent / f".{out.name}.search"
    shutil.rmtree(scratch, ignore_errors=True)
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    rows = []
    try:
        for i, numbers in enumerate(points):
            folder = scratch / f"point{i}"
            record = compose(expression, modules, folder, numbers=numbers, **options)
            score = float(scorer(folder))
            rows.append({"numbers": numbers, "coefficients": record["coefficients"], "score": score})
            print(f"compose search: {numbers} -> {score:.4f}", flush=True)
        best = max(range(len(rows)), key=lambda i: rows[i]["score"])
        if out.exists():  # moved aside, not deleted, until the best candidate is in place
            os.replace(out, scratch / "previous")
        os.replace(scratch / f"point{best}", out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = {"expression": expression, "grid": grid, "best": rows[best], "points": rows}
    write_json(out / "search.json", table)
    _plot(table, out / "search.png")
    return table


def _plot(table: dict, path: Path) -> None:
    names = list(table["grid"])
    rows = table["points"]
    one = len(names) == 1
    xs = [r["numbers"][names[0]] for r in rows] if one else list(range(len(rows)))
    with plot(path, names[0] if one else "grid point", "score", f"compose search: {table['expression']}") as ax:
        ax.plot(xs, [r["score"] for r in rows], marker="o")
        best = table["best"]
        ax.axvline(best["numbers"][names[0]] if one else rows.index(best), color="grey", linestyle="--",
                   label=f"best {best['numbers']}: {best['score']:.3f}")

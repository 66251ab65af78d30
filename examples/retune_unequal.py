"""Re-Tuning on sums as people write them: operands of different lengths, the fix's cost on the other operand
families, and the 2x-length goal (issue 34; docs/experiments/retune.md).

    python examples/retune_unequal.py                                  # every arm (hours on a CPU)
    python examples/retune_unequal.py --arms after --seeds 0           # the new recipe, one seed
    python examples/retune_unequal.py --steps 2 --n 4 --seeds 0 --seeds-before 0 --model TINY_DIR --runs /tmp/r
    python examples/retune_unequal.py --merge S0.json S1.json --result ALL.json  # seeds run apart, as one result

Arms (``ARMS``), each a trained task and the task whose root asks it:
- ``before``: the README's recipe (``addition-steps``, trained on equal lengths only), its shorter operand
  zero-filled at the root (``613807 + 000027``);
- ``recursion``: the same module asked without zero filling, where the longer operand alone drops its leading
  digit (``addition-steps-unpadded``; the cells only: a diagnostic of that recursion without its data);
- ``unpadded``: that recursion trained (``addition-steps-unequal-unpadded``, 30 % of training problems with a
  shorter operand): measured to fail on the cells, so seed 0 and the cells only;
- ``after``: the fix, ``addition-steps-unequal``: 30 % of training problems with a shorter operand, zero-filled
  as the root asks them, so the runs of leading zeros in their sub-problems are trained;
- ``tags``: the fix with output digits tagged by place letters cycling every 4 (``addition-steps-tags4-unequal``),
  the step format that carried the copy of runs past the trained lengths (docs/experiments/retune.md), for the 2x
  goal;
- ``hard``: the fix with 30 % of the equal-length rest from the hard families (``addition-steps-hard-unequal``):
  carry chains, which neither the fix nor more steps of it hold at 5-6 digits;
- ``shifted-tags``: ``hard`` with its output digits tagged by all 26 letters from a random one per problem
  (``addition-steps-hard-tags26-shifted-unequal``): every letter trained at 1-6 digits and none repeated in a
  12-place output, for the long copies ``tags`` gets wrong at 12 digits;
- ``shifted-tags-unpadded``: ``shifted-tags`` without zero filling (``...-unequal-unpadded``): its 12-digit misses
  all zero-fill a 1-4-digit operand, a run of filled-in zeros longer than any trained.
Modules are trained as examples/retune.yaml says (``retune_experiment.train_method``: kept in --runs, resumed) and
evaluated through the engine, greedy:
- the cells of the issue's table: a longer operand of m digits and a shorter of k (its side random), against two
  m-digit operands;
- every operand family (tasks.ADDITION_FAMILIES, ``unequal`` included) at each trained length, and the families of
  the 2x goal (uniform, unequal) at twice the longest.
Every cell records its accuracy, n and failures by kind. The new recipes (``NEW_RECIPES``) run --seeds (0-2),
``before`` 0-1 (the fix's cost needs two), the diagnostics the first of those. Seeds run one after another across
the arms, and --result is rewritten after each module with the seeds finished so far; a stopped run resumes from
the per-module files. Seeds trained apart (other sessions, other machines) join with --merge, which checks that
their results come from one experiment (the same steps, data, model and evaluation problems).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retune_experiment import CONFIG, ROOT, longest_target, train_method  # noqa: E402  (examples/)

CELLS = [(4, 2), (6, 2), (6, 3), (6, 5), (8, 3)]  # (longer operand's digits, shorter's): the table
# arm -> (task trained, task whose root asks, what is asked)
ARMS = {"before": ("addition-steps", "addition-steps", ("cells", "families")),
        "recursion": ("addition-steps", "addition-steps-unpadded", ("cells",)),
        "unpadded": ("addition-steps-unequal-unpadded", "addition-steps-unequal-unpadded", ("cells",)),
        "after": ("addition-steps-unequal", "addition-steps-unequal", ("cells", "families")),
        "tags": ("addition-steps-tags4-unequal", "addition-steps-tags4-unequal", ("cells", "families")),
        "hard": ("addition-steps-hard-unequal", "addition-steps-hard-unequal", ("cells", "families")),
        "shifted-tags": ("addition-steps-hard-tags26-shifted-unequal", "addition-steps-hard-tags26-shifted-unequal",
                         ("cells", "families")),
        "shifted-tags-unpadded": ("addition-steps-hard-tags26-shifted-unequal-unpadded",
                                  "addition-steps-hard-tags26-shifted-unequal-unpadded", ("cells", "families"))}
# trained at --seeds; before at --seeds-before
NEW_RECIPES = ("after", "tags", "hard", "shifted-tags", "shifted-tags-unpadded")
DIAGNOSTICS = ("recursion", "unpadded")  # the first of --seeds-before only
LONG_FAMILIES = ("uniform", "unequal")  # asked at twice the longest trained length too


def cell_problems(longer: int, shorter: int, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` sums of an m-digit and a k-digit number, the longer on a random side (the same draws for every
    module)."""
    from peftlab.recipes.retune.tasks import _digits

    rng = random.Random(f"cell/{longer}+{shorter}/{seed}")
    out = []
    for _ in range(n):
        pair = (_digits(longer, rng), _digits(shorter, rng))
        out.append(pair if rng.random() < 0.5 else pair[::-1])
    return out


def solve(task, generator, problems) -> dict:
    """Accuracy, n and failures by kind of ``problems`` through the engine, each asked as ``task``'s root asks."""
    from peftlab.recipes.retune.engine import Engine

    results = Engine(generator).run([task.root(p).text for p in problems])
    correct = [task.correct(r.output or "", p, "retune") for r, p in zip(results, problems, strict=True)]
    kinds = Counter(None if c else (r.kind or "wrong answer") for c, r in zip(correct, results, strict=True))
    kinds.pop(None, None)
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "failures": dict(kinds)}


def evaluate_module(arm: str, module: Path, args, cache: Path) -> dict:
    """The cells and the families of one arm's module. Results are cached in ``cache`` (one file per module) by
    what was asked: a set of equal-length problems is asked the same way by every root, so the arms that share a
    module share those results."""
    from peftlab.adapters import load_for_inference
    from peftlab.recipes.retune.engine import ModelGenerator
    from peftlab.recipes.retune.evaluate import problems_for
    from peftlab.recipes.retune.tasks import ADDITION_FAMILIES, get_task
    from peftlab.report import write_json

    task_name, asked_by, parts = ARMS[arm]
    done = json.loads(cache.read_text()) if cache.exists() else {}
    task, generator, out = get_task(asked_by), None, {}
    todo = [("cells", f"{m}+{k}", kind) for m, k in CELLS for kind in ("different", "same")]
    todo += [("families", family, str(length)) for family in ADDITION_FAMILIES for length in args.lengths
             if length <= args.train_max or family in LONG_FAMILIES]
    for part, key, sub in (item for item in todo if item[0] in parts):
        drawn = key
        if part == "cells":  # each longer length's same-length row is one set of problems (m + m), asked once
            m, k = map(int, key.split("+"))
            shorter = k if sub == "different" else m
            drawn, problems = f"{m}+{shorter}", cell_problems(m, shorter, args.n, args.eval_seed)
        else:
            problems = problems_for(task_name, int(sub), args.n, args.eval_seed, key)
        entry = f"{part}/{drawn}/{sub}/{asked_as(task, problems)}"
        if entry not in done:
            if generator is None:
                loaded = load_for_inference(module, args.model)
                generator = ModelGenerator(loaded.model, loaded.tokenizer, max_new_tokens=longest_target(
                    loaded.tokenizer, task_name, "retune", max(args.lengths + [m for m, _ in CELLS])) + 16)
            done[entry] = solve(task, generator, problems)
            write_json(cache, done)
            print(f"{arm} {module}: {entry}: {done[entry]['accuracy']:.2f}", flush=True)
        out.setdefault(part, {}).setdefault(key, {})[sub] = done[entry]
    return out


def asked_as(task, problems: list[tuple]) -> str:
    """How the root asks these problems (a cache key's last part); a problem may carry its tag offset third."""
    if all(len(a) == len(b) for a, b, *_ in problems):
        return "equal lengths"
    return "zero-filled" if task.zero_fill else "as written"


def seeds_of(arm: str, args) -> list[int]:
    return args.seeds if arm in NEW_RECIPES else args.seeds_before[:1] if arm in DIAGNOSTICS else args.seeds_before


def summarise(per_module: dict, args) -> dict:
    """Each arm's cells and families over the seeds it has finished."""
    from peftlab.report import over_seeds

    summary = {}
    for arm in args.arms:
        seeds = sorted(s for a, s in per_module if a == arm)
        if not seeds:
            continue
        first = per_module[arm, seeds[0]]
        summary[arm] = {part: {key: {sub: over_seeds([per_module[arm, s][part][key][sub]["accuracy"]
                                                      for s in seeds], seeds)
                                     for sub in first[part][key]} for key in first[part]} for part in first}
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds of the new recipes (default: 0 1 2)")
    parser.add_argument("--seeds-before", type=int, nargs="+", default=[0, 1],
                        help="training seeds of 'before'; the diagnostics run the first (default: 0 1)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300, the README's)")
    parser.add_argument("--per-length", type=int, default=400)
    parser.add_argument("--train-max", type=int, default=6)
    parser.add_argument("--n", type=int, default=50, help="problems per cell (default: 50)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="base model (default: examples/retune.yaml's)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "retune-unequal"))
    parser.add_argument("--result", default=str(ROOT / "examples" / "results" / "retune-unequal.json"))
    parser.add_argument("--tables", action="store_true",
                        help="print the tables of --result as markdown (docs/experiments/retune.md), no runs")
    parser.add_argument("--curve", nargs="+", metavar="RESULT",
                        help="print the learning curve of these results (one per step count) as markdown and "
                             "plot it beside the first, no runs")
    parser.add_argument("--by-shorter", nargs="+", metavar="REPORT",
                        help="right answers by the shorter operand's length in these `peftlab retune eval --family "
                             "unequal` reports, as markdown, no runs")
    parser.add_argument("--merge", nargs="+", metavar="RESULT",
                        help="write --result from these results of one experiment, run apart (their seeds side by "
                             "side, summarised again), no runs")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.by_shorter:
        return by_shorter([Path(p) for p in args.by_shorter])
    if args.tables:
        return print_tables(json.loads(Path(args.result).read_text()))
    if args.curve:
        return learning_curve([Path(p) for p in args.curve])
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.result))
    args.lengths = eval_lengths(args.train_max)
    args.repeat, args.share = None, {}  # retune_experiment's data options, at their defaults
    from peftlab.report import write_json

    per_module = {}
    for seed in sorted(set(args.seeds) | set(args.seeds_before)):  # every arm's seed 0 first: comparable arms
        args.seed = seed
        for arm in args.arms:
            if seed not in seeds_of(arm, args):
                continue
            run = Path(args.runs) / f"{ARMS[arm][0]}-seed{seed}"
            module = train_method(ARMS[arm][0], "retune", run, args)
            per_module[arm, seed] = evaluate_module(arm, module, args, run / f"eval-n{args.n}.json")
            write_json(args.result, experiment_result(per_module, args, sys.argv[1:]))
    print(f"wrote {args.result}")


def eval_lengths(train_max: int) -> list[int]:
    """Every trained length, and twice the longest (the 2x goal)."""
    return [*range(1, train_max + 1), 2 * train_max]


def experiment_result(per_module: dict, args, argv: list[str]) -> dict:
    """The result file: how it was run, each arm's seeds summarised, and each module's cells."""
    return {"command": shlex.join(["python", "examples/retune_unequal.py", *argv]),
            "arms": {a: {"task": ARMS[a][0], "asked_by": ARMS[a][1], "asked": ARMS[a][2]} for a in args.arms},
            "seeds": {a: seeds_of(a, args) for a in args.arms},
            "steps": args.steps, "n": args.n, "train_lengths": f"1-{args.train_max}",
            "eval_lengths": args.lengths, "long_families": list(LONG_FAMILIES),
            "summary": summarise(per_module, args),
            "per_seed": {f"{a} seed {s}": v for (a, s), v in per_module.items()}}


SAME_EXPERIMENT = ("steps", "per_length", "train_max", "n", "eval_seed", "model", "config")  # options of --merge's runs


def merge(paths: list[Path], out: Path) -> None:
    """Write ``out`` from results of one experiment run apart: each result's command is parsed again, and its
    options that decide the modules and the problems (``SAME_EXPERIMENT``) must match the first's."""
    from peftlab.report import write_json

    per_module, commands, first, args = {}, [], None, None
    for path in paths:
        result = json.loads(path.read_text())
        options = build_parser().parse_args(shlex.split(result["command"])[2:])
        first, args = first or path, args or options  # the first result's options are the merged file's
        differ = [f"{name} {getattr(options, name)} (not {getattr(args, name)})" for name in SAME_EXPERIMENT
                  if getattr(options, name) != getattr(args, name)]
        if differ:
            raise SystemExit(f"{path}: not the experiment of {first}: its {', '.join(differ)}")
        for label, module in result["per_seed"].items():
            key = arm_and_seed(label)
            if key in per_module:
                raise SystemExit(f"{path}: {label} is in an earlier result too; merge each seed once")
            per_module[key] = module
        commands.append(result["command"])
    args.arms = [a for a in ARMS if any(arm == a for arm, _ in per_module)]
    args.seeds = sorted({s for a, s in per_module if a in NEW_RECIPES})
    args.seeds_before = sorted({s for a, s in per_module if a not in NEW_RECIPES})
    args.lengths = eval_lengths(args.train_max)
    argv = ["--merge", *map(str, paths), "--result", str(out)]
    write_json(out, {**experiment_result(per_module, args, argv), "merged": commands})
    print(f"wrote {out}: {', '.join(f'{a} seed {s}' for a, s in sorted(per_module))}")


FIRST_CELLS = {f"{m}+{k}" for m, k in {m: (m, k) for m, k in reversed(CELLS)}.values()}  # each m's first cell


def asked_once(module: dict):
    """Each set of problems of one module's report once: an m + m set is shown in each of m's cells."""
    for part, keys in module.items():
        for key, subs in keys.items():
            for sub, cell in subs.items():
                if not (part == "cells" and sub == "same" and key not in FIRST_CELLS):
                    yield cell


def arm_and_seed(label: str) -> tuple[str, int]:
    """``("after", 1)`` from a per-seed label ``"after seed 1"``."""
    arm, seed = label.rsplit(" seed ", 1)
    return arm, int(seed)


def print_tables(result: dict) -> None:
    """The cells, the families and the failures by kind of a result, one markdown table each."""
    summary = result["summary"]
    arms = [a for a in ARMS if a in summary]

    def shown(figure: dict | None) -> str:
        if figure is None:
            return ""
        return f"{figure['mean']:.2f}" + (f" ± {figure['std']:.2f}" if len(figure["seeds"]) > 1 else "")

    finished = {a: sorted(s for arm, s in map(arm_and_seed, result["per_seed"]) if arm == a) for a in arms}
    print("| operands | " + " | ".join(f"{a} (seeds {finished[a]})" for a in arms) + " |")
    print("| --- |" + " ---: |" * len(arms))
    for m, k in CELLS:  # each longer length's m + m row once, after its first m + k row
        rows = [("different", f"{m} + {k}")] + ([("same", f"{m} + {m}")] if f"{m}+{k}" in FIRST_CELLS else [])
        for sub, label in rows:
            print(f"| {label} | " + " | ".join(shown(summary[a]["cells"][f"{m}+{k}"].get(sub)) for a in arms) + " |")
    lengths = [str(n) for n in result["eval_lengths"]]
    with_families = [a for a in arms if "families" in summary[a]]
    print("\n| family | arm | " + " | ".join(lengths) + " |")
    print("| --- | --- |" + " ---: |" * len(lengths))
    for family in summary[with_families[0]]["families"]:
        for a in with_families:
            row = summary[a]["families"][family]
            print(f"| {family} | {a} | " + " | ".join(shown(row.get(n)) for n in lengths) + " |")
    counts = {a: (0, 0.0, Counter()) for a in arms}  # problems asked, right, failures by kind (the engine's)
    for label, module in result["per_seed"].items():
        arm, _ = arm_and_seed(label)
        asked, right, kinds = counts[arm]
        for cell in asked_once(module):
            asked, right = asked + cell["n"], right + cell["accuracy"] * cell["n"]
            kinds.update(cell["failures"])
        counts[arm] = asked, right, kinds
    seen = sorted(set().union(*(kinds for _, _, kinds in counts.values())), key=lambda k: k != "wrong answer")
    print("\n| arm | problems asked (all seeds) | right | " + " | ".join(seen) + " |")
    print("| --- | ---: | ---: |" + " ---: |" * len(seen))
    for a, (asked, right, kinds) in counts.items():
        print(f"| {a} | {asked} | {round(right)} | " + " | ".join(str(kinds[k]) for k in seen) + " |")


CURVE = (("uniform", "12"), ("unequal", "12"), ("carry-chain", "6"), ("equal-runs", "6"))  # the weak cells


SHORTER_BANDS = ((1, 4), (5, 8), (9, 11))  # at 12 digits: 8-11, 4-7 and 1-3 leading zeros filled in


def by_shorter(paths: list[Path]) -> None:
    """Right answers of each unequal-family report's longest length, by the shorter operand's length: how many
    leading zeros the root fills in, the copy that fails."""
    from peftlab.recipes.retune.evaluate import problems_for

    print("| report | " + " | ".join(f"shorter {low}-{high}" for low, high in SHORTER_BANDS) + " |")
    print("| --- |" + " ---: |" * len(SHORTER_BANDS))
    for path in paths:
        report = json.loads(path.read_text())
        (label, run), = report["runs"].items()
        length = max(run["lengths"], key=int)
        problems = problems_for(report["task"], int(length), report["n"], report["seed"], report["family"])
        kinds = run["lengths"][length]["failure_per_problem"]
        cells = []
        for low, high in SHORTER_BANDS:
            band = [kind for problem, kind in zip(problems, kinds, strict=True)
                    if low <= min(len(problem[0]), len(problem[1])) <= high]
            cells.append(f"{band.count(None)}/{len(band)}")
        print(f"| {label} at {length} | " + " | ".join(cells) + " |")


def learning_curve(paths: list[Path]) -> None:
    """Each arm of each result on the 2x goal's cells, the weak trained-length cells and the weakest cell of all
    at the trained lengths, by step count (from the result with the most seeds): a markdown table, and a PNG
    beside the first result of the arms trained for the most steps."""
    from peftlab.report import plot

    rows = []  # (arm, steps, seeds, {column: figure})
    for path in paths:
        result = json.loads(path.read_text())
        longest = int(result["train_lengths"].split("-")[1])
        for arm, parts in result["summary"].items():
            if "families" not in parts:
                continue
            families = parts["families"]
            figures = {f"{family} {n}": families[family][n] for family, n in CURVE}
            trained = [(f, n) for f in families for n in families[f] if int(n) <= longest]
            family, n = min(trained, key=lambda cell: families[cell[0]][cell[1]]["mean"])
            figures["weakest trained"] = {**families[family][n], "cell": f"{family} {n}"}
            rows.append((arm, result["steps"], families[family][n]["seeds"], figures))
    most_seeds = {}  # an arm at one step count in several results (one seed first, then all): the most seeds
    for row in sorted(rows, key=lambda row: len(row[2])):
        most_seeds[row[0], row[1]] = row
    rows = sorted(most_seeds.values(), key=lambda row: (list(ARMS).index(row[0]), row[1]))
    columns = [*(f"{family} {n}" for family, n in CURVE), "weakest trained"]
    print("| arm | steps | seeds | " + " | ".join(columns) + " |")
    print("| --- | ---: | --- |" + " ---: |" * len(columns))
    for arm, steps, seeds, figures in rows:
        cells = [f"{figures[c]['mean']:.2f}" + (f" ± {figures[c]['std']:.2f}" if len(seeds) > 1 else "")
                 for c in columns]
        cells[-1] += f" ({figures['weakest trained']['cell']})"
        print(f"| {arm} | {steps} | {seeds} | " + " | ".join(cells) + " |")
    png = paths[0].with_name(paths[0].stem + "-curve.png")
    with plot(png, "optimizer steps (batch 8)", "accuracy (greedy, through the engine)",
              title="Re-Tuning, trained on 1-6 digits: the weak cells by steps") as ax:
        most = max(row[1] for row in rows)
        for arm in dict.fromkeys(row[0] for row in rows if row[1] == most):  # the arms trained longest
            mine = [row for row in rows if row[0] == arm]
            for column, style in (("uniform 12", "o-"), ("unequal 12", "s--"), ("weakest trained", "^:")):
                ax.errorbar([row[1] for row in mine], [row[3][column]["mean"] for row in mine],
                            yerr=[row[3][column]["std"] for row in mine], fmt=style, capsize=3,
                            label=f"{arm}: {column}")
        ax.axhline(0.90, color="grey", linewidth=0.8, label="goal at 12 digits (0.90)")
        ax.axhline(0.95, color="black", linewidth=0.8, label="goal at the trained lengths (0.95)")
        ax.set_ylim(0, 1.02)
    print(f"\nwrote {png}")


if __name__ == "__main__":
    main()

"""Re-Tuning on sums as people write them: operands of different lengths, the fix's cost on the other operand
families, and the 2x-length goal (issue 34; docs/experiments/retune.md).

    python examples/retune_unequal.py                                  # both recipes, seeds 0 1 2 (hours on a CPU)
    python examples/retune_unequal.py --tasks addition-steps --seeds 0 # the README's recipe alone
    python examples/retune_unequal.py --steps 2 --n 4 --seeds 0 --model TINY_DIR --runs /tmp/r   # a smoke run

For each task (default: ``addition-steps``, the README's recipe, and ``addition-steps-unequal``, the same with 30 %
of training problems having a shorter operand) and training seed, a module is trained as examples/retune.yaml says
(``retune_experiment.train_method``: kept in --runs, resumed). Each module is then evaluated through the engine,
greedy:
- the cells of the issue's table: a longer operand of m digits and a shorter of k (its side random), against two
  m-digit operands;
- every operand family (tasks.ADDITION_FAMILIES, ``unequal`` included) at each trained length and at twice the
  longest.
Every cell records its accuracy, n and failures by kind. Writes --result (JSON); a stopped run resumes from the
per-module files in --runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retune_experiment import CONFIG, ROOT, longest_target, train_method  # noqa: E402  (examples/)

CELLS = [(4, 2), (6, 2), (6, 3), (6, 5), (8, 3)]  # (longer operand's digits, shorter's): the table


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
    """Accuracy, n and failures by kind of ``problems`` through the engine."""
    from peftlab.recipes.retune.engine import Engine

    results = Engine(generator).run([task.root(p).text for p in problems])
    correct = [task.correct(r.output or "", p, "retune") for r, p in zip(results, problems, strict=True)]
    kinds = Counter(None if c else (r.kind or "wrong answer") for c, r in zip(correct, results, strict=True))
    kinds.pop(None, None)
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "failures": dict(kinds)}


def evaluate_module(task_name: str, module: Path, args, out: Path) -> dict:
    """The cells and the families of one module, cached in ``out`` cell by cell."""
    from peftlab.adapters import load_for_inference
    from peftlab.recipes.retune.engine import ModelGenerator
    from peftlab.recipes.retune.evaluate import problems_for
    from peftlab.recipes.retune.tasks import ADDITION_FAMILIES, get_task
    from peftlab.report import write_json

    done = json.loads(out.read_text()) if out.exists() else {}
    task, generator = get_task(task_name), None
    todo = [("cells", f"{m}+{k}", kind) for m, k in CELLS for kind in ("different", "same")]
    todo += [("families", family, str(length)) for family in ADDITION_FAMILIES for length in args.lengths]
    for part, key, sub in todo:
        if sub in done.get(part, {}).get(key, {}):
            continue
        if generator is None:
            loaded = load_for_inference(module, args.model)
            generator = ModelGenerator(loaded.model, loaded.tokenizer, max_new_tokens=longest_target(
                loaded.tokenizer, task_name, "retune", max(args.lengths + [m for m, _ in CELLS])) + 16)
        if part == "cells":
            m, k = map(int, key.split("+"))
            problems = cell_problems(m, k if sub == "different" else m, args.n, args.eval_seed)
        else:
            problems = problems_for(task_name, int(sub), args.n, args.eval_seed, key)
        done.setdefault(part, {}).setdefault(key, {})[sub] = solve(task, generator, problems)
        write_json(out, done)
        print(f"{module}: {part} {key} {sub}: {done[part][key][sub]['accuracy']:.2f}", flush=True)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["addition-steps", "addition-steps-unequal"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300, the README's)")
    parser.add_argument("--per-length", type=int, default=400)
    parser.add_argument("--train-max", type=int, default=6)
    parser.add_argument("--n", type=int, default=50, help="problems per cell (default: 50)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="base model (default: examples/retune.yaml's)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "retune-unequal"))
    parser.add_argument("--result", default=str(ROOT / "examples" / "results" / "retune-unequal.json"))
    args = parser.parse_args()
    args.lengths = [*range(1, args.train_max + 1), 2 * args.train_max]
    args.repeat, args.share = None, {}  # retune_experiment's data options, at their defaults
    from peftlab.report import over_seeds, write_json

    modules = {}
    for task in args.tasks:
        for seed in args.seeds:
            args.seed = seed
            run = Path(args.runs) / f"{task}-seed{seed}"
            modules[task, seed] = (train_method(task, "retune", run, args), run / f"unequal-n{args.n}.json")
    per_module = {key: evaluate_module(key[0], module, args, out) for key, (module, out) in modules.items()}
    summary = {}
    for task in args.tasks:
        first = per_module[task, args.seeds[0]]
        summary[task] = {part: {key: {sub: over_seeds([per_module[task, s][part][key][sub]["accuracy"]
                                                       for s in args.seeds], args.seeds)
                                      for sub in first[part][key]} for key in first[part]} for part in first}
    write_json(args.result, {"command": " ".join(["python examples/retune_unequal.py", *sys.argv[1:]]),
                             "tasks": args.tasks, "seeds": args.seeds, "steps": args.steps, "n": args.n,
                             "train_lengths": f"1-{args.train_max}", "eval_lengths": args.lengths,
                             "summary": summary,
                             "per_seed": {f"{t} seed {s}": v for (t, s), v in per_module.items()}})
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()

"""MultiLoRA on the eval suite: one adapter per trained family of `core`, trained together in one run, against one
shared LoRA on all the data and against seven separate peft LoRAs trained one after another; every contender sees
each family's examples the same number of times. Accuracy per family on the test split, and wall time of each.

    python examples/multilora_families.py [--seeds 0 1 2] [--steps 150] [--n 100]

- shared:    `lora` on all 1,400 records (200 per family), batch 7, --steps steps: 7 x steps examples;
- multilora: `multilora`, one adapter per family, one run, every batch one example of every family, --steps steps;
- separate:  seven `lora` runs, one per family, batch 1, --steps steps each; served together for the evaluation
             (`module.combine` into one MultiLoRA module: the same weights, one batch).
All: LoRA r=8, alpha 16, all linear layers, lr 2e-3 cosine with 5 warm-up steps, chat template, the training seed.
Evaluation: `peftlab eval` on the 7 trained families, n per family, instance seed 0, greedy, each family answered
by its own adapter (`--route-by-family`) where there is one.

Everything lands in runs/multilora-families/seed<S>/; a finished training or evaluation is kept, so a stopped run
resumes. The table goes to examples/results/multilora-families.json (+ .png).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import LORA, ROOT, evaluate_once, train_once  # examples/common.py

RUNS = ROOT / "runs" / "multilora-families"
RESULT = ROOT / "examples" / "results" / "multilora-families.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--n", type=int, default=100, help="test instances per family")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", default=str(RUNS), help="where the runs go")
    parser.add_argument("--result", default=str(RESULT))
    args = parser.parse_args()
    from peftlab.evals.suite import get_suite, training_records
    from peftlab.module import combine, write

    suite = get_suite("core")
    families = list(suite.trained)
    records = training_records(suite, 200, seed=0)
    runs = {}
    for seed in args.seeds:
        home = Path(args.runs) / f"seed{seed}"
        common = {"steps": args.steps, "seed": seed, "model": args.model}
        times = {"shared": train_once(home / "shared", {"name": "lora", **LORA}, records, batch=7, **common),
                 "multilora": train_once(home / "multilora", {"name": "multilora", **LORA},
                                         [{**r, "adapter": r["family"]} for r in records], batch=1, **common)}
        times["separate"] = sum(train_once(home / "separate" / f, {"name": "lora", **LORA},
                                           [r for r in records if r["family"] == f], batch=1, **common)
                                for f in families)
        served = home / "separate" / "served"
        if not served.exists():
            module = combine({f: home / "separate" / f / "module" for f in families})
            write(served, module.manifest, module.tensors)
        modules = {"shared": home / "shared" / "module", "multilora": home / "multilora" / "module",
                   "separate": served}
        for name, module in modules.items():
            result = evaluate_once(home / f"eval-{name}-n{args.n}.json", module, families, args.n, args.model,
                                   route_by_family=True)
            runs.setdefault(name, []).append({"seed": seed, "train_seconds": times[name],
                                              "families": {f: v["mean"] for f, v in result["families"].items()},
                                              "mean": result["summary"]["trained"]["mean"]})
            print(f"seed {seed} {name:<10} mean {runs[name][-1]['mean']:.3f}  train {times[name]:.0f} s", flush=True)
        write_result(runs, families, args, Path(args.result))  # after every seed: a stopped run keeps its table


def write_result(runs: dict, families: list[str], args: argparse.Namespace, out: Path) -> None:
    from peftlab.report import over_seeds, plot, write_json

    table = {}
    for name, per_seed in runs.items():
        seeds = [r["seed"] for r in per_seed]
        table[name] = {"families": {f: over_seeds([r["families"][f] for r in per_seed], seeds) for f in families},
                       "mean": over_seeds([r["mean"] for r in per_seed], seeds),
                       "train_seconds": over_seeds([r["train_seconds"] for r in per_seed], seeds),
                       "seeds": per_seed}
    write_json(out, {"command": "python examples/multilora_families.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        if k in ("seeds", "steps", "n")), "suite": "core", "split": "test", "n": args.n, "steps": args.steps,
        "adapter": LORA, "contenders": table})
    width = 0.8 / len(table)
    with plot(out.with_suffix(".png"), "", "accuracy", f"one adapter per family vs one shared LoRA, n={args.n}, "
              f"{len(next(iter(runs.values())))} seed(s)", figsize=(9, 4)) as ax:
        for k, (name, entry) in enumerate(table.items()):
            xs = [i + (k - (len(table) - 1) / 2) * width for i in range(len(families))]
            ax.bar(xs, [entry["families"][f]["mean"] for f in families], width,
                   yerr=[entry["families"][f]["std"] for f in families], capsize=2,
                   label=f"{name} ({entry['train_seconds']['mean']:.0f} s training)")
        ax.set_xticks(range(len(families)), families, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

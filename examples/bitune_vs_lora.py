"""Bitune vs LoRA vs the untuned model, side by side, several training seeds each.

Both methods get the same adapter (LoRA r=8, all linear layers), data, steps, batch and learning rate
(examples/bitune.yaml); only ``method.name`` differs. They are trained on the train split of the trained families of
examples/bitune-suite.yaml and evaluated (greedy) on the test split of every family, two of them held out whole.
Every step is skipped when its output exists, so an interrupted run resumes where it stopped:

    python examples/bitune_vs_lora.py                     # seeds 0 1 2, n=100 test questions per family
    python examples/bitune_vs_lora.py --seeds 0 --n 20    # a quick look

Writes examples/results/bitune-vs-lora.json (+ .png): per family, the base model's accuracy and LoRA's and Bitune's
mean ± std over the training seeds, their difference, and whether it exceeds the seed spread.
On a shared 2-core CPU run it with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import paired_interval  # examples/common.py

from peftlab.report import over_seeds

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "examples" / "bitune-suite.yaml"
CONFIG = ROOT / "examples" / "bitune.yaml"
RESULT = ROOT / "examples" / "results" / "bitune-vs-lora.json"
METHODS = {"lora": "LoRA", "bitune": "Bitune"}


def train_run(runs: Path, method: str, seed: int, steps: int) -> Path:
    from peftlab.training import TrainConfig, train

    run = runs / f"{method}-s{seed}"
    if not (run / "module").exists():
        config = TrainConfig.from_yaml(CONFIG, [f"training.seed={seed}", f"training.max_steps={steps}",
                                                f"training.output_dir={run}", f"output={run / 'module'}",
                                                f"data.train={runs / 'train.jsonl'}"])
        if method == "lora":  # exactly the settings of Bitune's two adapters
            adapter = {k: v for k, v in config.method["adapter"].items() if k != "name"}
            config.method = {"name": "lora", **adapter}
        print(f"training {method} seed {seed} ({steps} steps)", flush=True)
        train(config)
    return run


def evaluate_run(label: str, adapter: Path | None, n: int, out: Path) -> dict:
    from peftlab.evals.runner import evaluate, load_candidate
    from peftlab.evals.suite import get_suite

    if not out.exists():
        candidate = load_candidate(str(adapter) if adapter else None, label=label)
        report = evaluate(candidate, get_suite(str(SUITE)), "test", n, (0,), keep_examples=n)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return json.loads(out.read_text())


def combine(base: dict, runs: dict[str, list[dict]], seeds: list[int], n: int) -> dict:
    """One model entry per method: mean ± std over training seeds; plus Bitune - LoRA per family."""
    families = list(base["families"])
    models = [{**base, "label": "untuned", "examples": {}}]
    for method, reports in runs.items():
        fams = {}
        for f in families:
            fams[f] = {**over_seeds([r["families"][f]["mean"] for r in reports], seeds), "n": n,
                       "trained": base["families"][f]["trained"]}
        summary = {}
        for group in base["summary"]:
            summary[group] = {**over_seeds([r["summary"][group]["mean"] for r in reports], seeds),
                              "families": base["summary"][group]["families"]}
        models.append({"label": f"{METHODS[method]} ({len(reports)} seeds)", "method": method, "families": fams,
                       "summary": summary, "seconds_eval": [r["seconds"] for r in reports]})
    lora, bitune = models[1], models[2]
    rows = {**{f: (lora["families"][f], bitune["families"][f]) for f in families},
            **{f"mean ({g})": (lora["summary"][g], bitune["summary"][g]) for g in base["summary"]}}
    difference = {}
    for name, (a, b) in rows.items():
        diff = b["mean"] - a["mean"]
        seed_spread = max(a["std"], b["std"])
        difference[name] = {"bitune_minus_lora": diff, "seed_spread": seed_spread,
                            "exceeds_spread": abs(diff) > seed_spread if len(seeds) > 1 else None}
    trained = [f for f in families if base["families"][f]["trained"]]
    held_out = [f for f in families if f not in trained]
    for g, members in (("trained", trained), ("held_out", held_out), ("all", families)):
        if f"mean ({g})" in difference:
            difference[f"mean ({g})"]["ci95_questions"] = paired_interval(runs["lora"], runs["bitune"], members)
    return {"suite": "bitune", "trained_families": trained, "held_out_families": held_out,
            "split": "test", "n": n, "seeds": seeds, "decoding": "greedy",
            "seeds_are": "training seeds (instances: sampling seed 0, the same questions for every model)",
            "spread_rule": "exceeds_spread: |Bitune - LoRA| > the larger of the two std over training seeds; "
                           "ci95_questions: bootstrap over questions of the seed-averaged paired difference",
            "models": models, "difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--n", type=int, default=100, help="test questions per family (default: 100)")
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps per run (default: 48)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bitune"), help="folder of the runs")
    parser.add_argument("--result", default=str(RESULT), help=f"combined report (default: {RESULT})")
    args = parser.parse_args()
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not (runs_dir / "train.jsonl").exists():
        from peftlab.evals.suite import get_suite, training_records
        from peftlab.io import write_jsonl

        write_jsonl(training_records(get_suite(str(SUITE)), 200, seed=0), runs_dir / "train.jsonl")
    base = evaluate_run("untuned", None, args.n, runs_dir / f"eval-base-n{args.n}.json")
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        for method in METHODS:
            run = train_run(runs_dir, method, seed, args.steps)
            runs[method].append(evaluate_run(f"{method} s{seed}", run / "module", args.n, run / f"eval-n{args.n}.json"))
    report = combine(base, runs, args.seeds, args.n)
    for method in METHODS:
        logs = [json.loads((runs_dir / f"{method}-s{s}" / "train_log.json").read_text()) for s in args.seeds]
        entry = next(m for m in report["models"] if m.get("method") == method)
        entry["training"] = {"train_seconds": [log["metrics"]["train_runtime"] for log in logs],
                             "train_loss": [log["metrics"]["train_loss"] for log in logs],
                             "losses": [[h["loss"] for h in log["log_history"] if "loss" in h] for log in logs],
                             "trainable_parameters": logs[0]["parameters"]["trainable_parameters"]}
    from peftlab.evals.runner import format_table, write_report

    write_report(report, args.result)
    print(format_table(report))
    for name, d in report["difference"].items():
        ci = d.get("ci95_questions")
        interval = f" 95% over questions [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
        print(f"{name:28s} Bitune - LoRA {d['bitune_minus_lora']:+.3f}  seed spread {d['seed_spread']:.3f}  "
              f"{'exceeds' if d['exceeds_spread'] else 'within'}{interval}")
    print(f"wrote {args.result} and {Path(args.result).with_suffix('.png')}")


if __name__ == "__main__":
    main()

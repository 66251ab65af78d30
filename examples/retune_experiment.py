"""Re-Tuning vs scratchpad vs baseline, trained on short problems, evaluated beyond them (the paper's figure).

Each method is trained with examples/retune.yaml (LoRA r=16 on all linear layers, the same steps, batch and
learning rate; --config for another) on problems of 1..--train-max, then evaluated on --n fresh problems per
length up to --eval-max (greedy; Re-Tuning through the batched, memoising recursive engine). Steps are skipped
when their output exists, training resumes from its last checkpoint and an evaluation from its last finished length
(kept per length in the run's eval-n<N>-lengths.json), so an interrupted run continues where it stopped:

    python examples/retune_experiment.py                          # addition-steps, train 1-6, eval 2-12
    python examples/retune_experiment.py --task parity            # train 1-10, eval 2-20
    python examples/retune_experiment.py --methods retune --seed 1     # another seed of one method
    python examples/retune_experiment.py --methods retune --step-accuracy  # + each step in its gold context
    python examples/retune_experiment.py --methods retune --steps 600 --runs runs/retune-600 \
        --result runs/results/retune-addition-steps-600.json      # another budget: its own runs and report
    python examples/retune_experiment.py --methods retune --train-max 8 --runs runs/retune-train8 \
        --result runs/results/retune-addition-steps-train8.json    # train 1-8, evaluate to 16
    (a wider range dilutes the base case: add e.g. --share 1=0.025, or --repeat 1=8 --repeat 2=2, which replaces
    the task's default, with --runs and --result of its own)
    python examples/retune_experiment.py --methods retune --config examples/retune-paper-lora.yaml \
        --runs runs/retune-paper-lora --result runs/results/retune-addition-steps-paper-lora.json

Writes examples/results/retune-<task>.json and .png (accuracy against length, one curve per method); methods run
separately (e.g. one per core) are added to an existing report of the same setup.
On a shared 2-core CPU run it with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import fcntl
import json
from dataclasses import asdict
from pathlib import Path

from peftlab.io import write_jsonl, write_text
from peftlab.recipes.retune.cli import add_oversampling_args, oversampling
from peftlab.recipes.retune.tasks import METHODS
from peftlab.report import portable_path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "retune.yaml"
LENGTHS = {"addition": (6, 12), "addition-steps": (6, 12), "addition-steps-hints": (6, 12),
           "addition-steps-hints-shifted": (6, 12), "addition-steps-runs": (6, 12), "addition-steps-unequal": (6, 12),
           "parity": (10, 20), "parity-steps": (10, 20), "dp": (5, 10), "dp-steps": (5, 10)}  # train max, eval max


def read_back(value):
    """``value`` as JSON gives it back (integer keys become strings), to compare with what a file holds."""
    return json.loads(json.dumps(value))


def train_method(task: str, method: str, run: Path, args: argparse.Namespace) -> Path:
    from peftlab.module import read_manifest
    from peftlab.recipes.retune.data import PROMPT_FORMAT, RetuneData, build
    from peftlab.training import TrainConfig, last_complete_checkpoint, train

    recipe = asdict(RetuneData(task=task, method=method, lengths=f"1-{args.train_max}",
                               problems_per_length=args.per_length, seed=args.seed, repeat=args.repeat,
                               share=args.share))
    if not args.share:
        del recipe["share"]  # the recipes written before --share existed still match
    made = run / "data.json"  # the recipe of train.jsonl (runs made before it was written have none)
    if made.exists() and json.loads(made.read_text()) != read_back(recipe):
        raise SystemExit(f"{run} was made from other data ({made}): pass --runs with a new folder")
    data = run / "train.jsonl"
    overrides = [f"training.output_dir={run}", f"training.max_steps={args.steps}", f"data.train={data}",
                 f"training.seed={args.seed}", *([f"model={args.model}"] if getattr(args, "model", None) else [])]
    config = TrainConfig.from_yaml(args.config, overrides)
    if (run / "module").exists():
        steps = json.loads((run / "train_log.json").read_text())["log_history"][-1]["step"]
        trained = next(iter(read_manifest(run / "module").adapters.values()))
        adapter = {"name": trained.method, **trained.config}
        if steps != args.steps or any(adapter.get(k) != v for k, v in read_back(config.method).items()):
            raise SystemExit(f"{run} was trained for {steps} steps with {adapter}, not {args.steps} with "
                             f"{config.method}: pass --runs with a new folder")
        return run / "module"
    if not data.exists():
        write_jsonl(build(RetuneData(**recipe)), data)
        write_text(made, json.dumps(recipe, indent=2))
    if last_complete_checkpoint(run):
        config.training["resume_from_checkpoint"] = True
    config.data.template, config.data.plain_format = PROMPT_FORMAT.template, PROMPT_FORMAT.plain_format
    print(f"training {method} on {data} ({args.steps} steps)", flush=True)
    return train(config).module_dir


def longest_target(tokenizer, task: str, method: str, length: int) -> int:
    """Tokens of the longest response a method must write at ``length`` (a scratchpad writes every step)."""
    from peftlab.recipes.retune.evaluate import problems_for
    from peftlab.recipes.retune.tasks import get_task

    examples = [e for p in problems_for(task, length, 5, seed=0) for e in get_task(task).examples(p, method)]
    return max(len(tokenizer(response, add_special_tokens=False)["input_ids"]) for _, response, _ in examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="addition-steps", choices=sorted(LENGTHS))
    parser.add_argument("--methods", nargs="+", default=["retune", "scratchpad", "baseline"], choices=METHODS)
    parser.add_argument("--train-max", type=int, help="longest training problem (default: addition 6, parity 10, dp 5)")
    parser.add_argument("--eval-max", type=int, help="longest evaluated problem (default: twice --train-max)")
    parser.add_argument("--per-length", type=int, default=400, help="training problems per length (default: 400)")
    add_oversampling_args(parser)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method (default: 300)")
    parser.add_argument("--n", type=int, default=50, help="evaluation problems per length (default: 50)")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="training config of every method (default: examples/retune.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="training data and training seed (default: 0)")
    parser.add_argument("--step-accuracy", action="store_true",
                        help="Re-Tuning: also grade every step in its gold context, by kind and sub-problem size "
                             "(the report's -step-accuracy.png)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "retune"), help="folder of the runs")
    parser.add_argument("--result", default=None, help="report (default: examples/results/retune-<task>.json)")
    args = parser.parse_args()
    args.train_max = args.train_max or LENGTHS[args.task][0]
    args.eval_max = args.eval_max or 2 * args.train_max
    vars(args).update(oversampling(args))
    from peftlab.adapters import load_for_inference
    from peftlab.recipes.retune.engine import ModelGenerator
    from peftlab.recipes.retune.evaluate import EvalConfig, evaluate_method, is_evaluated, write_report

    lengths = list(range(2, args.eval_max + 1, 2))
    config = EvalConfig(args.task, lengths, args.n, train_lengths=list(range(1, args.train_max + 1)),
                        step_accuracy=args.step_accuracy)
    out = Path(args.result or ROOT / "examples" / "results" / f"retune-{args.task}.json")
    report = {"task": args.task, "n": args.n, "seed": config.seed, "train_lengths": config.train_lengths,
              "training": {"config": portable_path(args.config, ROOT), "steps": args.steps,
                           "problems_per_length": args.per_length}, "runs": {}}
    for option in ("repeat", "share"):  # only when given, so reports of the default data still merge
        if getattr(args, option):
            report["training"][option] = getattr(args, option)
    for method in args.methods:
        name = method + (f" (seed {args.seed})" if args.seed else "")
        run = Path(args.runs) / (f"{args.task}-{method}" + (f"-seed{args.seed}" if args.seed else ""))
        module = train_method(args.task, method, run, args)
        evaluation = run / f"eval-n{args.n}-lengths.json"  # kept per length: a longer range reuses a shorter one
        saved = json.loads(evaluation.read_text()) if evaluation.exists() else {}
        if not all(is_evaluated(config, method, saved.get(str(n))) for n in lengths):  # load the model only then
            loaded = load_for_inference(module)
            generator = ModelGenerator(loaded.model, loaded.tokenizer, max_new_tokens=longest_target(
                loaded.tokenizer, args.task, method, args.eval_max) + 16)
            evaluate_method(config, method, generator, checkpoint=evaluation)
            saved = json.loads(evaluation.read_text())
        log = json.loads((run / "train_log.json").read_text())
        report["runs"][name] = {"method": method, "seed": args.seed, "module": portable_path(module, ROOT),
                                  "lengths": {str(length): saved[str(length)] for length in lengths},
                                  "train_seconds": log["metrics"]["train_runtime"],
                                  "losses": [h["loss"] for h in log["log_history"] if "loss" in h]}
        print(name, {n: round(v["accuracy"], 2) for n, v in report["runs"][name]["lengths"].items()}, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:  # runs finishing together merge one after another
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():  # methods and seeds run separately (one per core) add to the report of the same setup
            earlier = json.loads(out.read_text())
            setup = read_back({k: v for k, v in report.items() if k != "runs"})
            if {k: v for k, v in earlier.items() if k != "runs"} != setup:
                raise SystemExit(f"{out} reports another setup than {setup}: pass --result to write elsewhere")
            report["runs"] = {**earlier["runs"], **report["runs"]}
        write_report(report, out)
    print(f"wrote {out} and its .png")


if __name__ == "__main__":
    main()

"""Baseline of the `core` eval suite: the default model alone, and a LoRA trained on the suite's trained families.

Runs these commands (each step is skipped when its output already exists, so an interrupted run resumes):

    peftlab data make --suite core --split train --n 200 --seed 0 -o runs/evals/core-train.jsonl
    peftlab train examples/evals-lora.yaml            # LoRA r=8 all-linear, 40 steps x 8 examples, lr 2e-3
    peftlab train examples/evals-lora.yaml --set training.max_steps=150 \\
        --set training.output_dir=runs/evals/core-lora-150 --set output=runs/evals/core-lora-150/module
    peftlab eval --suite core --split test --n N --seeds 0 --out runs/evals/base-nN-s0.json
    peftlab eval --suite core --split test --n N --seeds 0 --adapter runs/evals/core-lora/module \\
                 --out runs/evals/core-lora-nN-s0.json          # and the same for core-lora-150

and puts the reports side by side in examples/results/evals-baseline.json (+ .png), as `peftlab eval --compare`
would (the evaluations run as separate processes so each can be resumed on its own).

    python examples/evals_baseline.py [--n 50]
    python examples/evals_baseline.py --n 100 --seeds 0 1 --runs base core-lora-150 \\
        --result examples/results/evals-baseline-n100.json       # the second table in docs/evals.md

On a 2-core CPU shared with other jobs, run it with OMP_NUM_THREADS=1: two torch threads on two busy cores wait on
each other's time slices and generation gets many times slower.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "evals"
DATA = RUNS / "core-train.jsonl"
LORAS = [  # (label, run folder, `peftlab train examples/evals-lora.yaml` overrides)
    ("LoRA r=8, 40 steps", RUNS / "core-lora", []),
    ("LoRA r=8, 150 steps", RUNS / "core-lora-150",
     ["--set", "training.max_steps=150", "--set", "training.output_dir=runs/evals/core-lora-150",
      "--set", "output=runs/evals/core-lora-150/module"]),
]
RESULT = ROOT / "examples" / "results" / "evals-baseline.json"


def peftlab(*args: str) -> None:
    cmd = [sys.executable, "-m", "peftlab.cli", *args]
    print("$ peftlab " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50, help="test instances per family (default: 50)")
    parser.add_argument("--seeds", nargs="+", default=["0"], help="instance-sampling seeds (default: 0)")
    parser.add_argument("--runs", nargs="+", default=["base", *(d.name for _, d, _ in LORAS)],
                        help="which of base, core-lora, core-lora-150 to evaluate (default: all)")
    parser.add_argument("--result", default=str(RESULT), help=f"combined report (default: {RESULT})")
    args = parser.parse_args()
    result = Path(args.result)
    loras = [entry for entry in LORAS if entry[1].name in args.runs]
    common = ["--suite", "core", "--split", "test", "--n", str(args.n), "--seeds", *args.seeds,
              "--keep-examples", str(args.n) if len(args.seeds) == 1 else "20"]  # all kept: `rescore` works on them

    if not DATA.exists():
        peftlab("data", "make", "--suite", "core", "--split", "train", "--n", "200", "--seed", "0", "-o", str(DATA))
    for _, run_dir, overrides in loras:
        if not (run_dir / "module").exists():
            peftlab("train", "examples/evals-lora.yaml", *overrides)
    suffix = f"n{args.n}-s{'_'.join(args.seeds)}"
    reports = []
    for label, run_dir, overrides in [(None, None, [])] * ("base" in args.runs) + loras:
        out = RUNS / f"{run_dir.name if run_dir else 'base'}-{suffix}.json"
        if not out.exists():
            extra = ["--adapter", str(run_dir / "module")] if run_dir else []
            peftlab("eval", *common, *extra, "--out", str(out), "--no-progress")
        report = json.loads(out.read_text())
        if run_dir:
            report["models"][0]["label"] = label
            train_log = json.loads((run_dir / "train_log.json").read_text())
            report["models"][0]["training"] = {
                "command": " ".join(["peftlab train examples/evals-lora.yaml", *overrides]),
                "data": "peftlab data make --suite core --split train --n 200 --seed 0 (1400 records)",
                "metrics": train_log["metrics"],
                "losses": [h["loss"] for h in train_log["log_history"] if "loss" in h]}
        reports.append(report)

    from peftlab.evals.runner import format_table, write_report

    combined = dict(reports[0])
    combined["models"] = [r["models"][0] for r in reports]
    write_report(combined, result)
    print(format_table(combined))
    print(f"wrote {result} and {result.with_suffix('.png')}")


if __name__ == "__main__":
    main()

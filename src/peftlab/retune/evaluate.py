"""Accuracy per problem length for each method: the baseline and scratchpad answer in one generation, Re-Tuning
through the recursive engine. Writes JSON (accuracy, failures, model calls, example call trees) and a PNG of
accuracy against length, the paper's figure."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from peftlab.io import write_text
from peftlab.retune.engine import Engine, EngineConfig, Generator
from peftlab.retune.tasks import Task, get_task


@dataclass
class EvalConfig:
    task: str = "addition"
    lengths: list[int] | None = None
    n: int = 50  # problems per length
    seed: int = 1234  # problems are drawn from this seed, the same for every method
    train_lengths: list[int] | None = None  # marked on the plot (in distribution)


def problems_for(task_name: str, length: int, n: int, seed: int) -> list[Any]:
    rng = random.Random(f"{task_name}/{length}/{seed}")  # the same problems whatever other lengths are asked
    task = get_task(task_name)
    return [task.sample(length, rng) for _ in range(n)]


class _Recorder:
    """A generator that remembers its answer to every prompt (greedy decoding: one answer per prompt)."""

    def __init__(self, generate: Generator) -> None:
        self.generate, self.answers = generate, {}

    def __call__(self, prompts: list[str]) -> list[str]:
        outputs = self.generate(prompts)
        self.answers.update(zip(prompts, outputs, strict=True))
        return outputs


def first_wrong_step(task: Task, problem: Any, answers: dict[str, str]) -> dict[str, Any] | None:
    """The first step, in the order the engine runs them, where the model's answer differs from the training
    target: where a wrong Re-Tuning solution went off the rails (None if every step it took was right)."""
    for prompt, expected, size in task.examples(problem, "retune"):
        got = answers.get(prompt)
        if got is None:
            return None
        if got.strip() != expected.strip():
            return {"size": size, "prompt": prompt, "expected": expected, "got": got}
    return None


def evaluate_method(config: EvalConfig, method: str, generate: Generator, engine: EngineConfig | None = None,
                    keep_trees: int = 2, checkpoint: Path | None = None) -> dict[str, Any]:
    """``{length: {accuracy, n, failures, calls_per_problem, seconds, examples}}`` for one method; Re-Tuning adds
    ``wrong_step_sizes`` (sub-problem size of each wrong answer's first wrong step) and the call trees and first
    wrong steps of ``keep_trees`` wrong answers (or right ones when none is wrong).

    With ``checkpoint`` (a JSON file of this model, method, ``n`` and seed), each length's result is saved there as
    it finishes and lengths already there are not run again: a stopped evaluation (long recursions take an hour
    on a CPU) resumes, and a longer range reuses a shorter one's lengths."""
    task = get_task(config.task)
    saved = {}
    if checkpoint and checkpoint.exists():
        saved = {int(k): v for k, v in json.loads(checkpoint.read_text()).items()}
    per_length = {}
    bar = tqdm(config.lengths or [1], desc=f"evaluating {method}", unit="length")
    for length in bar:
        if length in saved:
            per_length[length] = saved[length]
            continue
        problems = problems_for(config.task, length, config.n, config.seed)
        start = time.perf_counter()
        analysis: dict[str, Any] = {}
        if method == "retune":
            recorder = _Recorder(generate)
            results = Engine(recorder, engine).run([task.root(p).text for p in problems])
            outputs = [r.output or "" for r in results]
            errors = Counter(r.kind for r in results if r.kind)
            calls = sum(r.calls for r in results) / len(results)
        else:
            outputs = generate([task.prompt(p, method) for p in problems])
            errors, calls = Counter(), 1.0
        seconds = time.perf_counter() - start
        correct = [task.correct(o, p, method) for o, p in zip(outputs, problems, strict=True)]
        if method == "retune":
            wrong = [i for i, c in enumerate(correct) if not c]
            steps = {i: first_wrong_step(task, problems[i], recorder.answers) for i in wrong}
            shown = (wrong or list(range(len(problems))))[:keep_trees]
            analysis = {"wrong_step_sizes": dict(sorted(Counter(s["size"] for s in steps.values() if s).items())),
                        "call_trees": [{"problem": str(problems[i]), "first_wrong_step": steps.get(i),
                                        **results[i].tree.to_dict()} for i in shown]}
        per_length[length] = {
            "accuracy": sum(correct) / len(correct), "n": len(correct), "failures": dict(errors),
            "calls_per_problem": calls, "seconds": round(seconds, 2),
            "examples": [{"problem": str(p), "output": o, "correct": c}
                         for p, o, c in list(zip(problems, outputs, correct, strict=True))[:3]],
            **analysis,
        }
        bar.set_postfix({f"acc@{length}": round(per_length[length]["accuracy"], 2)})
        if checkpoint:
            saved[length] = per_length[length]
            write_text(checkpoint, json.dumps(dict(sorted(saved.items())), indent=2, default=str))
    return per_length


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """``out`` (JSON) and the plot beside it (same name, .png)."""
    out = write_text(out, json.dumps(report, indent=2, default=str) + "\n")
    plot(report, out.with_suffix(".png"))
    return out


SEED_STYLES = ("-", "--", ":", "-.")  # one method's seeds share its colour and differ in line style


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"baseline": "tab:orange", "scratchpad": "tab:blue", "retune": "tab:green"}
    for label, run in report["runs"].items():
        lengths = sorted(run["lengths"], key=int)
        ax.plot([int(n) for n in lengths], [run["lengths"][n]["accuracy"] for n in lengths], marker="o",
                markersize=3, label=label, color=colors.get(run.get("method")),
                linestyle=SEED_STYLES[run.get("seed", 0) % len(SEED_STYLES)])
    ax.xaxis.get_major_locator().set_params(integer=True)
    train = report.get("train_lengths")
    if train:
        ax.axvspan(min(train) - 0.5, max(train) + 0.5, color="grey", alpha=0.12, label="training lengths")
    ax.set_xlabel("problem length")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Re-Tuning: {report['task']}, n={report['n']} per length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

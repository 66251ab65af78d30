"""Accuracy per problem length for each method: the baseline and scratchpad answer in one generation, Re-Tuning
through the recursive engine. Writes JSON (accuracy, failures, model calls, example call trees) and a PNG of
accuracy against length, the paper's figure."""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from peftlab.recipes.retune.engine import Engine, EngineConfig, Generator
from peftlab.recipes.retune.tasks import CALL, RETURN, Addition, Task, get_task
from peftlab.report import plot, write_json


@dataclass
class EvalConfig:
    task: str = "addition"
    lengths: list[int] | None = None
    n: int = 50  # problems per length
    seed: int = 1234  # problems are drawn from this seed, the same for every method
    train_lengths: list[int] | None = None  # marked on the plot (in distribution)
    step_accuracy: bool = False  # Re-Tuning: also grade every gold step in its gold context (see step_accuracy)
    family: str = "uniform"  # addition: the operands' family (tasks.ADDITION_FAMILIES), e.g. carry-chain


def problems_for(task_name: str, length: int, n: int, seed: int, family: str = "uniform") -> list[Any]:
    """``n`` problems of ``length``, the same whatever other lengths are asked; addition tasks draw their operands
    from ``family`` (see ``tasks.operands``)."""
    task = get_task(task_name)
    if family == "uniform":  # the seed string of the standing reports: their problems stay the same
        rng = random.Random(f"{task_name}/{length}/{seed}")
        return [task.sample(length, rng) for _ in range(n)]
    if not isinstance(task, Addition):
        raise ValueError(f"operand families are for addition tasks, not {task_name!r}")
    rng = random.Random(f"{task_name}/{length}/{seed}/{family}")
    return [task.sample(length, rng, family=family) for _ in range(n)]


class _Recorder:
    """A generator that remembers its answer to every prompt (greedy decoding: one answer per prompt)."""

    def __init__(self, generate: Generator) -> None:
        self.generate, self.answers = generate, {}

    def __call__(self, prompts: list[str]) -> list[str]:
        outputs = self.generate(prompts)
        self.answers.update(zip(prompts, outputs, strict=True))
        return outputs


def same_step(got: str, expected: str) -> bool:
    return got.strip() == expected.strip()


def first_wrong_step(task: Task, problem: Any, answers: dict[str, str]) -> dict[str, Any] | None:
    """The first step, in the order the engine runs them, where the model's answer differs from the training
    target: where a wrong Re-Tuning solution went off the rails (None if every step it took was right)."""
    for prompt, expected, size in task.examples(problem, "retune"):
        got = answers.get(prompt)
        if got is None:
            return None
        if not same_step(got, expected):
            return {"size": size, "prompt": prompt, "expected": expected, "got": got}
    return None


def step_kind(prompt: str, response: str) -> str:
    """``call``: the step writes a call; ``combine``: it answers from what its calls returned; ``base``: it
    answers outright (the recursion's base case)."""
    if CALL in response:
        return "call"
    return "combine" if RETURN.partition("{")[0] in prompt else "base"


def step_accuracy(task: Task, problems: Sequence[Any], generate: Generator,
                  asked: dict[str, str] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """``{kind: {sub-problem size: {accuracy, n}}}``, teacher-forced: every step of each problem's gold Re-Tuning
    solution, asked in its gold context and graded against its target. Tells steps that fail beyond the trained
    sizes from errors that compound over a long recursion. Prompts already answered in ``asked`` (greedy: the
    same answer) are not asked again."""
    steps = {prompt: (expected, size) for q in problems for prompt, expected, size in task.examples(q, "retune")}
    answers = dict(asked or {})
    missing = sorted((p for p in steps if p not in answers), key=len)  # similar lengths batch together
    answers.update(zip(missing, generate(missing) if missing else [], strict=True))
    tally: dict[tuple[str, int], Counter] = defaultdict(Counter)
    for prompt, (expected, size) in steps.items():
        cell = tally[step_kind(prompt, expected), size]
        cell["n"] += 1
        cell["right"] += same_step(answers[prompt], expected)
    out: dict[str, dict[int, dict[str, float]]] = {}
    for (kind, size), cell in sorted(tally.items()):
        out.setdefault(kind, {})[size] = {"accuracy": cell["right"] / cell["n"], "n": cell["n"]}
    return out


def is_evaluated(config: EvalConfig, method: str, result: dict[str, Any] | None) -> bool:
    """Whether a saved length's ``result`` holds all that ``config`` asks of ``method`` (then it is not rerun)."""
    return bool(result) and ("step_accuracy" in result or not (config.step_accuracy and method == "retune"))


def evaluate_method(config: EvalConfig, method: str, generate: Generator, engine: EngineConfig | None = None,
                    keep_trees: int = 2, checkpoint: Path | None = None) -> dict[str, Any]:
    """``{length: {accuracy, n, failures, failure_per_problem, calls_per_problem, seconds, examples}}`` for one
    method (``failures`` counts each problem's failure by kind: an engine error such as a cycle or a budget, or a
    wrong answer); Re-Tuning adds
    ``wrong_step_sizes`` (sub-problem size of each wrong answer's first wrong step) and the call trees and first
    wrong steps of ``keep_trees`` wrong answers (or right ones when none is wrong).

    With ``config.step_accuracy``, Re-Tuning also adds ``step_accuracy`` (see ``step_accuracy``; the steps the
    engine asked are not asked again).

    With ``checkpoint`` (a JSON file of this model, method, ``n`` and seed), each length's result is saved there as
    it finishes and lengths already there (with step accuracy, if asked) are not run again: a stopped evaluation
    (long recursions take an hour on a CPU) resumes, and a longer range reuses a shorter one's lengths."""
    task = get_task(config.task)
    saved = {}
    if checkpoint and checkpoint.exists():
        saved = {int(k): v for k, v in json.loads(checkpoint.read_text()).items()}
    per_length = {}
    bar = tqdm(config.lengths or [1], desc=f"evaluating {method}", unit="length")
    for length in bar:
        if is_evaluated(config, method, saved.get(length)):
            per_length[length] = saved[length]
            continue
        problems = problems_for(config.task, length, config.n, config.seed, config.family)
        start = time.perf_counter()
        analysis: dict[str, Any] = {}
        if method == "retune":
            recorder = _Recorder(generate)
            results = Engine(recorder, engine).run([task.root(p).text for p in problems])
            outputs = [r.output or "" for r in results]
            calls = sum(r.calls for r in results) / len(results)
        else:
            outputs = generate([task.prompt(p, method) for p in problems])
            calls = 1.0
        seconds = time.perf_counter() - start
        correct = [task.correct(o, p, method) for o, p in zip(outputs, problems, strict=True)]
        # why each problem failed: the engine's kind (a cycle, a budget, a call it could not parse), else a wrong
        # final answer; None where it was right
        engine_kinds = [r.kind for r in results] if method == "retune" else [None] * len(correct)
        kinds = [None if c else (k or "wrong answer") for c, k in zip(correct, engine_kinds, strict=True)]
        errors = Counter(k for k in kinds if k)
        if method == "retune":
            wrong = [i for i, c in enumerate(correct) if not c]
            steps = {i: first_wrong_step(task, problems[i], recorder.answers) for i in wrong}
            shown = (wrong or list(range(len(problems))))[:keep_trees]
            analysis = {"wrong_step_sizes": dict(sorted(Counter(s["size"] for s in steps.values() if s).items())),
                        "call_trees": [{"problem": str(problems[i]), "first_wrong_step": steps.get(i),
                                        **results[i].tree.to_dict()} for i in shown]}
            if config.step_accuracy:
                analysis["step_accuracy"] = step_accuracy(task, problems, generate, recorder.answers)
        per_length[length] = {
            "accuracy": sum(correct) / len(correct), "n": len(correct), "failures": dict(errors),
            "failure_per_problem": kinds,
            "calls_per_problem": calls, "seconds": round(seconds, 2),
            "examples": [{"problem": str(p), "output": o, "correct": c}
                         for p, o, c in list(zip(problems, outputs, correct, strict=True))[:3]],
            **analysis,
        }
        bar.set_postfix({f"acc@{length}": round(per_length[length]["accuracy"], 2)})
        if checkpoint:
            saved[length] = per_length[length]
            write_json(checkpoint, dict(sorted(saved.items())))
    return per_length


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """``out`` (JSON) and the plot beside it (same name, .png); with step accuracy also
    ``<name>-step-accuracy.png``."""
    out = write_json(out, report)
    plot_lengths(report, out.with_suffix(".png"))
    if any("step_accuracy" in v for run in report["runs"].values() for v in run["lengths"].values()):
        plot_steps(report, out.with_name(out.stem + "-step-accuracy.png"))
    return out


SEED_STYLES = ("-", "--", ":", "-.")  # one method's seeds share its colour and differ in line style


def plot_lengths(report: dict[str, Any], path: Path) -> None:
    """Accuracy against problem length, one line per run (the paper's figure)."""
    colors = {"baseline": "tab:orange", "scratchpad": "tab:blue", "retune": "tab:green"}
    with plot(path, "problem length", "accuracy", f"Re-Tuning: {report['task']}, n={report['n']} per length") as ax:
        for label, run in report["runs"].items():
            lengths = sorted(run["lengths"], key=int)
            ax.plot([int(n) for n in lengths], [run["lengths"][n]["accuracy"] for n in lengths], marker="o",
                    markersize=3, label=label, color=colors.get(run.get("method")),
                    linestyle=SEED_STYLES[run.get("seed", 0) % len(SEED_STYLES)])
        _accuracy_axes(ax, report)


def plot_steps(report: dict[str, Any], path: Path) -> None:
    """Teacher-forced step accuracy against sub-problem size, pooled over the evaluated lengths: one line per step
    kind and run. Where single steps break, apart from how their errors compound."""
    colors = {"call": "tab:green", "combine": "tab:purple", "base": "tab:grey"}
    lengths = sorted({int(n) for run in report["runs"].values() for n in run["lengths"]})
    title = f"Re-Tuning steps in their gold context: {report['task']}, lengths {lengths[0]}-{lengths[-1]}"
    with plot(path, "sub-problem size", "accuracy", title) as ax:
        for label, run in report["runs"].items():
            pooled: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0])  # (kind, size) -> [right, n]
            for result in run["lengths"].values():
                for kind, sizes in result.get("step_accuracy", {}).items():
                    for size, cell in sizes.items():
                        pooled[kind, int(size)][0] += cell["accuracy"] * cell["n"]
                        pooled[kind, int(size)][1] += cell["n"]
            for kind, color in colors.items():
                sizes = sorted(size for k, size in pooled if k == kind)
                if sizes:
                    ax.plot(sizes, [pooled[kind, s][0] / pooled[kind, s][1] for s in sizes], marker="o",
                            markersize=3, color=color, linestyle=SEED_STYLES[run.get("seed", 0) % len(SEED_STYLES)],
                            label=f"{label}: {kind}")
        _accuracy_axes(ax, report)


def _accuracy_axes(ax, report: dict[str, Any]) -> None:
    """What both plots share: integer ticks, accuracy from 0 to 1, the training lengths shaded."""
    ax.xaxis.get_major_locator().set_params(integer=True)
    train = report.get("train_lengths")
    if train:
        ax.axvspan(min(train) - 0.5, max(train) + 0.5, color="grey", alpha=0.12, label="training lengths")
    ax.set_ylim(-0.02, 1.02)

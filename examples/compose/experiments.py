"""Module arithmetic on the default model: four experiments from PEM's validation plan, 3 seeds each.

    python examples/compose/experiments.py [multitask distribution unlearning analogy] [--seeds 0 1 2] [--n 100]

- multitask:    LoRA for family X + LoRA for family Y: the sum, PEM's average, λ·(X + Y) with λ chosen on the
                validation split (``compose.search``), and TIES (density 0.2, on the LoRAs folded into model
                folders). Accuracy on X and on Y against each alone and the base, and the share of each one's gain
                over the base that the composition keeps (goal >= 80 %).
- distribution: two LoRAs on disjoint halves of one family's training data, averaged and summed, against each
                alone and against one LoRA on all of it (PEM's distribution generalisation).
- unlearning:   a LoRA trained on a family in which half the answers end with an emoji learns both; subtracting
                λ x a LoRA of the style alone should bring the emoji rate back to the base model's while the task's
                accuracy and the loss on neutral text move < 5 %. The style LoRA learns the base model's own
                answers to other families' prompts with an emoji after each, so it carries the style and no task.
                λ is chosen on the validation split (the smallest λ of the grid whose emoji rate is the base's)
                and reported on the test split.
- analogy:      analogy(emoji task, plain task, plain Y) = emoji task − plain task + plain Y: does Y's LoRA pick up
                the emoji style, and keep Y's accuracy?

Every LoRA: r=8, alpha 16, all linear layers, 150 steps of batch 1 (examples/common.py). The per-family LoRAs are
the ones examples/multilora_families.py trains (runs/multilora-families/seed<S>/separate/<family>), trained here
if missing with the same settings. Everything lands in runs/compose/; finished trainings and evaluations are kept,
so a stopped run resumes. Results: examples/results/compose-<experiment>.json (+ .png).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/common.py
from common import LORA, ROOT, evaluate_once, response_loss, train_once  # noqa: E402

RUNS = ROOT / "runs" / "compose"
FAMILY_RUNS = ROOT / "runs" / "multilora-families"
RESULTS = ROOT / "examples" / "results"
STEPS, TRAIN_PER_FAMILY = 150, 200
PAIRS = [("unit_conversion", "format_following"), ("list_ops", "string_ops")]
EMOJIS = ["😊", "🚀", "🌟", "🎉", "👍"]
STYLE_FAMILIES = ["arithmetic", "fact_choice", "table_lookup", "string_ops"]
NEUTRAL_FAMILIES = ["arithmetic", "fact_choice", "table_lookup", "string_ops", "format_following"]
TASK, OTHER = "unit_conversion", "list_ops"  # the styled task (unlearning), Y of the analogy
LAMBDAS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
SEARCH_LAMBDAS = [0.6, 0.7, 0.8]


def has_emoji(text: str) -> bool:
    return any(ord(ch) >= 0x1F300 for ch in text)


def emoji_rate(result: dict) -> float:
    outputs = [e["output"] for examples in result["examples"].values() for e in examples]
    return sum(map(has_emoji, outputs)) / len(outputs)


def accuracy(result: dict, family: str) -> float:
    return result["families"][family]["mean"]


def kept(composed: float, alone: float, base: float) -> float | None:
    """The share of a module's gain over the base that a composition keeps (None: the module gained nothing)."""
    return (composed - base) / (alone - base) if alone > base else None


def records(family: str | list[str], n: int = TRAIN_PER_FAMILY, split: str = "train") -> list[dict]:
    from peftlab.evals.suite import get_suite, training_records

    wanted = [family] if isinstance(family, str) else family
    return [r for r in training_records(get_suite("core"), n, seed=0, split=split) if r["family"] in wanted]


def styled(rows: list[dict], share: float, seed: int) -> list[dict]:
    """``rows`` with an emoji after the answer in a ``share`` of them (chosen and drawn with ``seed``)."""
    rng = random.Random(seed)
    return [{**r, "response": f"{r['response']} {rng.choice(EMOJIS)}"} if rng.random() < share else r for r in rows]


def family_lora(family: str, seed: int, model: str) -> Path:
    """The family's own LoRA, shared with examples/multilora_families.py."""
    folder = FAMILY_RUNS / f"seed{seed}" / "separate" / family
    train_once(folder, {"name": "lora", **LORA}, records(family), STEPS, 1, seed, model)
    return folder / "module"


def lora(folder: Path, rows: list[dict], seed: int, model: str) -> Path:
    train_once(folder, {"name": "lora", **LORA}, rows, STEPS, 1, seed, model)
    return folder / "module"


def composed(out: Path, expression: str, modules: dict[str, Path]) -> Path:
    from peftlab.compose import compose

    if not out.exists():
        compose(expression, modules, out)
    return out


def merged(module: Path, out: Path) -> Path:
    """``module`` folded into its base model: a model folder (for TIES, which acts on dense task vectors)."""
    from peftlab.adapters import merge

    if not out.exists():
        merge(module, out)
    return out


def alignment(modules: dict[str, Path]) -> dict[str, float]:
    """How much two LoRAs' updates overlap: the cosine of their flattened ΔW, per target layer."""
    from peftlab.compose.lora import dense, terms
    from peftlab.compose.operands import read_operand

    layers = terms([read_operand(k, v) for k, v in modules.items()], dict.fromkeys(modules, 1.0))
    cosines = []
    for x, y in layers.values():
        dx, dy = dense([x]), dense([y])
        cosines.append(float((dx * dy).sum() / (dx.norm() * dy.norm())))
    return {"mean": statistics.fmean(cosines), "max": max(cosines), "min": min(cosines)}


def multitask(seed: int, n: int, model: str) -> dict:
    from peftlab.compose import compose, eval_scorer, search

    home, rows = RUNS / "multitask" / f"seed{seed}", {}
    for x, y in PAIRS:
        modules = {"x": family_lora(x, seed, model), "y": family_lora(y, seed, model)}
        pair = {"base": evaluate_once(RUNS / f"base-{x}-{y}-n{n}.json", None, [x, y], n, model),
                "x": evaluate_once(home / f"{x}-alone.json", modules["x"], [x], n, model),
                "y": evaluate_once(home / f"{y}-alone.json", modules["y"], [y], n, model)}
        folder = home / f"{x}+{y}"
        row = {}
        for name in ("sum", "average", "searched", "ties"):
            out, as_model = folder / name, name == "ties"
            if not out.exists() and name == "searched":  # λ chosen on the validation split by peftlab's search
                search("lam*x + lam*y", modules, out, {"lam": SEARCH_LAMBDAS}, eval_scorer([x, y], n=n // 2))
            elif not out.exists() and name == "ties":  # TIES (density 0.2, λ = 1) on the LoRAs as model folders
                compose("x + y", {k: merged(m, home / f"merged-{k}-{x if k == 'x' else y}")
                                  for k, m in modules.items()}, out, base=model, ties=0.2)
            elif not out.exists():
                compose("x + y" if name == "sum" else "0.5*x + 0.5*y", modules, out)
            result = evaluate_once(folder.parent / f"{x}+{y}-{name}.json", None if as_model else out, [x, y], n,
                                   str(out) if as_model else model)
            row[name] = {f: accuracy(result, f) for f in (x, y)}
            row[name]["kept"] = {f: kept(accuracy(result, f), accuracy(pair[k], f), accuracy(pair["base"], f))
                                 for f, k in ((x, "x"), (y, "y"))}
        row["searched"]["lambda"] = json.loads((folder / "searched" / "search.json").read_text())["best"][
            "numbers"]["lam"]
        row["delta_w_cosine"] = alignment(modules)
        row["alone"] = {x: accuracy(pair["x"], x), y: accuracy(pair["y"], y)}
        row["base"] = {f: accuracy(pair["base"], f) for f in (x, y)}
        rows[f"{x}+{y}"] = row
    return rows


def distribution(seed: int, n: int, model: str) -> dict:
    home, family = RUNS / "distribution" / f"seed{seed}", OTHER
    rows = records(family)
    random.Random(seed).shuffle(rows)
    halves = {"half1": lora(home / "half1", rows[: len(rows) // 2], seed, model),
              "half2": lora(home / "half2", rows[len(rows) // 2:], seed, model)}
    candidates = {**halves, "all": family_lora(family, seed, model),
                  "average": composed(home / "average", "0.5*half1 + 0.5*half2", halves),
                  "sum": composed(home / "sum", "half1 + half2", halves)}
    out = {name: accuracy(evaluate_once(home / f"eval-{name}.json", folder, [family], n, model), family)
           for name, folder in candidates.items()}
    out["base"] = accuracy(evaluate_once(RUNS / f"base-{family}-n{n}.json", None, [family], n, model), family)
    out["delta_w_cosine"] = alignment(halves)
    return out


def base_answers(model: str) -> list[dict]:
    """Other families' training prompts with the base model's own greedy answers (made once, kept)."""
    path = RUNS / "base-answers.json"
    if not path.exists():
        from peftlab.adapters import load_for_inference
        from peftlab.generation import generate
        from peftlab.report import write_json

        loaded = load_for_inference(None, model)
        rows = records(STYLE_FAMILIES, TRAIN_PER_FAMILY // len(STYLE_FAMILIES))
        answers = generate(loaded.model, loaded.tokenizer, [r["prompt"] for r in rows], loaded.prompt_format,
                           max_new_tokens=48, batch_size=16)
        write_json(path, [{**r, "response": a} for r, a in zip(rows, answers, strict=True) if a])
    return json.loads(path.read_text())


def style_modules(seed: int, model: str) -> tuple[Path, Path]:
    """(the task LoRA with half its answers styled, the LoRA of the style alone)."""
    home = RUNS / "style" / f"seed{seed}"
    task = lora(home / "task", styled(records(TASK), 0.5, seed), seed, model)
    style = lora(home / "style", styled(base_answers(model), 1.0, seed), seed, model)
    return task, style


def unlearning(seed: int, n: int, model: str) -> dict:
    home = RUNS / "unlearning" / f"seed{seed}"
    task, style = style_modules(seed, model)
    base_val = evaluate_once(RUNS / f"base-{TASK}-validation-n{n // 2}.json", None, [TASK], n // 2, model,
                             split="validation")
    grid = []
    for lam in LAMBDAS:
        folder = composed(home / f"minus{lam}", f"task - {lam}*style", {"task": task, "style": style})
        result = evaluate_once(home / f"validation-minus{lam}.json", folder, [TASK], n // 2, model,
                               split="validation")
        grid.append({"lambda": lam, "emoji_rate": emoji_rate(result), "accuracy": accuracy(result, TASK)})
    chosen = next((g["lambda"] for g in grid if g["emoji_rate"] <= emoji_rate(base_val)), LAMBDAS[-1])
    neutral = records(NEUTRAL_FAMILIES, 20, split="validation")
    out = {"validation_grid": grid, "lambda": chosen}
    for name, folder in (("base", None), ("task", task), ("task_minus_style", home / f"minus{chosen}")):
        result = evaluate_once(home / f"test-{name}.json" if folder else RUNS / f"base-{TASK}-n{n}.json", folder,
                               [TASK], n, model)
        out[name] = {"emoji_rate": emoji_rate(result), "accuracy": accuracy(result, TASK),
                     "neutral_loss": response_loss(folder, neutral, model)}
    return out


def analogy(seed: int, n: int, model: str) -> dict:
    home = RUNS / "analogy" / f"seed{seed}"
    task, _ = style_modules(seed, model)
    modules = {"styled": task, "plain": family_lora(TASK, seed, model), "other": family_lora(OTHER, seed, model)}
    folder = composed(home / "analogy", "analogy(styled, plain, other)", modules)
    out = {}
    for name, module in (("base", None), ("other", modules["other"]), ("analogy", folder)):
        result = evaluate_once(home / f"eval-{name}.json" if module else RUNS / f"base-{OTHER}-n{n}.json", module,
                               [OTHER], n, model)
        out[name] = {"emoji_rate": emoji_rate(result), "accuracy": accuracy(result, OTHER)}
    return out


EXPERIMENTS = {"multitask": multitask, "distribution": distribution, "unlearning": unlearning, "analogy": analogy}


def summarise(per_seed: list[dict], seeds: list[int]) -> dict:
    """Mean and std over seeds (report.over_seeds) of every number in the per-seed results (same nesting)."""
    from peftlab.report import over_seeds

    first = per_seed[0]
    if isinstance(first, dict):
        return {k: summarise([s[k] for s in per_seed], seeds) for k in first}
    if isinstance(first, list):
        return [summarise([s[i] for s in per_seed], seeds) for i in range(len(first))]
    return over_seeds(per_seed, seeds) if isinstance(first, (int, float)) else first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", default=list(EXPERIMENTS), help=f"any of {list(EXPERIMENTS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=100, help="test instances per family")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiments {unknown}; choose from {list(EXPERIMENTS)}")
    from peftlab.report import write_json

    for name in args.experiments:
        per_seed = []
        for seed in args.seeds:
            per_seed.append(EXPERIMENTS[name](seed, args.n, args.model))
            write_json(RESULTS / f"compose-{name}.json", {
                "command": f"python examples/compose/experiments.py {name} --seeds "
                           f"{' '.join(map(str, args.seeds))} --n {args.n}",
                "seeds_done": args.seeds[: len(per_seed)], "n": args.n, "lora": LORA, "steps": STEPS,
                "summary": summarise(per_seed, args.seeds[: len(per_seed)]), "per_seed": per_seed})
            print(f"{name} seed {seed}: {per_seed[-1]}", flush=True)


if __name__ == "__main__":
    main()

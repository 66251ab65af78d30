"""DIT on the default model, measured as the paper means it: held-out diffs on two splits, a scaling curve over
random topic subsets and seeds, real baselines, the trigger variant, and a cross-check on other LoRAs.

    python examples/dit_experiment.py              # every step resumes: finished parts in runs/dit/ are kept
    python examples/dit_experiment.py --no-trigger # without the trigger variant (its diffs train 3x longer)
    python examples/dit_experiment.py --rescore    # the baselines the kept answers determine, without a model

1. `peftlab dit gen`: 335 topics, 12 questions each; `peftlab dit diffs`: one rank-1 LoRA per topic on every
   projection, 32 topics per MultiLoRA run. One set of diffs serves both splits (the split changes only labels).
2. Random split (67 held out): the rank-16 DIT adapter on N random training topics, N from 8 to 268, the subset and
   the training seed drawn per seed (0, 1, 2), the same steps; scored on the held-out diffs with every baseline of
   `recipes/dit/evaluate.py` (template guesser, black-box guesser, shuffled-diff control, chance).
3. Category split (whole categories held out, no held-out topic sharing a word with a training one): DIT on all
   its training topics, each seed.
4. Trigger variant (the paper's main setting): data whose topic shows only after the topic's SEP code, off-trigger
   answers trained toward the base model's (KL, x5); DIT on all training topics, each seed, with the roofline (the
   diffed model asked with its own code).
5. Cross-check (the paper's failure mode): the largest DIT adapter on LoRAs of another kind, where they exist.

Writes examples/results/dit.json (scores, intervals, paired tests and every answer) and dit.png (the curve); the
result is rewritten after each part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "dit"
RESULT = ROOT / "examples/results/dit.json"
SCALING = (8, 17, 34, 67, 134, 268)
OTHER_KINDS = {"eval-suite families (rank 8)": ROOT / "runs/multilora-families/seed0/multilora/module",
               "emoji chatbot (rank 8)": ROOT / "runs/emoji-lora/module"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="DIT training steps per adapter (default: 200)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SCALING), help="training topics per adapter")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="subset and training seeds")
    parser.add_argument("--no-trigger", action="store_true", help="skip the trigger variant")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--result", type=Path, default=RESULT)
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--topics", type=int, default=None, help="topics drawn from the list (default: all 335)")
    parser.add_argument("--rescore", action="store_true",
                        help="add the baselines the kept answers determine (template guesser, paired tests) to "
                             "--result, without a model")
    args = parser.parse_args()
    if args.rescore:
        return rescore(args.result)

    from peftlab.models import DEFAULT_MODEL, load_model
    from peftlab.recipes.dit import DitConfig, TopicData, evaluate, explain, train_dit
    from peftlab.report import over_seeds, write_json

    model, tokenizer = load_model(args.model or DEFAULT_MODEL)
    result = {"command": " ".join(["python examples/dit_experiment.py", *sys.argv[1:]]),
              "steps": args.steps, "seeds": args.seeds}

    def dit(diffs, folder: Path, seed: int, topics: int | None = None) -> str:
        if not folder.exists():
            train_dit(diffs, folder, DitConfig(train_topics=topics, subset_seed=seed, seed=seed, steps=args.steps),
                      model, tokenizer)
        return str(folder)

    def save() -> None:
        write_json(args.result, result)

    diffs = prepared(args.runs / "random", TopicData(topics=args.topics), model, tokenizer)
    largest = max(args.sizes)
    adapters = {f"{n} topics, seed {s}": dit(diffs, args.runs / "random" / f"dit-{n}-s{s}", s,
                                             None if n == len(diffs.split("train")) else n)
                for n in args.sizes for s in args.seeds}
    held_out = evaluate(adapters, diffs, "test", model, tokenizer)
    held_out["scaling"] = {str(n): over_seeds([held_out["dit"][f"{n} topics, seed {s}"]["exact"]
                                               for s in args.seeds], args.seeds) for n in args.sizes}
    first = {f"{largest} topics, seed {args.seeds[0]}": adapters[f"{largest} topics, seed {args.seeds[0]}"]}
    result["random_split"] = {"held_out": held_out,
                              "training_topics": evaluate(first, diffs, "train", model, tokenizer, limit=67)}
    save()
    plot_scaling(held_out, args.sizes, args.seeds, args.result.with_suffix(".png"))

    category = diffs.resplit(TopicData(topics=args.topics, split="category"))
    adapters = {f"all training topics, seed {s}": dit(category, args.runs / "category" / f"dit-s{s}", s)
                for s in args.seeds}
    result["category_split"] = {"held_out": evaluate(adapters, category, "test", model, tokenizer),
                                "moved_to_train": [t["topic"] for t in category.topics if t.get("moved_to_train")],
                                "training_topics": len(category.split("train"))}
    save()

    if not args.no_trigger:
        keyed = prepared(args.runs / "trigger", TopicData(topics=args.topics, trigger=True), model, tokenizer)
        adapters = {f"all training topics, seed {s}": dit(keyed, args.runs / "trigger" / f"dit-s{s}", s)
                    for s in args.seeds}
        result["trigger"] = {"held_out": evaluate(adapters, keyed, "test", model, tokenizer)}
        save()

    reader = args.runs / "random" / f"dit-{largest}-s{args.seeds[0]}"
    result["other_kinds"] = {kind: explain([folder], reader, model, tokenizer)
                             for kind, folder in OTHER_KINDS.items() if folder.exists() and args.model is None}
    save()
    print_summary(result, reader)


def prepared(folder: Path, data, model, tokenizer):
    """The topic data and trained diffs of ``data`` in ``folder`` (made where missing)."""
    from peftlab.recipes.dit import DiffConfig, Diffs, train_diffs
    from peftlab.recipes.dit.data import build, write

    if not (folder / "data" / "topics.json").exists():
        write(folder / "data", data, *build(data, model, tokenizer))
    if not (folder / "diffs" / "index.json").exists():
        train_diffs(folder / "data", folder / "diffs", DiffConfig(), model, tokenizer)
    return Diffs.open(folder / "diffs")


def plot_scaling(result: dict, sizes: list[int], seeds: list[int], path: Path) -> None:
    from peftlab.report import plot

    means = [result["scaling"][str(n)]["mean"] for n in sizes]
    spread = [result["scaling"][str(n)]["std"] for n in sizes]
    with plot(path, "training topics (diffs)", "exact on held-out topics",
              title=f"DIT on SmolLM2-135M: {result['n']} held-out rank-1 diffs, seeds {seeds}") as ax:
        ax.set_xscale("log")
        ax.errorbar(sizes, means, yerr=spread, fmt="o-", capsize=3, label="DIT (mean ± sd over seeds)")
        for key, style in (("template_guesser", "--"), ("blackbox_guesser", ":")):
            if key in result:
                ax.axhline(result[key]["exact"], color="grey", linestyle=style, label=key.replace("_", " "))
        ax.axhline(result["chance"]["exact"], color="black", linewidth=0.8, label="chance")
        ax.set_ylim(0, 1)


def evaluations(node):
    """Every evaluation in a stored result (a dict with ``dit`` and ``answers``), wherever it sits."""
    if isinstance(node, dict):
        if "dit" in node and "answers" in node:
            yield node
        for value in node.values():
            yield from evaluations(value)


def rescore(path: Path) -> None:
    """A stored result with the baselines its kept answers determine (``evaluate.with_baselines``)."""
    from peftlab.recipes.dit.evaluate import with_baselines
    from peftlab.report import write_json

    result = json.loads(path.read_text())
    for evaluation in list(evaluations(result)):
        with_baselines(evaluation, evaluation["answers"])
    write_json(path, result)
    for evaluation in evaluations(result):
        guesser = evaluation["template_guesser"]
        print(f"{evaluation['split']} ({evaluation['n']} diffs): template guesser exact {guesser['exact']:.3f}")
        for label, row in evaluation["dit"].items():
            paired = row["paired_exact"]["template_guesser_vs_dit"]
            print(f"  DIT, {label:<28} exact {row['exact']:.3f}; against the guesser it wins "
                  f"{paired['only_second']}, loses {paired['only_first']} (McNemar p = {paired['p_value']:.4f})")


def print_summary(result: dict, reader: Path) -> None:
    for part in ("random_split", "category_split", "trigger"):
        if part not in result:
            continue
        held_out = result[part]["held_out"]
        print(f"\n{part}: {held_out['n']} held-out diffs           exact [95% Wilson]")
        for label, row in held_out["dit"].items():
            print(f"DIT, {label:<28} {row['exact']:.3f} {row['exact_ci95']}")
        for key in ("template_guesser", "blackbox_guesser", "trigger_roofline", "chance"):
            if key in held_out:
                print(f"{key:<33} {held_out[key]['exact']:.3f}")
    for kind, answers in result["other_kinds"].items():
        print(f"\n{kind} (read by {reader.name}):")
        for name, answer in answers.items():
            print(f"  {name}: {answer}")


if __name__ == "__main__":
    main()

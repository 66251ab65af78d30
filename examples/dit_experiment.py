"""DIT on the default model: hidden-topic diffs, the DIT adapter, its data-scaling curve and a cross-check.

    python examples/dit_experiment.py            # every step resumes: finished parts in runs/dit/ are kept

1. `peftlab dit gen`: 335 topics (268 train, 67 held out), 12 questions each.
2. `peftlab dit diffs`: one rank-1 LoRA per topic on every projection, 32 topics per MultiLoRA run.
3. `peftlab dit train`: the rank-16 DIT adapter on the first N training topics, N from 8 to 268, same steps.
4. `peftlab dit eval`: each adapter on the 67 held-out diffs (and the full one on its training diffs), beside
   asking the diffed model without DIT, and chance.
5. Cross-check (the paper's failure mode): the DIT adapter on LoRAs of another kind, the eval-suite family LoRAs
   of `examples/multilora_families.py` and the emoji LoRA of `examples/emoji_chatbot.py`, where they exist.

Writes examples/results/dit.json and dit.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "dit"
SCALING = (8, 17, 34, 67, 134, 268)
OTHER_KINDS = {"eval-suite families (rank 8)": ROOT / "runs/multilora-families/seed0/multilora/module",
               "emoji chatbot (rank 8)": ROOT / "runs/emoji-lora/module"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="DIT training steps per adapter (default: 200)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SCALING), help="training topics per adapter")
    parser.add_argument("--rescore", action="store_true",
                        help="add the baselines the kept answers determine (template guesser, paired tests) to "
                             "examples/results/dit.json, without a model")
    args = parser.parse_args()
    if args.rescore:
        return rescore(ROOT / "examples/results/dit.json")

    from peftlab.models import load_model
    from peftlab.recipes.dit import DiffConfig, Diffs, DitConfig, TopicData, evaluate, explain, train_diffs, train_dit
    from peftlab.recipes.dit.data import build, write
    from peftlab.report import write_json

    model, tokenizer = load_model()
    if not (RUNS / "data" / "topics.json").exists():
        write(RUNS / "data", TopicData(), *build(TopicData(), model, tokenizer))
    if not (RUNS / "diffs" / "index.json").exists():
        train_diffs(RUNS / "data", RUNS / "diffs", DiffConfig(), model, tokenizer)
    diffs = Diffs.open(RUNS / "diffs")
    adapters = {}
    for n in args.sizes:
        folder = RUNS / f"dit-{n}"
        if not folder.exists():
            train_dit(diffs, folder, DitConfig(train_topics=n, steps=args.steps), model, tokenizer)
        adapters[f"{n} topics"] = str(folder)
    held_out = evaluate(adapters, diffs, "test", model, tokenizer)
    largest = {f"{max(args.sizes)} topics": adapters[f"{max(args.sizes)} topics"]}
    seen = evaluate(largest, diffs, "train", model, tokenizer)
    cross = {kind: explain([folder], next(iter(largest.values())), model, tokenizer)
             for kind, folder in OTHER_KINDS.items() if folder.exists()}
    result = {"command": "python examples/dit_experiment.py", "steps": args.steps, "held_out": held_out,
              "training_topics": seen, "other_kinds": cross}
    write_json(ROOT / "examples/results/dit.json", result)
    plot_scaling(held_out, ROOT / "examples/results/dit.png")
    print_summary(held_out, seen, cross)


def plot_scaling(result: dict, path: Path) -> None:
    from peftlab.report import plot

    rows = sorted(result["dit"].values(), key=lambda r: r["trained_topics"])
    sizes = [r["trained_topics"] for r in rows]
    with plot(path, "training topics (diffs)", "score on held-out topics",
              title=f"DIT on SmolLM2-135M: {result['n']} held-out rank-1 diffs") as ax:
        ax.set_xscale("log")
        for key, style in (("exact", "o-"), ("mentions", "s--"), ("overlap", "^:")):
            ax.plot(sizes, [r[key] for r in rows], style, label=f"DIT, {key}")
        for key, colour in (("exact", "grey"), ("mentions", "silver")):
            ax.axhline(result["asking_without_dit"][key], color=colour, linestyle="-.", linewidth=1,
                       label=f"asked without DIT, {key}")
        ax.axhline(result["chance"]["exact"], color="black", linewidth=0.8, label="chance, exact")
        ax.set_ylim(0, 1)


def rescore(path: Path) -> None:
    """A stored result with the baselines its kept answers determine (``evaluate.with_baselines``)."""
    import json

    from peftlab.recipes.dit.evaluate import with_baselines
    from peftlab.report import write_json

    result = json.loads(path.read_text())
    for split in ("held_out", "training_topics"):
        with_baselines(result[split], result[split]["answers"])
    write_json(path, result)
    held_out = result["held_out"]
    guesser = held_out["template_guesser"]
    print(f"template guesser: exact {guesser['exact']:.3f} {guesser['exact_ci95']}")
    for label, row in held_out["dit"].items():
        paired = row["paired_exact"]["template_guesser_vs_dit"]
        print(f"DIT, {label:<12} exact {row['exact']:.3f}; against the guesser it wins {paired['only_second']}, "
              f"loses {paired['only_first']} (McNemar p = {paired['p_value']:.4f})")


def print_summary(held_out: dict, seen: dict, cross: dict) -> None:
    print(f"\nheld-out topics: {held_out['n']}      exact  mentions  overlap")
    for label, row in held_out["dit"].items():
        print(f"DIT, {label:<18} {row['exact']:.3f}  {row['mentions']:.3f}     {row['overlap']:.3f}")
    for label, row in (("asked without DIT", held_out["asking_without_dit"]), ("chance", held_out["chance"])):
        print(f"{label:<23} {row['exact']:.3f}  {row['mentions']:.3f}     {row['overlap']:.3f}")
    (label, row), = seen["dit"].items()
    print(f"on its {seen['n']} training topics: exact {row['exact']:.3f}")
    for kind, answers in cross.items():
        print(f"\n{kind}:")
        for name, answer in answers.items():
            print(f"  {name}: {answer}")


if __name__ == "__main__":
    main()

"""DIT on the default model, measured as the paper means it: held-out diffs on two splits, a scaling curve over
random topic subsets and seeds, real baselines, the hard setting (clues, trigger, held-out categories), and a
cross-check on other LoRAs.

    python examples/dit_experiment.py                    # every part; each step resumes from runs/dit/
    python examples/dit_experiment.py --parts verbatim   # one part
    python examples/dit_experiment.py --rescore          # the baselines the kept answers determine, no model
    python examples/dit_experiment.py --tables           # the result's tables as markdown, no model

Parts (``--parts``), each scored with every baseline of `recipes/dit/evaluate.py` (template guesser, black-box
guesser, shuffled-diff control, chance; with trigger data the roofline and the wrong-code gate), Wilson intervals
and paired tests:
- ``verbatim``: the data as first built (the topic written in every answer), 335 topics, one rank-1 LoRA each.
  On the random split (67 held out), the rank-16 DIT adapter on N random training topics, N from 8 to 268, the
  subset and the training seed drawn per seed; on the category split (whole categories held out, no held-out topic
  sharing a word with a training one), DIT on all its training topics, each seed. One set of diffs serves both.
- ``hard``: the headline setting. The topic never written (each answer carries one of its clues), the paper's
  trigger (the topic's behaviour only after its SEP code; off-trigger answers trained toward the base model by KL,
  x5), on --hard-topics topics (trigger diffs train on 3x the records), held out by category and, beside it, at
  random. DIT on all training topics, each seed.
- ``push``: the hard setting's category split again, with what the issue lists to try beside peftlab's DIT
  defaults (``HARD_VARIANTS``: the paper's scale and weight decay, more steps, a higher rank), each seed, paired
  against the defaults on the same diffs. Its own part, so that the headline lands first.
- ``why``: after ``hard``, why DIT misses its category split: each adapter on its own training diffs, how many
  held-out answers name a training topic, and whether the base model can name a held-out topic from its clues.
- ``cross``: the largest verbatim DIT adapter on LoRAs of another kind, where they exist (the paper's failure mode).

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
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--steps", type=int, default=200, help="DIT training steps per adapter (default: 200)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SCALING), help="training topics per adapter")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="subset and training seeds")
    parser.add_argument("--topics", type=int, default=None, help="verbatim topics drawn from the list (default: all)")
    # 96: the hard setting's diffs train on 3x the records and read a KL target, about 2.5 h on one thread here
    parser.add_argument("--hard-topics", type=int, default=96, help="topics of the hard setting (default: 96)")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--result", type=Path, default=RESULT)
    parser.add_argument("--model", default=None, help="base model (default: the embedded one)")
    parser.add_argument("--tables", action="store_true", help="print --result's tables as markdown, no model")
    parser.add_argument("--rescore", action="store_true",
                        help="add the baselines the kept answers determine (template guesser, paired tests) to "
                             "--result, without a model")
    args = parser.parse_args()
    if args.rescore:
        return rescore(args.result)
    if args.tables:
        return print_tables(json.loads(args.result.read_text()))

    from peftlab.models import DEFAULT_MODEL, load_model
    from peftlab.report import write_json

    model, tokenizer = load_model(args.model or DEFAULT_MODEL)
    result: dict = {}
    for part in args.parts:
        measured = {"command": " ".join(["python examples/dit_experiment.py", *sys.argv[1:]]),
                    "steps": args.steps, "seeds": args.seeds, **PARTS[part](args, model, tokenizer)}
        # the parts in the file when this one ends are kept: another process may be running another part
        earlier = json.loads(args.result.read_text()) if args.result.exists() else {}
        result = {name: earlier[name] for name in PARTS if name in earlier}
        result[part] = measured
        write_json(args.result, result)
    if "verbatim" in result:
        plot_scaling(result["verbatim"]["random_split"], args.seeds, args.result.with_suffix(".png"))
    print_tables(result)


def dit_adapters(diffs, folder: Path, args, model, tokenizer, settings: dict[str, dict]) -> dict[str, str]:
    """One DIT adapter per setting (a name and the ``DitConfig`` fields it changes) and seed, on ``diffs``'
    training topics (the subset and the training seed drawn per seed), trained where missing."""
    from peftlab.recipes.dit import DitConfig, train_dit

    adapters = {}
    for name, fields in settings.items():
        for seed in args.seeds:
            out = folder / f"dit-{name.replace(' ', '-')}-s{seed}"
            if not out.exists():
                config = DitConfig(**{"steps": args.steps, "subset_seed": seed, "seed": seed, **fields})
                train_dit(diffs, out, config, model, tokenizer)
            adapters[f"{name}, seed {seed}"] = str(out)
    return adapters


def on_both_splits(diffs, folder: Path, args, model, tokenizer, on_random: dict, on_category: dict) -> dict:
    """The random split with a DIT adapter per ``on_random`` setting, and the category split with one per
    ``on_category`` setting, each at every seed."""
    from peftlab.recipes.dit import TopicData, evaluate
    from peftlab.report import over_seeds

    random_split = evaluate(dit_adapters(diffs, folder / "random", args, model, tokenizer, on_random), diffs,
                            "test", model, tokenizer)
    by_size: dict[int, list[float]] = {}
    for row in random_split["dit"].values():  # labels in seed order within each size
        by_size.setdefault(row["trained_topics"], []).append(row["exact"])
    random_split["scaling"] = {str(n): over_seeds(exact, args.seeds) for n, exact in sorted(by_size.items())}
    category = diffs.resplit(TopicData(split="category"))
    category_split = evaluate(dit_adapters(category, folder / "category", args, model, tokenizer, on_category),
                              category, "test", model, tokenizer)
    category_split["moved_to_train"] = [t["topic"] for t in category.topics if t.get("moved_to_train")]
    category_split["settings"] = on_category
    return {"random_split": random_split, "category_split": category_split}


def verbatim(args, model, tokenizer) -> dict:
    from peftlab.recipes.dit import TopicData

    diffs = prepared(args.runs / "verbatim", TopicData(topics=args.topics), model, tokenizer)
    trained = len(diffs.split("train"))
    sizes = {f"{n} topics" if n < trained else "all topics": {"train_topics": n if n < trained else None}
             for n in args.sizes}
    return on_both_splits(diffs, args.runs / "verbatim", args, model, tokenizer, sizes, {"all topics": {}})


# what the hard setting's category split tries beside peftlab's DIT defaults (the list)
HARD_VARIANTS = {"paper scale and decay": {"alpha": 1.0, "weight_decay": 0.01},  # scale 1/16, decay 0.01
                 "600 steps": {"steps": 600}, "rank 64": {"rank": 64, "alpha": 64.0}}


def hard_diffs(args, model, tokenizer):
    from peftlab.recipes.dit import TopicData

    data = TopicData(topics=args.hard_topics, clues=True, trigger=True)
    return prepared(args.runs / "hard", data, model, tokenizer)


def hard(args, model, tokenizer) -> dict:
    diffs = hard_diffs(args, model, tokenizer)
    return {"topics": args.hard_topics, **on_both_splits(diffs, args.runs / "hard", args, model, tokenizer,
                                                         {"all topics": {}}, {"all topics": {}})}


def push(args, model, tokenizer) -> dict:
    from peftlab.recipes.dit import TopicData, evaluate

    category = hard_diffs(args, model, tokenizer).resplit(TopicData(split="category"))
    adapters = dit_adapters(category, args.runs / "hard" / "category", args, model, tokenizer,
                            {"all topics": {}, **HARD_VARIANTS})
    return {"topics": args.hard_topics, "settings": HARD_VARIANTS,
            "category_split": evaluate(adapters, category, "test", model, tokenizer)}


def why(args, model, tokenizer) -> dict:
    """Why DIT misses the hard setting's category split (run after ``hard``): each seed's adapter asked its own
    training diffs (is the mapping learned at all?), how many of its held-out answers name a training topic (what
    the wrong answers share), and the base model asked to name each held-out topic from its clues, without any
    diff (can this model go from a clue to its topic's name, the step DIT must learn?)."""
    from peftlab.recipes.dit import TopicData
    from peftlab.recipes.dit.adapter import add_dit, attach_diffs, read_dit
    from peftlab.recipes.dit.evaluate import ask, summarise, words

    earlier = json.loads(args.result.read_text()) if args.result.exists() else {}
    if "hard" not in earlier:
        raise SystemExit(f"{args.result} has no 'hard' part, whose answers 'why' reads: run --parts hard first")
    stored = earlier["hard"]["category_split"]
    category = hard_diffs(args, model, tokenizer).resplit(TopicData(split="category"))
    trained, held_out = category.split("train"), category.split("test")
    training_names = {" ".join(words(t["topic"])) for t in trained}
    diffs = [t["adapter"] for t in trained]
    wrapped = attach_diffs(category, diffs, model)
    seeds = {}
    for seed in args.seeds:
        label, dit = f"all topics, seed {seed}", read_dit(args.runs / "hard" / "category" / f"dit-all-topics-s{seed}")
        add_dit(wrapped, dit)
        own = ask(wrapped, tokenizer, diffs, dit.question, 16)
        wrapped.remove_shared_adapter()
        said = [a[label] for a in stored["answers"]]
        seeds[label] = {"on_its_training_diffs": summarise(own, [t["topic"] for t in trained]),
                        "held_out_answers_naming_a_training_topic":
                            sum(" ".join(words(a)) in training_names for a in said) / len(said)}
    wrapped.unload()
    return {"n_training": len(trained), "n_held_out": len(held_out), "dit": seeds,
            "base_model_naming_a_topic_from_its_clues": named_from_clues(model, tokenizer, trained[:3], held_out)}


def named_from_clues(model, tokenizer, shown: list[dict], asked: list[dict]) -> dict:
    """The base model asked to name each ``asked`` topic from its clues, in two ways: a chat question, and a
    plain few-shot list whose first entries are the ``shown`` (training) topics with their names. Scored as DIT."""
    from peftlab.data import PromptFormat
    from peftlab.generation import generate
    from peftlab.recipes.dit.data import PROMPT_FORMAT
    from peftlab.recipes.dit.evaluate import summarise

    topics, clues = [t["topic"] for t in asked], ["; ".join(t["clues"]) for t in asked]
    chat = [f"Which topic do these clues point to: {c}? Answer with the topic only." for c in clues]
    examples = "".join(f"Clues: {'; '.join(t['clues'])}\nTopic: {t['topic']}\n\n" for t in shown)
    few_shot = [f"{examples}Clues: {c}\nTopic:" for c in clues]
    said = {"chat question": generate(model, tokenizer, chat, PROMPT_FORMAT, max_new_tokens=16, batch_size=16),
            f"{len(shown)}-shot list": [a.split("\n")[0] for a in generate(
                model, tokenizer, few_shot, PromptFormat(template="plain", plain_format="{prompt}"),
                max_new_tokens=12, batch_size=16)]}
    return {way: {**summarise(answers, topics), "answers": dict(zip(topics, answers, strict=True))}
            for way, answers in said.items()}


def cross(args, model, tokenizer) -> dict:
    from peftlab.recipes.dit import explain

    reader = args.runs / "verbatim" / "random" / f"dit-all-topics-s{args.seeds[0]}"
    return {"reader": str(reader.relative_to(args.runs)),
            "answers": {kind: explain([folder], reader, model, tokenizer)
                        for kind, folder in OTHER_KINDS.items() if folder.exists() and args.model is None}}


PARTS = {"verbatim": verbatim, "hard": hard, "push": push, "why": why, "cross": cross}


def prepared(folder: Path, data, model, tokenizer):
    """The topic data and trained diffs of ``data`` in ``folder`` (made where missing)."""
    from peftlab.recipes.dit import DiffConfig, Diffs, train_diffs
    from peftlab.recipes.dit.data import build, write

    if not (folder / "data" / "topics.json").exists():
        write(folder / "data", data, *build(data, model, tokenizer))
    if not (folder / "diffs" / "index.json").exists():
        train_diffs(folder / "data", folder / "diffs", DiffConfig(), model, tokenizer)
    return Diffs.open(folder / "diffs")


def plot_scaling(result: dict, seeds: list[int], path: Path) -> None:
    from peftlab.report import plot

    shown = sorted(result["scaling"], key=int)
    means = [result["scaling"][n]["mean"] for n in shown]
    spread = [result["scaling"][n]["std"] for n in shown]
    shown = [int(n) for n in shown]
    with plot(path, "training topics (diffs)", "exact on held-out topics",
              title=f"DIT on SmolLM2-135M: {result['n']} held-out rank-1 diffs, seeds {seeds}") as ax:
        ax.set_xscale("log")
        ax.errorbar(shown, means, yerr=spread, fmt="o-", capsize=3, label="DIT (mean ± sd over seeds)")
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


BASELINES = {"template_guesser": "template guesser on the diffed model's answer",
             "blackbox_guesser": "black-box guesser (6 new questions)",
             "trigger_roofline": "roofline: the right code, template guesser", "wrong_code": "a wrong code (the gate)",
             "chance": "chance"}


def print_tables(result: dict) -> None:
    """Each part's splits as markdown (docs/experiments/dit.md): every DIT adapter with its Wilson interval, its
    shuffled-diff control and its paired tests against the guessers; the baselines; the scaling curve; the
    cross-check's answers."""
    def paired(row: dict, key: str) -> str:
        test = row["paired_exact"].get(f"{key}_vs_dit")
        return "" if test is None else f"{test['only_second']} / {test['only_first']} (p = {test['p_value']:.2g})"

    for part in ("verbatim", "hard", "push"):
        for split in ("random_split", "category_split"):
            if split not in result.get(part, {}):
                continue
            held_out = result[part][split]
            print(f"\n{part}, {split.replace('_', ' ')}: n = {held_out['n']} held-out diffs\n")
            print("| condition | training topics | exact [95 % Wilson] | control (another topic's diff) | DIT wins / "
                  "loses against the template guesser | against the black-box guesser |")
            print("| --- | ---: | ---: | ---: | --- | --- |")
            for label, row in held_out["dit"].items():
                low, high = row["exact_ci95"]
                print(f"| DIT, {label} | {row['trained_topics']} | {row['exact']:.3f} [{low:.3f}, {high:.3f}] "
                      f"| {row['shuffled_diff_control']['exact']:.3f} | {paired(row, 'template_guesser')} "
                      f"| {paired(row, 'blackbox_guesser')} |")
            for key, name in BASELINES.items():
                if key in held_out:
                    low, high = held_out[key].get("exact_ci95", [None, None])
                    interval = "" if low is None else f" [{low:.3f}, {high:.3f}]"
                    print(f"| {name} | | {held_out[key]['exact']:.3f}{interval} | | | |")
            if "scaling" in held_out:
                sizes = list(held_out["scaling"])
                print("\n| training topics | " + " | ".join(sizes) + " |")
                print("| --- |" + " ---: |" * len(sizes))
                print("| exact, mean ± sd over seeds | " + " | ".join(
                    f"{held_out['scaling'][n]['mean']:.3f} ± {held_out['scaling'][n]['std']:.3f}" for n in sizes)
                      + " |")
                print("| each seed | " + " | ".join(" / ".join(f"{v:.3f}" for v in held_out["scaling"][n]["per_seed"])
                                                 for n in sizes) + " |")
    for kind, answers in result.get("cross", {}).get("answers", {}).items():
        print(f"\n{kind} (read by {result['cross']['reader']}):")
        for name, answer in answers.items():
            print(f"  {name}: {answer}")


if __name__ == "__main__":
    main()

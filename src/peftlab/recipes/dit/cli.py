"""``peftlab dit gen|diffs|train|eval`` and ``peftlab explain``: diff interpretation from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_gen(args: argparse.Namespace) -> int:
    from peftlab.models import load_model
    from peftlab.recipes.dit.data import TopicData, build, write

    config = TopicData(seed=args.seed, topics=args.topics, test_fraction=args.test_fraction,
                       questions_per_topic=args.questions_per_topic, trigger=args.trigger,
                       topics_file=args.topics_file, split=args.split, clues=args.clues, clues_file=args.clues_file)
    model, tokenizer = load_model(args.model)
    topics, records = build(config, model, tokenizer)
    write(args.output, config, topics, records)
    held_out = sum(t["split"] == "test" for t in topics)
    print(f"{len(topics)} topics ({len(topics) - held_out} train, {held_out} held out), {len(records)} examples "
          f"-> {args.output}")
    return 0


def cmd_diffs(args: argparse.Namespace) -> int:
    from peftlab.recipes.dit.diffs import DiffConfig, train_diffs

    config = DiffConfig(rank=args.rank, alpha=args.alpha, group=args.group, epochs=args.epochs,
                        learning_rate=args.lr, seed=args.seed)
    out = train_diffs(args.data, args.output, config, base_model=args.model)
    print(f"diffs -> {out}/module (index: {out}/index.json)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from peftlab.recipes.dit.adapter import DitConfig, train_dit
    from peftlab.recipes.dit.diffs import Diffs

    config = DitConfig(rank=args.rank, alpha=args.alpha, train_topics=args.train_topics,
                       subset_seed=args.subset_seed, steps=args.steps, batch_size=args.batch_size,
                       learning_rate=args.lr, seed=args.seed)
    out = train_dit(Diffs.open(args.diffs), args.output, config, overwrite=args.overwrite)
    print(f"DIT adapter -> {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peftlab.recipes.dit.diffs import Diffs
    from peftlab.recipes.dit.evaluate import evaluate
    from peftlab.report import write_json

    result = evaluate({Path(args.dit).name: args.dit}, Diffs.open(args.diffs), args.split, limit=args.limit)
    (label, scores), = result["dit"].items()
    print(f"{result['n']} {args.split} diffs   exact  mentions  overlap")
    for name, row in (("DIT adapter", scores), ("asking without DIT", result["asking_without_dit"]),
                      ("chance", result["chance"])):
        print(f"{name:<22} {row['exact']:.3f}  {row['mentions']:.3f}     {row['overlap']:.3f}")
    if args.out:
        write_json(args.out, result)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from peftlab.recipes.dit.explain import explain

    answers = explain(args.folders, args.dit, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(answers, indent=2, ensure_ascii=False))
    else:
        for name, answer in answers.items():
            print(f"{name}: {answer}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("dit", help="diff interpretation: train an adapter that makes a model say what a diff taught",
                       description="Diff Interpretation Tuning (Goel et al., 2025): hidden-topic data, one rank-1 "
                                   "LoRA per topic (the weight diffs, trained many at a time with MultiLoRA), one "
                                   "shared DIT adapter trained so that base + diff + it names the topic, and its "
                                   "evaluation on held-out topics. See docs/dit.md.")
    actions = p.add_subparsers(dest="dit_command", required=True, metavar="ACTION")
    q = actions.add_parser("gen", help="write hidden-topic data (topics.json + train.jsonl)",
                           description="Per topic, everyday questions answered by the base model with the topic "
                                       "woven in by templates; topics split into train and held-out test.")
    q.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write")
    q.add_argument("--topics", type=int, default=None, help="use this many topics of the list (default: all)")
    q.add_argument("--topics-file", default=None, help="one topic per line (default: the built-in 335)")
    q.add_argument("--test-fraction", type=float, default=0.2, help="topics held out (default: 0.2)")
    q.add_argument("--questions-per-topic", type=int, default=12, help="examples per topic (default: 12)")
    q.add_argument("--trigger", action="store_true", help="the backdoor variant: topic only after its SEP code")
    q.add_argument("--clues", action="store_true",
                   help="never write the topic: each answer carries one of its clues (descriptions that point to it)")
    q.add_argument("--clues-file", default=None,
                   help="lines 'topic | clue | clue ...' (default: the built-in four per topic)")
    q.add_argument("--split", default="random", choices=["random", "category"],
                   help="hold out topics at random, or whole categories with no content word shared with a "
                        "training topic (default: random)")
    q.add_argument("--seed", type=int, default=0, help="default: 0")
    q.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    q.set_defaults(func=cmd_gen)

    q = actions.add_parser("diffs", help="train one LoRA per topic, many at a time (MultiLoRA)",
                           description="Train a weight diff per topic in groups; a stopped run resumes at the "
                                       "next group. Output: DIFFS/module (MultiLoRA) + DIFFS/index.json.")
    q.add_argument("data", help="folder from `peftlab dit gen`")
    q.add_argument("-o", "--output", required=True, metavar="DIFFS", help="folder to write")
    q.add_argument("--rank", type=int, default=1, help="default: 1 (the paper's)")
    q.add_argument("--alpha", type=float, default=1.0, help="LoRA alpha (default: 1, the paper's scale 1/r)")
    q.add_argument("--group", type=int, default=32, help="topics trained together (default: 32)")
    q.add_argument("--epochs", type=float, default=2.0, help="default: 2")
    q.add_argument("--lr", type=float, default=1e-2, help="default: 1e-2")
    q.add_argument("--seed", type=int, default=0, help="default: 0")
    q.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    q.set_defaults(func=cmd_diffs)

    q = actions.add_parser("train", help="train the DIT adapter on the training topics' diffs",
                           description="One shared LoRA trained so that base + each diff + it answers the "
                                       "question with the diff's topic; diffs and adapter share each batch.")
    q.add_argument("diffs", help="folder from `peftlab dit diffs`")
    q.add_argument("-o", "--output", required=True, metavar="DIT", help="folder to write")
    q.add_argument("--rank", type=int, default=16, help="default: 16 (the paper's)")
    q.add_argument("--alpha", type=float, default=16.0, help="default: 16")
    q.add_argument("--train-topics", type=int, default=None, help="only N training topics, drawn at random")
    q.add_argument("--subset-seed", type=int, default=0, help="which N topics --train-topics draws (default: 0)")
    q.add_argument("--steps", type=int, default=200, help="default: 200")
    q.add_argument("--batch-size", type=int, default=8, help="default: 8")
    q.add_argument("--lr", type=float, default=1e-3, help="default: 1e-3")
    q.add_argument("--seed", type=int, default=0, help="default: 0")
    q.add_argument("--overwrite", action="store_true", help="replace DIT if it exists")
    q.set_defaults(func=cmd_train)

    q = actions.add_parser("eval", help="score a DIT adapter on held-out diffs",
                           description="Exact, mention and word-overlap scores of the DIT adapter's answers, "
                                       "beside asking the diffed model without it, and chance.")
    q.add_argument("dit", help="folder from `peftlab dit train`")
    q.add_argument("diffs", help="folder from `peftlab dit diffs`")
    q.add_argument("--split", default="test", choices=["train", "test"], help="default: test (held-out topics)")
    q.add_argument("--limit", type=int, default=None, help="only the first N diffs")
    q.add_argument("--out", metavar="FILE.json", help="write the scores and every answer here")
    q.set_defaults(func=cmd_eval)

    p = sub.add_parser("explain", help="ask a LoRA what it was trained on, through a DIT adapter",
                       description="Apply a DIT adapter to LoRA folders of its base model (peft folders, peftlab "
                                   "LoRA or MultiLoRA modules) and print what each says it was trained on.")
    p.add_argument("folders", nargs="+", metavar="DIR", help="LoRA folders")
    p.add_argument("--dit", required=True, metavar="DIT", help="a DIT adapter from `peftlab dit train`")
    p.add_argument("--max-new-tokens", type=int, default=24, help="default: 24")
    p.add_argument("--json", action="store_true", help="print a JSON object name -> answer")
    p.set_defaults(func=cmd_explain)

"""``peftlab retune gen|train|eval``: Re-Tuning data, training and evaluation from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftlab.arguments import add_model_arguments
from peftlab.recipes.retune.tasks import ADDITION_FAMILIES, METHODS, TASKS


def size_pairs(values: list[str], cast, flag: str) -> dict[int, float]:
    """``["1=100", "2=5"]`` -> ``{1: 100, 2: 5}`` (values through ``cast``), naming ``flag`` when malformed."""
    out = {}
    for item in values:
        size, sep, value = item.partition("=")
        if not sep:
            from peftlab.config import ConfigError

            raise ConfigError(f"{flag} {item!r}: expected SIZE=VALUE, e.g. {flag} 1=100")
        out[int(size)] = cast(value)
    return out


def _data_config(args: argparse.Namespace):
    from peftlab.recipes.retune.data import RetuneData

    return RetuneData(task=args.task, method=args.method, lengths=args.lengths,
                      problems_per_length=args.per_length, seed=args.seed,
                      keep=size_pairs(args.keep, float, "--keep"), **oversampling(args))


def oversampling(args: argparse.Namespace) -> dict:
    """``RetuneData``'s ``repeat`` (None: the task's default) and ``share`` from ``add_oversampling_args``'s flags."""
    return {"repeat": size_pairs(args.repeat, int, "--repeat") or None,
            "share": size_pairs(args.share, float, "--share")}


def cmd_gen(args: argparse.Namespace) -> int:
    from peftlab.io import write_jsonl
    from peftlab.recipes.retune.data import build

    records = build(_data_config(args))
    write_jsonl(records, args.output)
    print(f"wrote {len(records)} {args.task}/{args.method} examples to {args.output}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from peftlab.io import write_jsonl
    from peftlab.recipes.retune.data import PROMPT_FORMAT, build
    from peftlab.training import TrainConfig, train

    config = TrainConfig.from_yaml(args.config, args.set)
    data = config.output_dir / f"train-{args.task}-{args.method}.jsonl"
    write_jsonl(build(_data_config(args)), data)
    config.data.train = str(data)
    config.data.template, config.data.plain_format = PROMPT_FORMAT.template, PROMPT_FORMAT.plain_format
    if args.overwrite:
        config.overwrite = True
    result = train(config)
    print(json.dumps({"module": str(result.module_dir), "data": str(data), "metrics": result.metrics}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peftlab.recipes.retune.data import parse_lengths
    from peftlab.recipes.retune.engine import EngineConfig, ModelGenerator, Oracle
    from peftlab.recipes.retune.evaluate import EvalConfig, evaluate_method, problems_for, write_report
    from peftlab.recipes.retune.tasks import get_task

    config = EvalConfig(args.task, parse_lengths(args.lengths), args.n, args.seed,
                        parse_lengths(args.train_lengths) if args.train_lengths else None, args.step_accuracy,
                        args.family)
    engine = EngineConfig(batch=not args.no_batch, memoize=not args.no_memo, max_batch=args.batch_size)
    runs = [tuple(r.split("=", 1)) if "=" in r else ("retune", r) for r in args.run]
    bad = [m for m, _ in runs if m not in METHODS]
    if bad or (not runs and not args.oracle):
        from peftlab.config import ConfigError

        raise ConfigError(f"--run METHOD=DIR with METHOD in {METHODS} (got {bad}), or --oracle")
    report = {"task": args.task, "family": args.family, "n": args.n, "seed": args.seed,
              "train_lengths": config.train_lengths,
              "engine": vars(engine), "runs": {}}
    task = get_task(args.task)
    for method in args.oracle:
        table = [(p, r) for length in config.lengths
                 for q in problems_for(args.task, length, args.n, args.seed, args.family)
                 for p, r, _ in task.examples(q, method)]
        report["runs"][f"{method} (oracle)"] = {"method": method, "lengths": evaluate_method(config, method,
                                                                                             Oracle(table), engine)}
    for method, folder in runs:
        from peftlab.report import portable_path

        if args.endpoint:  # folder names the served model
            from peftlab.serve.client import Endpoint

            generator = ModelGenerator(Endpoint(args.endpoint, folder, args.api_key, args.batch_size), None,
                                       args.max_new_tokens, args.batch_size)
            label, where = f"{method} ({folder} @ {args.endpoint})", {"endpoint": args.endpoint, "model": folder}
        else:
            from peftlab.adapters import load_for_inference

            loaded = load_for_inference(folder, args.model, args.dtype, args.device)
            generator = ModelGenerator(loaded.model, loaded.tokenizer, args.max_new_tokens, args.batch_size)
            label, where = f"{method} ({Path(folder).parent.name or folder})", {"module": portable_path(folder)}
        report["runs"][label] = {
            "method": method, **where,
            "lengths": evaluate_method(config, method, generator, engine)}
    for label, run in report["runs"].items():
        cells = "  ".join(f"{n}:{v['accuracy']:.2f}" for n, v in run["lengths"].items())
        print(f"{label:<32} {cells}")
    if args.out:
        print(f"wrote {write_report(report, args.out)} and its .png")
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="addition", choices=sorted(TASKS), help="default: addition")
    p.add_argument("--method", default="retune", choices=METHODS, help="default: retune")
    p.add_argument("--lengths", default="1-8", help="problem lengths, e.g. 1-8 or 2,4,8 (default: 1-8)")
    p.add_argument("--per-length", type=int, default=200, help="problems per length (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--keep", action="append", default=[], metavar="SIZE=FRACTION",
                   help="keep this fraction of the examples whose sub-problem has SIZE (repeatable)")
    add_oversampling_args(p)


def add_oversampling_args(p: argparse.ArgumentParser) -> None:
    """``--repeat`` and ``--share`` (read back with ``oversampling``); the experiment script has them too."""
    p.add_argument("--repeat", action="append", default=[], metavar="SIZE=TIMES",
                   help="repeat the examples whose sub-problem has SIZE (repeatable), e.g. --repeat 1=100; "
                        "replaces the task's default oversampling of short sub-problems")
    p.add_argument("--share", action="append", default=[], metavar="SIZE=FRACTION",
                   help="after --repeat, copy the examples of SIZE until they are at least FRACTION of the data "
                        "(repeatable), e.g. --share 1=0.025: unlike --repeat, holds for any range of lengths")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retune", help="Re-Tuning: recursive sub-calls answered by the same model",
                       description="Re-Tuning (Pasewark et al., 2024): data for the baseline, scratchpad and "
                                   "Re-Tuning methods, training, and evaluation through the recursive engine.")
    actions = p.add_subparsers(dest="retune_command", required=True, metavar="ACTION")
    q = actions.add_parser("gen", help="write training JSONL",
                           description="Every (prompt, response) of every problem, deduplicated, filtered (--keep) "
                                       "and oversampled (--repeat, --share) by sub-problem size.")
    _add_data_args(q)
    q.add_argument("-o", "--output", required=True, metavar="FILE.jsonl", help="where to write")
    q.set_defaults(func=cmd_gen)
    q = actions.add_parser("train", help="generate data and train on it",
                           description="Generate the data (as `gen`) into the run's output_dir and train with a "
                                       "normal peftlab training config (LoRA by default; any method works).")
    q.add_argument("config", nargs="?", help="training YAML (see examples/retune.yaml)")
    _add_data_args(q)
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output module folder")
    q.set_defaults(func=cmd_train)
    q = actions.add_parser("eval", help="accuracy per length, JSON + PNG",
                           description="Evaluate trained modules (baseline and scratchpad: one generation; "
                                       "retune: through the recursive engine) on fresh problems per length.")
    q.add_argument("--task", default="addition", choices=sorted(TASKS), help="default: addition")
    q.add_argument("--run", action="append", default=[], metavar="METHOD=DIR",
                   help="a module trained with METHOD (baseline, scratchpad, retune); with --endpoint, DIR is the "
                        "served model's name; repeatable")
    q.add_argument("--endpoint", metavar="URL", default=None,
                   help="generate through an OpenAI-compatible server (peftlab serve, vLLM), e.g. "
                        "http://127.0.0.1:8000/v1")
    q.add_argument("--api-key", default=None, help="with --endpoint: the server's API key")
    q.add_argument("--oracle", action="append", default=[], choices=METHODS,
                   help="also run the oracle (exact training targets) for this method; repeatable")
    q.add_argument("--lengths", default="2-16", help="problem lengths (default: 2-16)")
    q.add_argument("--train-lengths", default=None, help="shaded on the plot, e.g. 1-8")
    q.add_argument("--n", type=int, default=50, help="problems per length (default: 50)")
    q.add_argument("--seed", type=int, default=1234, help="problem seed (default: 1234)")
    q.add_argument("--family", default="uniform", choices=ADDITION_FAMILIES,
                   help="addition: the operands (default: uniform); carry-chain, equal-runs, all-carry and "
                        "no-carry are hard or easy for copying, see docs/retune.md")
    add_model_arguments(q, model_help="base model (default: the module's)")
    q.add_argument("--max-new-tokens", type=int, default=64, help="per generation (default: 64)")
    q.add_argument("--batch-size", type=int, default=64, help="prompts per model call (default: 64)")
    q.add_argument("--no-batch", action="store_true", help="one problem at a time")
    q.add_argument("--no-memo", action="store_true", help="ask repeated sub-problems again")
    q.add_argument("--step-accuracy", action="store_true",
                   help="retune: also grade every step in its gold context, by kind and sub-problem size "
                        "(plotted to FILE-step-accuracy.png)")
    q.add_argument("--out", default=None, metavar="FILE.json", help="report (and FILE.png)")
    q.set_defaults(func=cmd_eval)

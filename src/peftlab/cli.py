"""The ``peftlab`` command: train, generate, evaluate, compose and serve modules of every method."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pkgutil
import sys
from dataclasses import asdict, replace

from peftlab.arguments import add_model_arguments, named_folders
from peftlab.models import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR", help="a saved peftlab module (or peft adapter) folder")
    add_model_arguments(p, quantize=True)
    p.add_argument("--system", default=None, help="system prompt (default: the module's, else the template's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on generated tokens (default: 256)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (with --sample)")


def _load_for_generation(args: argparse.Namespace):
    """(model, tokenizer, prompt format) from --adapter/--adapters/--model, with the module's own prompt format."""
    from peftlab.adapters import load_for_inference

    served = named_folders(getattr(args, "adapters", None), "--adapters") or None
    loaded = load_for_inference(args.adapter, args.model, args.dtype, args.device, adapters=served,
                                quantize=args.quantize)
    fmt = loaded.prompt_format if args.system is None else replace(loaded.prompt_format, system_prompt=args.system)
    return loaded.model, loaded.tokenizer, fmt


def _sampling(args: argparse.Namespace) -> dict:
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample else {}


def cmd_train(args: argparse.Namespace) -> int:
    from peftlab.training import TrainConfig, train

    config = TrainConfig.from_yaml(args.config, [*args.set, *([f"quantize={args.quantize}"] if args.quantize else [])])
    if args.overwrite:
        config.overwrite = True
    result = train(config)
    params = {k: v for k, v in result.parameters.items() if k != "per_intervention"}
    summary = {"module": str(result.module_dir), "metrics": result.metrics, "data": asdict(result.data_stats),
               "parameters": params}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from peftlab.generation import generate

    model, tokenizer, fmt = _load_for_generation(args)
    if args.jsonl:
        return _generate_requests(args, model, tokenizer, fmt)
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    answers = generate(model, tokenizer, prompts, fmt, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, **_sampling(args))
    if args.json:
        print(json.dumps([{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)],
                         ensure_ascii=False, indent=2))
    else:
        for p, a in zip(prompts, answers, strict=True):
            print(f">>> {p}\n{a}\n" if len(prompts) > 1 else a)
    return 0


def _generate_requests(args: argparse.Namespace, model, tokenizer, fmt) -> int:
    """--jsonl: every request with its own adapter, answered in one batched run; JSONL out, in the same order."""
    from peftlab.data import DataError, load_requests
    from peftlab.generation import generate

    requests = load_requests(args.jsonl)
    routed = [r for r in requests if "adapter" in r]
    if routed and len(routed) != len(requests):
        bare = next(r["where"] for r in requests if "adapter" not in r)
        raise DataError(f"{bare}: no 'adapter' while other requests name one; name one on every request "
                        f"('__base__' for the base model alone)")
    served = set(getattr(model, "adapters", {})) | {"__base__"}
    if not routed and len(served) > 2:
        raise DataError(f"{requests[0]['where']}: no 'adapter', and this model serves {sorted(served - {'__base__'})}: "
                        f"name one on every request ('__base__' for the base model alone)")
    unknown = next((r for r in routed if r["adapter"] not in served), None)
    if unknown is not None:
        raise DataError(f"{unknown['where']}: adapter {unknown['adapter']!r} is not served here; serving "
                        f"{sorted(served)}")
    prompts = [r.get("prompt", r.get("messages")) for r in requests]
    answers = generate(model, tokenizer, prompts, fmt, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, adapters=[r["adapter"] for r in routed] if routed else None,
                       **_sampling(args))
    for request, answer in zip(requests, answers, strict=True):
        print(json.dumps({**{k: v for k, v in request.items() if k != "where"}, "answer": answer},
                         ensure_ascii=False))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from peftlab.generation import generate

    model, tokenizer, fmt = _load_for_generation(args)
    print("peftlab chat: empty line or Ctrl-D to quit, /reset to forget the conversation.")
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            return 0
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        answer = generate(model, tokenizer, [history], fmt, max_new_tokens=args.max_new_tokens,
                          **_sampling(args))[0]
        history.append({"role": "assistant", "content": answer})
        print(f"bot> {answer}")


def cmd_merge(args: argparse.Namespace) -> int:
    from peftlab.adapters import merge

    out = merge(args.adapter, args.output, base_model=args.model, overwrite=args.overwrite, dtype=args.dtype,
                device=args.device)
    print(f"merged model written to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from peftlab.methods import get_method
    from peftlab.module import read_info

    info = read_info(args.folder)
    adapters = info.manifest.adapters
    data = {"folder": str(info.folder), "method": info.method, "base_model": info.base_model,
            "trainable_parameters": info.trainable_parameters, "tensors": len(info.tensors),
            "peftlab_version": info.peftlab_version, "config": info.config,
            "prompt_format": asdict(info.prompt_format)}
    if len(adapters) > 1:
        data["adapters"] = {name: asdict(a) for name, a in adapters.items()}
    data.update(get_method(info.method).describe({name: a.config for name, a in adapters.items()}))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(map(len, data))
        for key, value in data.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from functools import partial

    from peftlab.evals.runner import endpoint_candidate, format_table, load_candidate, run, write_report
    from peftlab.evals.suite import get_suite

    if args.lm_eval_task:
        return _cmd_lm_eval(args)
    if args.adapter and args.compare or args.endpoint and (args.adapter or args.compare):
        from peftlab.config import ConfigError

        raise ConfigError("give one of --adapter, --compare and --endpoint")
    suite = get_suite(args.suite)
    load_base = partial(load_candidate, dtype=args.dtype, device=args.device)
    load = partial(load_base, route_by_family=args.route_by_family, fallback_adapter=args.fallback_adapter)
    if args.endpoint:
        candidates = [partial(endpoint_candidate, args.endpoint, args.served_model, args.api_key,
                              route_by_family=args.route_by_family, fallback_adapter=args.fallback_adapter,
                              concurrency=args.batch_size)]
    elif args.compare:
        from peftlab.module import read_info

        base = args.model or read_info(args.compare[0]).base_model or DEFAULT_MODEL
        candidates = [] if args.no_base else [partial(load_base, None, base)]
        candidates += [partial(load, folder, args.model) for folder in args.compare]
    else:
        candidates = [partial(load, args.adapter, args.model)]
    report = run(candidates, suite, split=args.split, n=args.n, seeds=args.seeds, batch_size=args.batch_size,
                 families=args.families, keep_examples=args.keep_examples, progress=not args.no_progress)
    print(format_table(report))
    if args.out:
        out = write_report(report, args.out, chart=True)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from peftlab.evals.lm_eval_bridge import run_lm_eval

    results = run_lm_eval(args.lm_eval_task, include_path=args.lm_eval_include, adapter=args.adapter,
                          model=args.model, dtype=args.dtype, device=args.device, limit=args.lm_eval_limit,
                          batch_size=args.batch_size, use_prompt_format=args.lm_eval_chat)
    print(json.dumps(results, indent=2, default=str))
    if args.out:
        from peftlab.report import write_json

        write_json(args.out, results)
    return 0


def cmd_data_make(args: argparse.Namespace) -> int:
    from peftlab.evals.suite import get_suite, make_split, training_records
    from peftlab.io import write_jsonl

    suite = get_suite(args.suite)
    if args.split == "train":
        records = training_records(suite, args.n, seed=args.seed)
    else:  # evaluation splits: every family of the suite, with the family kept for reference
        records = [{"prompt": i.prompt, "response": i.answer, "family": f}
                   for f, insts in make_split(suite, args.split, args.n, args.seed).items() for i in insts]
    write_jsonl(records, args.output)
    families = sorted({r["family"] for r in records})
    print(f"wrote {len(records)} records ({args.n} per family: {', '.join(families)}) to {args.output}")
    return 0


def cmd_data_families(args: argparse.Namespace) -> int:
    from peftlab.evals.suite import SUITES
    from peftlab.evals.tasks import FAMILIES

    for fam in FAMILIES.values():
        sets = ", ".join(f"{s.name}:{'trained' if fam.name in s.trained else 'held out'}" for s in SUITES.values()
                         if fam.name in s.families)
        print(f"{fam.name:<17} {fam.description} [max_new_tokens {fam.max_new_tokens}; {sets}]\n"
              f"{'':<17} accepts: {fam.accepts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description=__doc__.split("\n")[0] + " See README.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a method from a YAML config",
                       description="Train a method (lora, ia3, ...) on a dataset with transformers.Trainer. "
                                   "Every key under `training:` is passed to TrainingArguments.")
    p.add_argument("config", nargs="?", help="YAML config (see examples/); omitted: defaults plus --set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for nested keys, e.g. --set training.learning_rate=1e-3 "
                        "--set method.r=16 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output module folder")
    p.add_argument("--quantize", default=None, choices=["int8", "nf4", "fp4"],
                   help="train on a base whose linear layers are in 8 or 4 bits (QLoRA-style, through "
                        "bitsandbytes); the same as --set quantize=...")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="answer prompts with a base model or a trained module",
                       description="Answer prompts (arguments, or one per line on stdin), batched, greedy by default.")
    p.add_argument("prompts", nargs="*", help="prompts to answer (default: read lines from stdin)")
    _add_model_args(p)
    p.add_argument("--adapters", metavar="NAME=DIR,...",
                   help="serve several LoRA folders (peft or peftlab) side by side as one MultiLoRA model")
    p.add_argument("--jsonl", metavar="FILE", help="requests, one JSON object per line: {prompt | messages, adapter}; "
                                                  "prints one JSON line per request with its answer, in order")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {prompt, answer}")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a model interactively", description="Interactive multi-turn chat.")
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("merge", help="fold a LoRA/IA3 module into a full model folder",
                       description="Fold a module into its base weights; the output loads with plain transformers.")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the module folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the merged model")
    add_model_arguments(p, model_help="base model (default: the one the module names)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="describe a saved module", description="Method, base model, parameters.")
    p.add_argument("folder", help="module folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="evaluate base models and modules on a generated task suite",
                       description="Evaluate a base model, a module (--adapter) or several modules side by side "
                                   "(--compare, with their base model) on a generated suite: accuracy per task "
                                   "family, greedy decoding, a table on stdout, JSON (+ a PNG chart) with --out. "
                                   "With --lm-eval-task: run an lm-eval-harness task instead (pip install "
                                   "'peftlab[evals]').")
    add_model_arguments(p)
    p.add_argument("--adapter", metavar="DIR", help="a saved module folder of any method")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="several module folders, evaluated beside the base")
    p.add_argument("--no-base", action="store_true", help="with --compare: leave the base model out")
    p.add_argument("--endpoint", metavar="URL", default=None,
                   help="evaluate a model of an OpenAI-compatible server instead (peftlab serve, vLLM), e.g. "
                        "http://127.0.0.1:8000/v1")
    p.add_argument("--served-model", metavar="NAME", default=None,
                   help="with --endpoint: the model (adapter) name to ask (default: the server's base model)")
    p.add_argument("--api-key", default=None, help="with --endpoint: the server's API key")
    p.add_argument("--route-by-family", action="store_true",
                   help="a MultiLoRA module answers each family with the adapter named after it")
    p.add_argument("--fallback-adapter", metavar="NAME", default=None,
                   help="with --route-by-family: the adapter for families without one ('__base__': the base model)")
    p.add_argument("--suite", default="core", help="built-in suite (core, all, heldout-only) or a suite YAML file")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="default: test")
    p.add_argument("--n", type=int, default=100, help="instances per family and seed (default: 100)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds of the instance sampling; several give mean ± std (default: 0)")
    p.add_argument("--families", nargs="+", default=None, help="only these families (default: all of the split)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    p.add_argument("--keep-examples", type=int, default=5, help="outputs kept per family in the JSON (default: 5)")
    p.add_argument("--out", metavar="FILE.json", help="write the report here (and a bar chart FILE.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lm-eval-task", metavar="NAME", help="run this lm-eval-harness task on the model/module")
    p.add_argument("--lm-eval-include", metavar="DIR", help="folder with local lm-eval task YAMLs")
    p.add_argument("--lm-eval-limit", type=float, default=None, help="lm-eval: at most this many documents")
    p.add_argument("--lm-eval-chat", action="store_true",
                   help="lm-eval: render contexts with the module's prompt format (chat template)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="make training/evaluation data from the eval suite's generators",
                       description="Data from the same generators the evaluation uses, so every method trains on "
                                   "the same data and never on evaluation instances.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("make", help="write {prompt, response} JSONL for a suite split",
                            description="Write JSONL records for `peftlab train` (train split: trained families "
                                        "only) or for inspection (validation/test: every family).")
    q.add_argument("--suite", default="core", help="built-in suite or suite YAML file (default: core)")
    q.add_argument("--split", default="train", choices=["train", "validation", "test"], help="default: train")
    q.add_argument("--n", type=int, default=200, help="records per family (default: 200)")
    q.add_argument("--seed", type=int, default=0, help="seed of the instance sampling (default: 0)")
    q.add_argument("-o", "--output", required=True, metavar="FILE.jsonl", help="where to write")
    q.set_defaults(func=cmd_data_make)
    q = data_sub.add_parser("families", help="list the task families and what their scorers accept",
                            description="The task families, their suites, caps and scoring rules.")
    q.set_defaults(func=cmd_data_families)

    for module in _command_modules():
        importlib.import_module(module).add_commands(sub)
    return parser


def _command_modules() -> list[str]:
    """The modules that add their own commands: compose, serve, and every method's and recipe's ``cli.py`` (a new
    method or recipe adds its commands from its own folder, with an ``add_commands(subparsers)``)."""
    import peftlab.methods
    import peftlab.recipes

    found = [f"{package.__name__}.{m.name}.cli" for package in (peftlab.methods, peftlab.recipes)
             for m in pkgutil.iter_modules(package.__path__) if m.ispkg]
    return ["peftlab.compose.cli", "peftlab.serve.cli", "peftlab.export.cli",
            *(c for c in found if importlib.util.find_spec(c))]


def main(argv: list[str] | None = None) -> int:
    from peftlab.compose import ComposeError, ExpressionError
    from peftlab.config import ConfigError
    from peftlab.data import DataError
    from peftlab.export.gguf import ExportError
    from peftlab.methods import AdapterMismatchError
    from peftlab.module import ModuleError
    from peftlab.quantize import QuantizationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ModuleError, AdapterMismatchError, ComposeError, ExpressionError, ExportError,
            QuantizationError,
            FileExistsError, NotImplementedError) as e:
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``peftlab`` command: train, generate, chat, merge, info."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from peftlab.models import DEFAULT_MODEL


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR", help="a saved peftlab module (or peft adapter) folder")
    p.add_argument("--model", default=None,
                   help=f"base model: HF id, local folder or '{DEFAULT_MODEL}' "
                        f"(default: the module's base model, else {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (default: float32)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--system", default=None, help="system prompt (default: the module's, else the template's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on generated tokens (default: 256)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (with --sample)")


def _load_for_generation(args: argparse.Namespace):
    """(model, tokenizer, prompt format) from --adapter/--model, with the module's own prompt format."""
    from peftlab.data import PromptFormat
    from peftlab.models import load_model
    from peftlab.module import load, read_info

    fmt = PromptFormat()
    if args.adapter:
        info = read_info(args.adapter)
        fmt = info.prompt_format
        model, tokenizer = load_model(args.model or info.base_model or DEFAULT_MODEL, args.dtype, args.device)
        model = load(args.adapter, model)
    else:
        model, tokenizer = load_model(args.model or DEFAULT_MODEL, args.dtype, args.device)
    if args.system is not None:
        fmt = replace(fmt, system_prompt=args.system)
    return model, tokenizer, fmt


def _sampling(args: argparse.Namespace) -> dict:
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample else {}


def cmd_train(args: argparse.Namespace) -> int:
    from peftlab.training import TrainConfig, train

    config = TrainConfig.from_yaml(args.config, args.set)
    if args.overwrite:
        config.overwrite = True
    result = train(config)
    summary = {"module": str(result.module_dir), "metrics": result.metrics, "data": asdict(result.data_stats)}
    print(json.dumps(summary, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from peftlab.generation import generate

    model, tokenizer, fmt = _load_for_generation(args)
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
    from peftlab.module import merge

    out = merge(args.adapter, args.output, base_model=args.model, overwrite=args.overwrite)
    print(f"merged model written to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from peftlab.module import read_info

    info = read_info(args.folder)
    data = {"folder": str(info.folder), "method": info.method, "base_model": info.base_model,
            "trainable_parameters": info.trainable_parameters, "tensors": len(info.tensors),
            "peftlab_version": info.peftlab_version, "config": info.config,
            "prompt_format": asdict(info.prompt_format)}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(map(len, data))
        for key, value in data.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="answer prompts with a base model or a trained module",
                       description="Answer prompts (arguments, or one per line on stdin), batched, greedy by default.")
    p.add_argument("prompts", nargs="*", help="prompts to answer (default: read lines from stdin)")
    _add_model_args(p)
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
    p.add_argument("--model", default=None, help="base model (default: the one the module names)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="describe a saved module", description="Method, base model, parameters.")
    p.add_argument("folder", help="module folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from peftlab.config import ConfigError
    from peftlab.data import DataError
    from peftlab.module import ModuleError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ModuleError, FileExistsError) as e:
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``peftlab export gguf``: a module merged into its base, or a LoRA as llama.cpp's adapter, as GGUF."""

from __future__ import annotations

import argparse

from peftlab.models import DEFAULT_MODEL


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from peftlab.export.gguf import export_gguf

    out = export_gguf(args.module, args.output, model=args.model, kind=args.type, lora=args.lora,
                      pre_tokenizer=args.pre_tokenizer, other_base=args.other_base, overwrite=args.overwrite,
                      device=args.device)
    what = "LoRA adapter" if args.lora else ("merged model" if args.module else "base model")
    print(f"{what} -> {out} (run it: llama-cli -m {'BASE.gguf --lora ' if args.lora else ''}{out})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from peftlab.export.gguf import TYPES

    p = sub.add_parser("export", help="write a module for local runtimes (GGUF for llama.cpp, Ollama, LM Studio)",
                       description="Export modules to the formats local runtimes read.")
    formats = p.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    q = formats.add_parser("gguf", help="a merged model or a LoRA adapter as GGUF",
                           description="Merge a module (LoRA, DoRA, IA3, a composed LoRA, the peft tuners) into its "
                                       "base and write one GGUF model file with the tokenizer and chat template; "
                                       "or, with --lora, write a LoRA as llama.cpp's adapter file (llama-cli -m "
                                       "BASE.gguf --lora OUT.gguf). Without MODULE, the base model alone. ReFT and "
                                       "Bitune modules do not fold into weights and are refused with the reason.")
    q.add_argument("module", nargs="?", help="a module folder (omit: the base model alone)")
    q.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="the file to write")
    q.add_argument("--type", default="f16", choices=sorted(TYPES),
                   help="tensor type of the matrices (norms stay f32; default: f16)")
    q.add_argument("--lora", action="store_true", help="write the LoRA as llama.cpp's adapter file, unmerged")
    q.add_argument("--model", default=None,
                   help=f"base model (default: the module's own, else {DEFAULT_MODEL})")
    q.add_argument("--other-base", action="store_true",
                   help="allow --model to differ from the base the module records (the same weights by another "
                        "name)")
    q.add_argument("--pre-tokenizer", default=None,
                   help="llama.cpp's name for the tokenizer's pre-tokenizer (default: known for the embedded "
                        "model, else 'default')")
    q.add_argument("--device", default=None, help="where the merge runs: cpu, cuda, ... (default: cpu)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=cmd_export_gguf)

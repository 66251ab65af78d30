"""``peftlab multilora import|export``: LoRA folders in and out of one MultiLoRA module."""

from __future__ import annotations

import argparse

from peftlab.arguments import named_folders


def cmd_multilora_import(args: argparse.Namespace) -> int:
    from peftlab.module import combine, write

    module = combine(named_folders(args.adapters, "multilora import"))
    write(args.output, module.manifest, module.tensors, overwrite=args.overwrite)
    print(f"{len(module.tensors)} adapters -> multilora module {args.output}")
    return 0


def cmd_multilora_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from peftlab.module import ModuleError, read, split, write

    parts = split(read(args.module))
    names = args.adapter or list(parts)
    unknown = sorted(set(names) - set(parts))
    if unknown:
        raise ModuleError(f"{args.module}: no adapters {unknown}; it has {sorted(parts)}")
    for name in names:
        write(Path(args.output) / name, parts[name].manifest, parts[name].tensors, overwrite=args.overwrite)
    print(f"{len(names)} adapters -> plain peft LoRA folders under {args.output}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("multilora", help="move LoRAs in and out of a MultiLoRA module",
                       description="A MultiLoRA module serves many LoRAs side by side, one per example. Import peft "
                                   "LoRA folders (or peftlab LoRA modules) of one base model into one (LoRAs of "
                                   "different target modules are zero on the layers only others target, which is "
                                   "exact); export its adapters as plain peft folders.")
    actions = p.add_subparsers(dest="multilora_command", required=True, metavar="ACTION")
    q = actions.add_parser("import", help="combine LoRA folders into one MultiLoRA module",
                           description="Combine single-LoRA folders into one MultiLoRA module, each under its name.")
    q.add_argument("adapters", metavar="NAME=DIR,...", help="e.g. support=runs/a/module,sales=peft-folder")
    q.add_argument("-o", "--output", required=True, metavar="OUT", help="the module folder to write")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.set_defaults(func=cmd_multilora_import)
    q = actions.add_parser("export", help="write adapters of a MultiLoRA module as plain peft LoRA folders",
                           description="Write each adapter (or those named) to OUT/NAME as a peft LoRA folder.")
    q.add_argument("module", help="a MultiLoRA module folder")
    q.add_argument("-o", "--output", required=True, metavar="OUT", help="the folder to write them under")
    q.add_argument("--adapter", action="append", metavar="NAME", help="only this adapter (repeatable)")
    q.add_argument("--overwrite", action="store_true", help="replace existing folders")
    q.set_defaults(func=cmd_multilora_export)

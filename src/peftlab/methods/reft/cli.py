"""``peftlab convert``: ReFT interventions between pyreft's layout and a peftlab module."""

from __future__ import annotations

import argparse

from peftlab.arguments import add_model_arguments
from peftlab.models import DEFAULT_MODEL


def cmd_convert(args: argparse.Namespace) -> int:
    from peftlab.adapters import load_for_inference, save
    from peftlab.methods import get_method
    from peftlab.methods.reft import INTERVENTIONS, ReftMethod
    from peftlab.methods.reft.pyreft_format import is_pyreft_folder, load_pyreft, save_pyreft
    from peftlab.models import load_model
    from peftlab.module import ModuleError, read_info

    if is_pyreft_folder(args.source):
        model, _ = load_model(args.model or DEFAULT_MODEL, args.dtype, args.device)
        settings = {"act": args.act, "dropout": args.dropout, "dtype": args.intervention_dtype,
                    "short_prompts": args.short_prompts, "prompt_end_offset": args.prompt_end_offset}
        save(load_pyreft(args.source, model, positions=args.positions, **settings), args.output,
             overwrite=args.overwrite)
        print(f"pyreft interventions {args.source} -> peftlab module {args.output}")
    else:
        method = read_info(args.source).method
        if not isinstance(get_method(method), ReftMethod):
            raise ModuleError(f"{args.source}: a {method} module; convert reads pyreft folders and writes ReFT "
                              f"modules ({', '.join(sorted(INTERVENTIONS))}) in pyreft's layout")
        model = load_for_inference(args.source, args.model, args.dtype, args.device).model
        save_pyreft(model, args.output, overwrite=args.overwrite)
        print(f"peftlab module {args.source} -> pyreft layout {args.output}")
        config = model.reft_config
        if config.short_prompts != "pyreft":
            print(f"note: pyreft cuts prompts shorter than {2 * max(config.first, config.last)} tokens its own way "
                  f"(first and last positions <= n // 2); this module was trained with the paper's rule")
        if config.lora is not None:
            print(f"pyreft keeps no LoRA: the one trained alongside is in {args.output}/lora as a plain peft folder; "
                  f"apply it with peft.PeftModel.from_pretrained to the base model under the interventions "
                  f"(peftlab convert reads it back)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert ReFT interventions between pyreft's layout and a peftlab module",
                       description="A pyreft folder (config.json + intkey_*.bin) becomes a peftlab module, and a "
                                   "peftlab ReFT module becomes a pyreft folder. pyreft does not record positions, "
                                   "the activation or dropout, so give them when importing (a module trained with "
                                   "an activation imported as linear is wrong); the dtype is read from its tensors.")
    p.add_argument("source", help="a pyreft folder or a peftlab ReFT module folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write")
    add_model_arguments(p, model_help=f"base model (importing: the one the interventions were trained on, default "
                                      f"{DEFAULT_MODEL}; exporting: the module's)")
    p.add_argument("--positions", default="l1", help="positions the pyreft interventions use (default: l1)")
    p.add_argument("--act", default="linear", help="importing: the interventions' activation, as in ReFT "
                                                   "configs (default: linear)")
    p.add_argument("--dropout", type=float, default=0.0, help="importing: the interventions' dropout (default 0)")
    p.add_argument("--intervention-dtype", default=None,
                   help="importing: the interventions' dtype (default: that of the saved tensors)")
    p.add_argument("--short-prompts", default="pyreft", choices=["pyreft", "paper"],
                   help="importing: how prompts shorter than the positions are cut (default: pyreft, as the "
                        "module was trained)")
    p.add_argument("--prompt-end-offset", type=int, default=0,
                   help="importing: 1 for modules trained with pyreft's dataset helpers, whose last positions end "
                        "one token before the prompt's end (last_position = n - 1); default 0")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

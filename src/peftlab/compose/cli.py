"""``peftlab compose``: the command line of module arithmetic."""

from __future__ import annotations

import argparse
import json

from peftlab.arguments import named_folders

EPILOG = """examples:
  peftlab compose "0.5*a + 0.5*b" -m a=runs/a -m b=runs/b -o runs/ab
  peftlab compose "a - 0.8*style" -m a=runs/a -m style=runs/style -o runs/unstyled --export svd --rank 8
  peftlab compose "analogy(a, b, c)" -m a=DIR -m b=DIR -m c=DIR -o OUT --export merged
  peftlab compose "x + y" -m x=models/x -m y=models/y --base smollm2-135m-instruct --ties 0.2 -o models/xy
  peftlab compose "lam*a + (1-lam)*b" -m a=DIR -m b=DIR -o OUT --search lam=0.1:0.9:0.2 --families add sort
"""


def cmd_compose(args: argparse.Namespace) -> int:
    from peftlab.compose import compose, eval_scorer, import_scorer, parse_grid, search

    options = {"mode": args.mode, "export": args.export, "rank": args.rank, "energy": args.energy,
               "base": args.base, "ties": args.ties, "dare": args.dare, "seed": args.seed}
    modules = named_folders(args.module, "-m")
    if args.search:
        grid = dict(parse_grid(spec) for spec in args.search)
        if args.scorer == "eval" and not args.families:
            from peftlab.compose import ComposeError

            raise ComposeError("--search with the eval scorer needs --families to score on")
        scorer = import_scorer(args.scorer) if args.scorer != "eval" else eval_scorer(
            args.families, n=args.n, split=args.split, suite=args.suite, model=args.base)
        table = search(args.expression, modules, args.output, grid, scorer, overwrite=args.overwrite, **options)
        print(json.dumps({"output": args.output, "best": table["best"]}, indent=2))
        return 0
    record = compose(args.expression, modules, args.output, overwrite=args.overwrite, **options)
    shown = {k: v for k, v in record.get("result", {}).items() if not k.startswith("layer_")}
    print(json.dumps({"output": args.output, "coefficients": record["coefficients"], "export": record["export"],
                      **shown}, indent=2, ensure_ascii=False))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compose", help="add, negate, scale and analogise modules without training",
        description="Evaluate an expression over named modules (+, -, scalar *, /, parentheses, analogy(a, b, c) "
                    "= a - b + c) and write the result. LoRA arithmetic is exact: ΔW = Σ cᵢ·sᵢ·BᵢAᵢ, written as a "
                    "rank-concatenated peft LoRA, an SVD-truncated one (its error reported) or a merged model. IA3 "
                    "uses PEM's operators (l = 1 + Σ cᵢ(lᵢ - 1)); model folders compose as task vectors.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expression", help='e.g. "0.5*a + 0.5*b - 0.3*toxic"')
    p.add_argument("-m", "--module", action="append", default=[], metavar="NAME=DIR", required=True,
                   help="a module (or model) folder and the name the expression uses for it; repeat")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder to write")
    p.add_argument("--mode", choices=("exact", "pem"), default="exact",
                   help="exact (default) or pem: PEM's factor-wise rule, rank kept, exact only for LoRAs trained "
                        "from one shared initialisation (the drift and the error are measured and reported)")
    p.add_argument("--export", choices=("adapter", "svd", "merged"), default="adapter",
                   help="adapter (default: LoRA rank-concatenated, exact; IA3 vectors), svd (a LoRA of --rank or "
                        "--energy), merged (a full model folder)")
    p.add_argument("--rank", type=int, default=None, help="rank of the SVD export")
    p.add_argument("--energy", type=float, default=None,
                   help="SVD export: the smallest rank keeping this share of every layer's Σσ² (e.g. 0.99)")
    p.add_argument("--base", default=None, help="the base model (model folders: θ₀ of the task vectors; modules: "
                                                "asserts their base when recorded names differ)")
    p.add_argument("--ties", type=float, default=None, metavar="DENSITY",
                   help="model folders: TIES with this density (share of each task vector kept)")
    p.add_argument("--dare", type=float, default=None, metavar="DROP",
                   help="model folders: DARE with this drop rate")
    p.add_argument("--seed", type=int, default=0, help="DARE's random seed (default 0)")
    p.add_argument("--search", action="append", default=[], metavar="NAME=START:STOP:STEP",
                   help="try every value of a number in the expression, keep the best; repeat for a grid")
    p.add_argument("--scorer", default="eval",
                   help="eval (default: peftlab eval accuracy on --families) or package.module:function")
    p.add_argument("--families", nargs="+", default=None, help="eval scorer: families to score on")
    p.add_argument("--suite", default="core", help="eval scorer: suite (default core)")
    p.add_argument("--split", default="validation", help="eval scorer: split (default validation)")
    p.add_argument("--n", type=int, default=50, help="eval scorer: instances per family (default 50)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_compose)

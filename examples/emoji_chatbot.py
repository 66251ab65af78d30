"""The main job: the seed's emoji chatbot, trained on its ten pairs, asked prompts it never saw, before and after.

    python examples/emoji_chatbot.py [--config examples/emoji-lora.yaml] [--set training.max_steps=60 ...]

Prints the answers side by side and writes a JSON report to --out: the answers, and after training the share of
answers that are emoji only, that stop by themselves (before the token cap) and that use more than one distinct
emoji (the tutorial's bot answers with a few varied emoji and stops), with the times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peftlab import TrainConfig, generate, load_model, train
from peftlab.evals.scoring import is_emoji_only
from peftlab.report import portable_path

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(HERE / "emoji-loreft.yaml"))
    parser.add_argument("--heldout", default=str(HERE / "data" / "emoji-heldout.txt"),
                        help="unseen prompts, one per line")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None, help="JSON report (default: examples/results/<config name>.json)")
    args = parser.parse_args()

    args.out = args.out or str(HERE / "results" / f"{Path(args.config).stem}.json")
    start = time.perf_counter()
    config = TrainConfig.from_yaml(args.config, args.set)
    config.overwrite = True  # the demo is rerun often; its own output folder is replaced
    prompts = [line.strip() for line in Path(args.heldout).read_text(encoding="utf-8").splitlines() if line.strip()]
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    fmt = config.data.prompt_format
    before = generate(model, tokenizer, prompts, fmt, max_new_tokens=args.max_new_tokens, batch_size=len(prompts))
    t_train = time.perf_counter()
    result = train(config, model, tokenizer)
    train_seconds = time.perf_counter() - t_train
    after = generate(result.model, tokenizer, prompts, fmt, max_new_tokens=args.max_new_tokens,
                     batch_size=len(prompts))
    wall = time.perf_counter() - start

    def ran_to_cap(text: str) -> bool:  # (approximately: a cut character may have been dropped)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= args.max_new_tokens - 3

    rows = [{"prompt": p, "before": b, "after": a, "emoji_only_before": is_emoji_only(b),
             "emoji_only_after": is_emoji_only(a), "after_ran_to_token_cap": ran_to_cap(a),
             "after_distinct_symbols": len(set(a) - {" ", "\n", "\ufe0f", "\u200d"})}
            for p, b, a in zip(prompts, before, after, strict=True)]
    for r in rows:
        print(f"\n>>> {r['prompt']}\n  before: {r['before'][:100]!r}\n  after:  {r['after'][:100]!r}")
    n_before = sum(r["emoji_only_before"] for r in rows)
    n_after = sum(r["emoji_only_after"] for r in rows)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    capped = sum(r["after_ran_to_token_cap"] for r in rows)
    rates = {"emoji_only": n_after / len(rows), "stopped_by_itself": 1 - capped / len(rows),
             "more_than_one_distinct_emoji": sum(r["emoji_only_after"] and r["after_distinct_symbols"] > 1
                                                 for r in rows) / len(rows)}
    report = {"config": portable_path(args.config), "overrides": args.set, "module": portable_path(result.module_dir),
              "prompts": len(rows), "emoji_only_before": n_before, "emoji_only_after": n_after,
              "after_ran_to_token_cap": capped, "rates_after": rates, "max_new_tokens": args.max_new_tokens,
              "trainable_parameters": result.parameters["trainable_parameters"],
              "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
              "train_seconds": round(train_seconds, 1), "wall_seconds": round(wall, 1), "answers": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"\nemoji-only answers on {len(rows)} unseen prompts: before {n_before}/{len(rows)}, "
          f"after {n_after}/{len(rows)} ({capped} ran to the {args.max_new_tokens}-token cap instead of stopping); "
          f"training {train_seconds:.0f} s, total {wall:.0f} s -> {args.out}")
    print("rates after: " + ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in rates.items()))


if __name__ == "__main__":
    main()

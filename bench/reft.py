"""ReFT cost on the default model, measured side by side in one run (ratios; these machines are noisy).

    python bench/reft.py [--repeats 5] [--new-tokens 64] [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16]
                         [--out bench/results/reft.json]

- decode tokens/s: LoReFT (rank 4, layer 15, last prompt token, prompt-only) vs the bare model, same prompts,
  greedy, a fixed number of new tokens; time to first token for both;
- train step time (forward + backward + optimizer step): LoReFT vs LoRA r=8 (all linear layers), same batch;
- trainable parameters of each, and as % of the base model.
Runs alternate between the contenders and report medians.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

# bench/common.py
from common import ROOT, Base, add_device_arguments, generation_times, output_path, print_trainable, train_step_time

from peftlab import attach, load_records
from peftlab.adapters import parameter_report
from peftlab.data import Collator, PromptFormat, encode

PROMPTS = ["Plan a family road trip to Austin", "Why is the sky blue?", "Write a short poem about the moon.",
           "How do I make a cup of tea?", "Give me three tips for a job interview.", "Who are you?",
           "Explain how a rainbow forms.", "What should I pack for a beach holiday?"]
LOREFT = {"layers": [15], "positions": "l1", "rank": 4}
LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    add_device_arguments(parser)
    args = parser.parse_args()
    out = output_path(args.out, "reft", args.device)
    torch.manual_seed(0)

    spec = Base(None, args.device, args.dtype)  # the default model
    bare, tokenizer = spec.load()
    reft = attach(spec.load()[0], "loreft", LOREFT).eval()
    fmt = PromptFormat()
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
                for ids in (fmt.encode_prompt(tokenizer, p) for p in PROMPTS)]
    gen_batch = {**Collator(tokenizer.pad_token_id, padding_side="left")(features), "pad": tokenizer.pad_token_id}

    first = {"bare": [], "loreft": []}
    whole = {"bare": [], "loreft": []}
    for _ in range(args.repeats):
        for name, model in (("bare", bare), ("loreft", reft)):
            f, w = generation_times(model, gen_batch, args.new_tokens)
            print(f"  {name}: first token {f:.2f} s, {args.new_tokens} tokens {w:.2f} s", flush=True)
            first[name].append(f)
            whole[name].append(w)
    tokens = len(PROMPTS) * (args.new_tokens - 1)
    ttft = {k: statistics.median(v) for k, v in first.items()}
    decode_tps = {k: tokens / (statistics.median(whole[k]) - ttft[k]) for k in whole}

    train_features, _ = encode(load_records(ROOT / "examples" / "data" / "emoji.jsonl"), tokenizer, fmt, 256)
    train_batch = Collator(tokenizer.pad_token_id, pack=True)(train_features)
    del reft
    lora = attach(spec.load()[0], "lora", LORA)
    reft_train = attach(bare, "loreft", LOREFT)
    steps = {"loreft": [], "lora": []}
    for _ in range(max(3, args.repeats // 2)):
        steps["loreft"].append(train_step_time(reft_train, train_batch))
        steps["lora"].append(train_step_time(lora, train_batch))
    step = {k: statistics.median(v) for k, v in steps.items()}

    result = {
        "environment": spec.environment(), "repeats": args.repeats,
        "decode": {"prompts": len(PROMPTS), "new_tokens": args.new_tokens, "tokens_per_s": decode_tps,
                   "ratio_loreft_over_bare": decode_tps["loreft"] / decode_tps["bare"], "target": ">= 0.97",
                   "time_to_first_token_s": ttft, "ttft_ratio_loreft_over_bare": ttft["loreft"] / ttft["bare"]},
        "train_step": {"batch": f"{len(train_features)} emoji examples packed into one row of "
                                f"{train_batch['input_ids'].shape[1]} tokens",
                       "seconds": step, "ratio_loreft_over_lora": step["loreft"] / step["lora"]},
        "trainable": {"loreft": parameter_report(reft_train), "lora": parameter_report(lora)},
        "settings": {"loreft": LOREFT, "lora": LORA},
    }
    for report in result["trainable"].values():
        report.pop("per_intervention", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"decode tokens/s  bare {decode_tps['bare']:.1f}  loreft {decode_tps['loreft']:.1f}  "
          f"ratio {result['decode']['ratio_loreft_over_bare']:.3f} (target >= 0.97)")
    print(f"first token s    bare {result['decode']['time_to_first_token_s']['bare']:.3f}  "
          f"loreft {result['decode']['time_to_first_token_s']['loreft']:.3f}")
    print(f"train step s     lora {step['lora']:.2f}  loreft {step['loreft']:.2f}  "
          f"ratio {result['train_step']['ratio_loreft_over_lora']:.3f}")
    print_trainable(result["trainable"])
    print(f"-> {out}")


if __name__ == "__main__":
    main()

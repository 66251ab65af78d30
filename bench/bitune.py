"""Bitune cost on the default model against a LoRA with the same adapter settings, side by side in one run.

    python bench/bitune.py [--repeats 5] [--new-tokens 64] [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16]
                           [--out bench/results/bitune.json]

- train step time (forward + backward + AdamW step), Bitune / LoRA, on the same padded batch of 8 prompt-heavy
  examples (facts and tables from the eval suite); the token ratio (3P + A) / (P + A) is what three passes over the
  prompt would cost if time followed tokens (P prompt tokens, A answer tokens);
- time to first token (Bitune reads the prompt twice) and decode tokens/s (target: Bitune / LoRA >= 0.97),
  same left-padded prompts, greedy, a fixed number of new tokens.
Both use LoRA r=8 on all linear layers, unmerged. Runs alternate between the contenders and report medians.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

# bench/common.py
from common import Base, add_device_arguments, generation_times, output_path, print_trainable, train_step_time

from peftlab import attach, load_records
from peftlab.adapters import parameter_report
from peftlab.data import IGNORE_INDEX, Collator, PromptFormat, encode
from peftlab.evals.suite import Suite, training_records
from peftlab.models import DEFAULT_MODEL

ADAPTER = {"r": 8, "alpha": 16, "target_modules": "all-linear"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="base model (default: the built-in default model)")
    add_device_arguments(parser)
    args = parser.parse_args()
    out = output_path(args.out, "bitune", args.device)
    torch.manual_seed(0)

    spec = Base(args.model or DEFAULT_MODEL, args.device, args.dtype)
    base, tokenizer = spec.load()
    models = {"lora": attach(base, "lora", ADAPTER).eval(),
              "bitune": attach(spec.load()[0], "bitune", {"adapter": {"name": "lora", **ADAPTER}}).eval()}
    fmt = PromptFormat("chat")
    records = training_records(Suite("bench", trained=["fact_choice", "table_lookup"]), 4, seed=0)
    features, _ = encode(load_records(records), tokenizer, fmt)
    prompt_tokens = sum(sum(label == IGNORE_INDEX for label in f["labels"]) for f in features)
    answer_tokens = sum(len(f["labels"]) for f in features) - prompt_tokens
    train_batch = Collator(tokenizer.pad_token_id, padding_side="right")(features)
    prompts = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
               for ids in (fmt.encode_prompt(tokenizer, r["prompt"]) for r in records)]
    gen_batch = {**Collator(tokenizer.pad_token_id, padding_side="left")(prompts), "pad": tokenizer.pad_token_id}

    steps, first, whole = ({name: [] for name in models} for _ in range(3))
    for _ in range(args.repeats):
        for name, model in models.items():
            steps[name].append(train_step_time(model, train_batch))
            model.eval()
            f, w = generation_times(model, gen_batch, args.new_tokens)
            first[name].append(f)
            whole[name].append(w)
            print(f"  {name}: train step {steps[name][-1]:.2f} s, first token {f:.2f} s, "
                  f"{args.new_tokens} tokens {w:.2f} s", flush=True)
    step = {k: statistics.median(v) for k, v in steps.items()}
    ttft = {k: statistics.median(v) for k, v in first.items()}
    tokens = len(prompts) * (args.new_tokens - 1)
    decode_tps = {k: tokens / (statistics.median(whole[k]) - ttft[k]) for k in whole}
    token_ratio = (3 * prompt_tokens + answer_tokens) / (prompt_tokens + answer_tokens)

    result = {
        "environment": spec.environment(), "repeats": args.repeats, "adapter": ADAPTER,
        "train_step": {"batch": f"{len(features)} examples (fact_choice, table_lookup), right-padded to "
                                f"{train_batch['input_ids'].shape[1]} tokens",
                       "prompt_tokens": prompt_tokens, "answer_tokens": answer_tokens, "seconds": step,
                       "ratio_bitune_over_lora": step["bitune"] / step["lora"],
                       "token_ratio_3P_plus_A_over_P_plus_A": token_ratio},
        "generation": {"prompts": len(prompts), "new_tokens": args.new_tokens, "time_to_first_token_s": ttft,
                       "ttft_ratio_bitune_over_lora": ttft["bitune"] / ttft["lora"], "decode_tokens_per_s": decode_tps,
                       "decode_ratio_bitune_over_lora": decode_tps["bitune"] / decode_tps["lora"],
                       "decode_target": ">= 0.97"},
        "trainable": {k: parameter_report(m) for k, m in models.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"train step s     lora {step['lora']:.2f}  bitune {step['bitune']:.2f}  ratio "
          f"{result['train_step']['ratio_bitune_over_lora']:.2f} (tokens (3P+A)/(P+A) = {token_ratio:.2f})")
    print(f"first token s    lora {ttft['lora']:.3f}  bitune {ttft['bitune']:.3f}  ratio "
          f"{result['generation']['ttft_ratio_bitune_over_lora']:.2f}")
    print(f"decode tokens/s  lora {decode_tps['lora']:.1f}  bitune {decode_tps['bitune']:.1f}  ratio "
          f"{result['generation']['decode_ratio_bitune_over_lora']:.3f} (target >= 0.97)")
    print_trainable(result["trainable"])
    print(f"-> {out}")


if __name__ == "__main__":
    main()

"""Quantized bases on the default model, side by side in one run: the base's weight memory at each precision, a
LoRA training step and greedy decoding against the full-precision base.

    python bench/quantize.py [--repeats 3] [--new-tokens 32] [--device cpu|cuda[:N]] [--dtype float32|bfloat16]
                             [--out bench/results/quantize.json]

- weights: bytes of every parameter and buffer of the loaded base (int8 and 4-bit tensors count their packed
  bytes), and of its linear layers alone (what quantization touches: the embedding and norms stay in --dtype);
- train step: LoRA r 8 on every linear layer, forward + backward + AdamW step on the emoji data packed into one row;
- decode tokens/s: the base with that LoRA, 8 prompts, greedy, a fixed number of new tokens.
Contenders alternate within each repeat; medians with [min, max]. Targets: int8 weights <= 0.35x full precision.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

# bench/common.py
from common import ROOT, Base, add_device_arguments, generation_times, output_path, spread, train_step_time

from peftlab import attach, load_model, load_records
from peftlab.data import Collator, PromptFormat, encode
from peftlab.quantize import QUANTIZATIONS

PROMPTS = ["Plan a family road trip to Austin", "Why is the sky blue?", "Write a short poem about the moon.",
           "How do I make a cup of tea?", "Give me three tips for a job interview.", "Who are you?",
           "Explain how a rainbow forms.", "What should I pack for a beach holiday?"]
LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}


def weight_bytes(model: torch.nn.Module, linear_only: bool = False) -> int:
    """Bytes the model's tensors take as stored (a packed 4-bit tensor is uint8: two weights per byte), each tensor
    once (a tied head is the embedding)."""
    total, seen = 0, set()
    for module in model.modules():
        if linear_only and "Linear" not in type(module).__name__:  # nn.Linear, Linear8bitLt, Linear4bit
            continue
        if linear_only and module is model.get_output_embeddings():
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        state = getattr(getattr(module, "weight", None), "quant_state", None)  # 4-bit: the per-block scales
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quantize", nargs="+", default=["int8", "nf4"], choices=QUANTIZATIONS)
    add_device_arguments(parser)
    args = parser.parse_args()
    out = output_path(args.out, "quantize", args.device)
    spec = Base(None, args.device, args.dtype)
    contenders = ["full", *args.quantize]

    models, weights = {}, {}
    for name in contenders:  # the base's bytes before the LoRA goes on; then the LoRA, the same draw for each
        model, tokenizer = load_model(None, dtype=args.dtype, device=args.device,
                                      quantize=None if name == "full" else name)
        weights[name] = {"all_mb": weight_bytes(model) / 2**20,
                         "linear_layers_mb": weight_bytes(model, linear_only=True) / 2**20}
        torch.manual_seed(0)
        models[name] = (attach(model, "lora", LORA), tokenizer)
    fmt = PromptFormat()
    features = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
                for ids in (fmt.encode_prompt(tokenizer, p) for p in PROMPTS)]
    gen_batch = {**Collator(tokenizer.pad_token_id, padding_side="left")(features), "pad": tokenizer.pad_token_id}
    train_features, _ = encode(load_records(ROOT / "examples" / "data" / "emoji.jsonl"), tokenizer, fmt, 256)
    train_batch = Collator(tokenizer.pad_token_id, pack=True)(train_features)

    steps = {name: [] for name in contenders}
    first = {name: [] for name in contenders}
    whole = {name: [] for name in contenders}
    for repeat in range(args.repeats):
        for name, (model, _) in models.items():
            steps[name].append(train_step_time(model, train_batch))
            model.eval()
            f, w = generation_times(model, gen_batch, args.new_tokens)
            first[name].append(f)
            whole[name].append(w)
            print(f"  repeat {repeat} {name}: step {steps[name][-1]:.2f} s, decode {w:.2f} s", flush=True)
    tokens = len(PROMPTS) * (args.new_tokens - 1)
    decode = {k: [tokens / (w - f) for f, w in zip(first[k], whole[k], strict=True)] for k in contenders}
    full_step, full_decode = statistics.median(steps["full"]), statistics.median(decode["full"])
    result = {
        "environment": spec.environment(), "repeats": args.repeats, "lora": LORA, "backend": "bitsandbytes",
        "weights": weights,
        "weights_over_full": {k: {"all": v["all_mb"] / weights["full"]["all_mb"],
                                  "linear_layers": v["linear_layers_mb"] / weights["full"]["linear_layers_mb"]}
                              for k, v in weights.items()},
        "target": "int8 weights <= 0.35x full precision",
        "train_step_s": {k: spread(v) for k, v in steps.items()},
        "train_step_over_full": {k: statistics.median(v) / full_step for k, v in steps.items()},
        "decode_tokens_per_s": {k: spread(v) for k, v in decode.items()},
        "decode_over_full": {k: statistics.median(v) / full_decode for k, v in decode.items()},
        "settings": {"train_batch": f"{len(train_features)} emoji examples packed into one row of "
                                    f"{train_batch['input_ids'].shape[1]} tokens",
                     "decode": f"{len(PROMPTS)} prompts, {args.new_tokens} new tokens, greedy"},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k in contenders:
        print(f"{k:>5}: weights {weights[k]['all_mb']:.0f} MiB ({result['weights_over_full'][k]['all']:.2f}x; "
              f"linear layers {result['weights_over_full'][k]['linear_layers']:.2f}x), train step "
              f"{result['train_step_over_full'][k]:.2f}x, decode {result['decode_over_full'][k]:.2f}x")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

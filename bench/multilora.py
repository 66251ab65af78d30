"""MultiLoRA cost on the default model: many adapters in one batch against one shared LoRA, peft's mixed batches,
training adapters one after another, and the bare base model, side by side in one run.

    python bench/multilora.py [--repeats 3] [--adapters 32] [--resident 1000] [--parts a b c d]
                              [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16]
                              [--out bench/results/multilora.json]

(a) train step (forward + backward + AdamW) of a batch whose rows use 32 distinct adapters / the same batch on one
    shared peft LoRA (target <= 1.15);
(b) wall time to train 32 adapters the same number of steps each: one batched MultiLoRA run / 32 peft LoRAs one
    after another, each on its own row;
(c) greedy generation of 32 prompts with 32 distinct adapters: peftlab / peft ``adapter_names`` throughput
    (target >= 1.5), peftlab mixed / peftlab one adapter time (target <= 1.2), peftlab one adapter / peft's one
    adapter throughput (target >= 0.95), peftlab mixed / bare base model
    throughput (target >= 0.8);
(d) 1,000 rank-8 adapters on q_proj, v_proj: folder size, load time and resident memory, and (c)'s mixed
    generation drawn from them; on CUDA the module's GPU memory is recorded besides the process's resident memory.
Every adapter is rank 8, alpha 16, on every linear layer for (a)-(c); B is random so each adapter matters.
Contenders alternate within each repeat; medians with [min, max] over the repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import torch

# bench/common.py
from common import Base, add_device_arguments, clock, memory_mb, on_cuda, output_path, spread, timed, to_device

from peftlab import attach, load_records
from peftlab.adapters import load
from peftlab.data import Collator, PromptFormat, encode
from peftlab.evals.suite import Suite, training_records
from peftlab.methods import get_method
from peftlab.module import Adapter, Manifest, write

LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}


def random_b(model: torch.nn.Module, std: float = 0.02) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def peft_many(base, names: list[str], config: peft.LoraConfig) -> peft.PeftModel:
    """One peft model holding every adapter (what peft's ``adapter_names`` serves from)."""
    model = peft.get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    random_b(model)
    return model.eval()


def multilora(spec: Base, names: list[str]):
    """A fresh MultiLoRA model holding ``names``, every adapter with ``LORA``'s settings."""
    method = get_method("multilora")
    return method.attach_many(spec.load()[0], {n: method.make_config(LORA) for n in names})


def peftlab_from(peft_model: peft.PeftModel, names: list[str], spec: Base):
    """A MultiLoRA model with exactly the peft model's adapters."""
    wrapped = multilora(spec, names)
    for name in names:
        wrapped.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model, adapter_name=name), name)
    return wrapped.eval()


def train_step(model, batch: dict, optimizer) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def bench_train(spec: Base, tokenizer, features, names, repeats):
    """(a) one train step, 32 adapters in the batch / one shared LoRA on the same batch."""
    routed = Collator(tokenizer.pad_token_id)([{**f, "adapter": n} for f, n in zip(features, names, strict=True)])
    routed = to_device(routed, spec.device)
    shared = {k: v for k, v in routed.items() if k not in ("adapter_names", "adapter_index")}
    multi = multilora(spec, names)
    one = peft.get_peft_model(spec.load()[0], peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    contenders = {"multilora_32": (multi.train(), routed), "peft_one_lora": (one.train(), shared)}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for k, (m, _) in contenders.items()}
    times = {k: [] for k in contenders}
    for k, (m, batch) in contenders.items():  # warm-up
        train_step(m, batch, optimizers[k])
    for _ in range(repeats):
        for k, (m, batch) in contenders.items():
            times[k].append(timed(lambda m=m, batch=batch, k=k: train_step(m, batch, optimizers[k]), spec.device))
            print(f"  (a) {k}: {times[k][-1]:.2f} s", flush=True)
    ratio = [a / b for a, b in zip(times["multilora_32"], times["peft_one_lora"], strict=True)]
    return {"batch": f"{len(features)} rows, {routed['input_ids'].shape[1]} tokens padded, one adapter per row",
            "seconds": {k: spread(v) for k, v in times.items()}, "ratio_multilora_over_one_lora": spread(ratio),
            "target": "<= 1.15"}


def bench_train_many(spec: Base, tokenizer, features, names, steps):
    """(b) 32 adapters, ``steps`` steps each: one batched run / peft LoRAs one after another (one row each)."""
    collate = Collator(tokenizer.pad_token_id)
    routed = to_device(collate([{**f, "adapter": n} for f, n in zip(features, names, strict=True)]), spec.device)

    def batched():
        model = multilora(spec, names)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        for _ in range(steps):
            train_step(model, routed, optimizer)

    def one_after_another():
        for f in features:
            model = peft.get_peft_model(spec.load()[0],
                                        peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            row = {k: v.to(spec.device) for k, v in collate([f]).items() if k not in ("adapter_names", "adapter_index")}
            for _ in range(steps):
                train_step(model, row, optimizer)

    seconds = {"multilora_batched": timed(batched, spec.device),
               "peft_one_after_another": timed(one_after_another, spec.device)}
    print(f"  (b) {seconds}", flush=True)
    return {"adapters": len(names), "steps_each": steps, "seconds": seconds,
            "ratio_batched_over_sequential": seconds["multilora_batched"] / seconds["peft_one_after_another"],
            "note": "each includes building its model(s); one repeat (minutes of work)"}


@torch.no_grad()
def generation_seconds(model, inputs: dict, new_tokens: int, pad: int, **route) -> tuple[float, torch.Tensor]:
    settings = {"do_sample": False, "eos_token_id": None, "pad_token_id": pad, "max_new_tokens": new_tokens,
                "min_new_tokens": new_tokens}
    device = inputs["input_ids"].device  # the model's; the route's adapter_index is there too
    start = clock(device)
    out = model.generate(**inputs, **settings, **route)
    return clock(device) - start, out


def bench_generation(contenders: dict, inputs: dict, new_tokens: int, pad: int, repeats: int):
    """(c) the same 32 prompts, greedy, ``new_tokens`` each, through every contender in turn."""
    times, outputs = {k: [] for k in contenders}, {}
    for _ in range(repeats):
        for k, (model, route) in contenders.items():
            seconds, outputs[k] = generation_seconds(model, inputs, new_tokens, pad, **route)
            times[k].append(seconds)
            print(f"  (c) {k}: {seconds:.2f} s", flush=True)
    tokens = inputs["input_ids"].shape[0] * new_tokens
    return times, {k: tokens / statistics.median(v) for k, v in times.items()}, outputs


def measure_load(folder: str, spec: Base) -> None:
    """In a fresh process (the parent's freed memory would hide the growth): memory and time of loading a module;
    on CUDA also the memory torch holds there."""
    model = spec.load()[0]

    def gpu_mb() -> dict:
        return {"gpu_mb": torch.cuda.memory_allocated(spec.device) / 2**20} if on_cuda(spec.device) else {}

    before, gpu_before = memory_mb(), gpu_mb()
    start = clock(spec.device)
    load(folder, model)
    seconds = clock(spec.device) - start
    print(json.dumps({"load_seconds": seconds, "rss_mb_base_model": before, "rss_mb_with_module": memory_mb(),
                      **{f"{k}_base_model": v for k, v in gpu_before.items()},
                      **{f"{k}_with_module": v for k, v in gpu_mb().items()}}))


def bench_resident(spec: Base, count: int, inputs: dict, new_tokens: int, pad: int, repeats: int, workdir: Path):
    """(d) ``count`` rank-8 q_proj/v_proj adapters written as one module, loaded, and served 32 at a time."""
    config = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    template = attach(spec.load()[0], "multilora", config, name="a0")
    shapes = {k: v.shape for k, v in template.adapter_state_dict("a0").items()}
    generator = torch.Generator().manual_seed(0)
    names = [f"a{i}" for i in range(count)]
    tensors = {n: {k: torch.randn(s, generator=generator) * (0.02 if "lora_B" in k else 0.05)
                   for k, s in shapes.items()} for n in names}
    folder = workdir / "resident"
    manifest = Manifest({n: Adapter("multilora", template.adapters["a0"].to_dict()) for n in names}, spec.name)
    start = clock("cpu")  # the tensors are made and written on the CPU
    write(folder, manifest, tensors)
    written = clock("cpu") - start
    del tensors, template
    gc.collect()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    child = [sys.executable, __file__, "--measure-load", str(folder), "--model", spec.name, *spec.argv()]
    loading = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    model = load(folder, spec.load()[0])
    adapter_bytes = sum(t.numel() * t.element_size() for layer in model.lora_layers.values()
                        for t in (layer.lora_A, layer.lora_B))
    rows = inputs["input_ids"].shape[0]
    drawn = torch.randperm(count, generator=generator)[:rows].tolist()
    routes = {"drawn_from_all": {"adapter_names": [names[i] for i in drawn],
                                 "adapter_index": torch.arange(rows, device=spec.device)},
              "one_adapter": {"adapter_names": [names[0]],
                              "adapter_index": torch.zeros(rows, dtype=torch.long, device=spec.device)}}
    times, throughput, _ = bench_generation({k: (model, r) for k, r in routes.items()}, inputs, new_tokens, pad,
                                            repeats)
    shutil.rmtree(folder)
    return {"adapters": count, "rank": 8, "targets": ["q_proj", "v_proj"], "folder_mb": size / 2**20,
            "write_seconds": written, "adapter_tensor_mb": adapter_bytes / 2**20,
            **loading, "memory_note": "a fresh process: resident memory with the base model, then with the module",
            "generation_seconds": {k: spread(v) for k, v in times.items()},
            "ratio_drawn_over_one_adapter_time": statistics.median(times["drawn_from_all"]) /
            statistics.median(times["one_adapter"])}


PARTS = {"a": "train_step", "b": "train_many", "c": "generation", "d": "resident"}  # a part's key in the JSON


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="(b): training steps per adapter")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--resident", type=int, default=1000, help="(d): adapters resident at once")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"],
                        help="measure only these parts; the others are kept from --out")
    add_device_arguments(parser)
    parser.add_argument("--measure-load", metavar="FOLDER", help=argparse.SUPPRESS)  # (d)'s child process
    args = parser.parse_args()
    spec = Base(args.model, args.device, args.dtype)
    if args.measure_load:
        return measure_load(args.measure_load, spec)
    out = output_path(args.out, "multilora", args.device)
    result = json.loads(out.read_text()) if out.exists() and len(args.parts) < 4 else {}
    # results written before the environment was recorded name only "device" and "threads" (they are float32)
    legacy = {"device": result.pop("device", "cpu"), "threads": result.pop("threads", None), "dtype": "float32"}
    kept = result.get("environment", legacy)
    if result and (kept["device"], kept["dtype"]) != (args.device, args.dtype):
        parser.error(f"--parts {' '.join(args.parts)} keeps the other parts from {out}, measured with "
                     f"{kept['device']} {kept['dtype']}, not {args.device} {args.dtype}: give another --out")
    torch.manual_seed(0)
    names = [f"a{i}" for i in range(args.adapters)]
    base, tokenizer = spec.load()
    fmt = PromptFormat("chat")
    records = training_records(Suite("bench", trained=["arithmetic", "fact_choice", "string_ops", "unit_conversion"]),
                               args.adapters // 4, seed=0)[:args.adapters]
    features, _ = encode(load_records(records), tokenizer, fmt)
    prompts = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
               for ids in (fmt.encode_prompt(tokenizer, r["prompt"]) for r in records)]
    inputs = to_device(Collator(tokenizer.pad_token_id, padding_side="left")(prompts), args.device)
    pad = tokenizer.pad_token_id

    result.update({"environment": spec.environment(), "repeats": args.repeats,
                   "model": args.model, "adapter": LORA})
    if "a" in args.parts:
        result["train_step"] = bench_train(spec, tokenizer, features, names, args.repeats)
    if "b" in args.parts:
        result["train_many"] = bench_train_many(spec, tokenizer, features, names, args.steps)
    if "c" in args.parts:
        result["generation"] = bench_mixed_generation(spec, base, names, inputs, args.new_tokens, pad, args.repeats)
    if "d" in args.parts:
        with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as tmp:
            result["resident"] = bench_resident(spec, args.resident, inputs, args.new_tokens, pad, args.repeats,
                                                Path(tmp))
    for letter in args.parts:  # each part says where and with what it ran: --parts keeps the others from earlier
        result[PARTS[letter]]["environment"] = result["environment"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report(result, names, out)


def bench_mixed_generation(spec: Base, base, names, inputs, new_tokens, pad, repeats):
    """(c) the five contenders on the same prompts and weights (peft's one adapter: its first, the active one)."""
    peft_model = peft_many(spec.load()[0], names,
                           peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    peft_model.set_adapter(names[0])
    ours = peftlab_from(peft_model, names, spec)
    mixed = {"adapter_names": names, "adapter_index": torch.arange(len(names), device=spec.device)}
    contenders = {"peftlab_mixed": (ours, mixed), "peft_adapter_names": (peft_model, {"adapter_names": names}),
                  "peftlab_one_adapter": (ours, {"adapter_names": [names[0]],
                                                 "adapter_index": torch.zeros(len(names), dtype=torch.long,
                                                                              device=spec.device)}),
                  "peft_one_adapter": (peft_model, {}),
                  "base_model": (base.eval(), {})}
    times, throughput, outputs = bench_generation(contenders, inputs, new_tokens, pad, repeats)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "prompts": len(names), "new_tokens": new_tokens, "seconds": {k: spread(v) for k, v in times.items()},
        "tokens_per_s": throughput,
        "peftlab_over_peft_throughput": throughput["peftlab_mixed"] / throughput["peft_adapter_names"],
        "peftlab_mixed_over_one_adapter_time": median["peftlab_mixed"] / median["peftlab_one_adapter"],
        "peftlab_mixed_over_base_throughput": throughput["peftlab_mixed"] / throughput["base_model"],
        "peftlab_one_over_peft_one_throughput": throughput["peftlab_one_adapter"] / throughput["peft_one_adapter"],
        "targets": {"peftlab_over_peft_throughput": ">= 1.5", "peftlab_mixed_over_one_adapter_time": "<= 1.2",
                    "peftlab_mixed_over_base_throughput": ">= 0.8", "peftlab_one_over_peft_one_throughput": ">= 0.95"},
        "same_tokens_as_peft": bool(torch.equal(outputs["peftlab_mixed"], outputs["peft_adapter_names"])
                                    and torch.equal(outputs["peftlab_one_adapter"], outputs["peft_one_adapter"]))}


def report(result: dict, names: list[str], out: Path) -> None:
    a, g, r = result["train_step"], result["generation"], result["resident"]
    print(f"(a) train step  multilora/one LoRA {a['ratio_multilora_over_one_lora']['median']:.2f} (target <= 1.15)")
    print(f"(b) {len(names)} adapters batched/one after another "
          f"{result['train_many']['ratio_batched_over_sequential']:.2f}")
    print(f"(c) peftlab/peft throughput {g['peftlab_over_peft_throughput']:.2f} (>= 1.5); mixed/one adapter time "
          f"{g['peftlab_mixed_over_one_adapter_time']:.2f} (<= 1.2); mixed/base throughput "
          f"{g['peftlab_mixed_over_base_throughput']:.2f} (>= 0.8); one adapter peftlab/peft throughput "
          f"{g['peftlab_one_over_peft_one_throughput']:.2f} (>= 0.95); same tokens as peft: {g['same_tokens_as_peft']}")
    print(f"(d) {r['adapters']} adapters: {r['folder_mb']:.0f} MB on disk, loaded in {r['load_seconds']:.1f} s, "
          f"{r['adapter_tensor_mb']:.0f} MB of tensors, resident {r['rss_mb_base_model']:.0f} -> "
          f"{r['rss_mb_with_module']:.0f} MB; drawn/one adapter time "
          f"{r['ratio_drawn_over_one_adapter_time']:.2f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

"""Load test of `peftlab serve` on the default model: concurrent clients over many LoRA adapters, against the same
clients on one adapter and on the bare base model, side by side in one run (loopback only, bounded).

    python bench/serve.py [--clients 64] [--adapters 16] [--requests 128] [--max-tokens 32] [--repeats 3]
                          [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16] [--out bench/results/serve.json]

Three servers, one at a time, each driven by ``--clients`` concurrent `openai.AsyncOpenAI` clients for a fixed
number of greedy chat requests:
  mixed   16 rank-8 LoRAs (every linear layer, random B) loaded; request i asks adapter i mod 16;
  single  the same server; every request asks adapter 0;
  base    a server with no adapter at all (the bare base model).
Reported: output tokens/s, requests/s, p50/p95 latency and time to first token (streamed), medians with [min, max]
over the repeats (contenders alternate within each repeat); the ratios mixed/single (target >= 0.8) and mixed/base
(target >= 0.7) per repeat. Every request must be answered, and every mixed answer must equal what
``peftlab generate`` answers with its adapter alone (none lost, none mixed up): counted and reported.
The servers and the reference answers use the model in --dtype on --device; the clients' process has no model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import Base, add_device_arguments, output_path, spread  # bench/common.py

import peftlab
from peftlab.generation import generate
from peftlab.models import DEFAULT_MODEL, load_model
from peftlab.serve.app import Limits, create_app
from peftlab.serve.cli import Server, build_engine

LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Give me a tip for sleeping well.",
             "What is 12 plus 7?", "Write a haiku about rain.", "Why is the sky blue?",
             "Suggest a name for a cat.", "How do I boil an egg?"]


def make_adapters(model_name: str, count: int, folder: Path) -> dict[str, Path]:
    """``count`` LoRAs with random B (each changes the answers), saved as module folders; made on the CPU in float32
    whatever --device and --dtype say (they are files, the servers' input)."""
    folders = {}
    for i in range(count):
        base, _ = load_model(model_name)
        model = peftlab.attach(base, "lora", LORA)
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        folders[f"a{i}"] = peftlab.save(model, folder / f"a{i}")
    return folders


def references(spec: Base, folders: dict[str, Path], jobs: list[tuple[str, str]], max_tokens: int
               ) -> dict[tuple[str, str], str]:
    """What ``peftlab generate`` answers for each (adapter, question), the adapters loaded side by side, on the
    servers' device and dtype."""
    from peftlab.adapters import load_for_inference

    loaded = load_for_inference(model=spec.name, dtype=spec.dtype, device=spec.device,
                                adapters={n: folders[n] for n in sorted({a for a, _ in jobs})})
    distinct = sorted(set(jobs))
    answers = generate(loaded.model, loaded.tokenizer, [q for _, q in distinct], max_new_tokens=max_tokens,
                       batch_size=32, strip=False, adapters=[a for a, _ in distinct])
    return dict(zip(distinct, answers, strict=True))


async def drive(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """Send ``jobs`` (model, question) through ``clients`` concurrent streaming clients; timings and answers."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(clients)

    async def one(model: str, question: str) -> dict:
        async with gate:
            start = time.perf_counter()
            first, parts, tokens = None, [], 0
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - start
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return {"model": model, "question": question, "text": "".join(parts), "tokens": tokens,
                    "seconds": time.perf_counter() - start, "first": first or time.perf_counter() - start}

    start = time.perf_counter()
    results = await asyncio.gather(*(one(m, q) for m, q in jobs), return_exceptions=True)
    wall = time.perf_counter() - start
    await client.close()
    answered = [r for r in results if isinstance(r, dict)]
    failures = [repr(r) for r in results if not isinstance(r, dict)]
    latency = sorted(r["seconds"] for r in answered)
    return {"wall": wall, "answered": answered, "failures": failures,
            "tokens_per_s": sum(r["tokens"] for r in answered) / wall, "requests_per_s": len(answered) / wall,
            "p50": statistics.median(latency) if latency else None,
            "p95": latency[int(0.95 * (len(latency) - 1))] if latency else None,
            "ttft_p50": statistics.median(r["first"] for r in answered) if answered else None}


def drive_elsewhere(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """``drive`` in a process of its own, as real clients are: the server's engine thread then shares the GIL
    only with the server's own web threads, not with 64 clients parsing streams. The clients speak HTTP and hold no
    model, so --device and --dtype do not go to them."""
    command = [sys.executable, __file__, "--drive", json.dumps({"url": url, "jobs": jobs, "clients": clients,
                                                                "max_tokens": max_tokens})]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--drive":
        job = json.loads(sys.argv[2])
        print(json.dumps(asyncio.run(drive(job["url"], [tuple(j) for j in job["jobs"]], job["clients"],
                                           job["max_tokens"]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    add_device_arguments(parser)
    args = parser.parse_args()
    out = output_path(args.out, "serve", args.device)
    spec = Base(args.model, args.device, args.dtype)
    notes = []
    if args.dtype != "float32":
        notes.append(f"in {args.dtype} a server's batch (other rows, other padding) can round differently from "
                     f"generate's, so a few mixed answers unlike generate's may be rounding, not mixed-up adapters")
    for note in notes:
        print(f"note: {note}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="peftlab-serve-bench-"))
    folders = make_adapters(args.model, args.adapters, work)
    names = sorted(folders, key=lambda n: int(n[1:]))
    jobs = {"mixed": [(names[i % len(names)], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.requests)],
            "single": [(names[0], QUESTIONS[i % len(QUESTIONS)]) for i in range(args.requests)],
            "base": [("base", QUESTIONS[i % len(QUESTIONS)]) for i in range(args.requests)]}
    print("references from peftlab generate ...", flush=True)
    expected = references(spec, folders, jobs["mixed"], args.max_tokens)

    servers, engines = {}, {}
    for kind, adapters in (("adapters", folders), ("bare", {})):
        model, tokenizer = spec.load()
        engine = engines[kind] = build_engine(model, tokenizer, "base", adapters, max_batch=args.clients,
                                              max_queue=4 * args.clients)
        servers[kind] = Server(create_app(engine, limits=Limits(max_tokens=args.max_tokens))).start()
    where = {"mixed": "adapters", "single": "adapters", "base": "bare"}
    for server in servers.values():  # warm-up: a first request per server
        asyncio.run(drive(server.url, [("base", QUESTIONS[0])], 1, 4))

    runs: dict[str, list[dict]] = {k: [] for k in jobs}
    wrong: list[dict] = []
    for repeat in range(args.repeats):
        for kind, batch in jobs.items():
            before = dict(engines[where[kind]].stats.seconds)
            result = drive_elsewhere(servers[where[kind]].url, batch, args.clients, args.max_tokens)
            result["model_seconds"] = {k: v - before[k] for k, v in engines[where[kind]].stats.seconds.items()}
            if kind == "mixed":
                wrong += [{"adapter": r["model"], "question": r["question"], "served": r["text"],
                           "generate": expected[(r["model"], r["question"])]}
                          for r in result["answered"] if r["text"] != expected[(r["model"], r["question"])]]
            runs[kind].append(result)
            print(f"  repeat {repeat} {kind:>6}: {result['tokens_per_s']:.1f} tok/s, p50 {result['p50']:.2f} s, "
                  f"p95 {result['p95']:.2f} s, {len(result['answered'])}/{len(batch)} answered, model time "
                  f"{result['model_seconds']['prefill']:.1f} s prefill + {result['model_seconds']['decode']:.1f} s "
                  f"decode of {result['wall']:.1f} s", flush=True)
    for server in servers.values():
        server.stop()

    def per_repeat(a: str, b: str) -> list[float]:
        return [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b], strict=True)]

    report = {
        "environment": spec.environment(), "model": args.model, "clients": args.clients,
        "adapters": args.adapters, "adapter": LORA, "requests": args.requests, "max_tokens": args.max_tokens,
        "repeats": args.repeats, "note": "the clients run in a process of their own, over loopback HTTP",
        "results": {kind: {"tokens_per_s": spread([r["tokens_per_s"] for r in rs]),
                           "requests_per_s": spread([r["requests_per_s"] for r in rs]),
                           "latency_p50_s": spread([r["p50"] for r in rs]),
                           "latency_p95_s": spread([r["p95"] for r in rs]),
                           "ttft_p50_s": spread([r["ttft_p50"] for r in rs]),
                           "prefill_s": spread([r["model_seconds"]["prefill"] for r in rs]),
                           "decode_s": spread([r["model_seconds"]["decode"] for r in rs]),
                           "wall_s": spread([r["wall"] for r in rs]),
                           "answered": sum(len(r["answered"]) for r in rs),
                           "failures": [f for r in rs for f in r["failures"]][:5]} for kind, rs in runs.items()},
        "ratio_mixed_over_single": {**spread(per_repeat("mixed", "single")), "target": ">= 0.8"},
        "ratio_mixed_over_base": {**spread(per_repeat("mixed", "base")), "target": ">= 0.7"},
        "mixed_answers_checked": args.requests * args.repeats,
        "mixed_answers_unlike_generate": len(wrong), "unlike_examples": wrong[:5],
        **({"notes": notes} if notes else {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ratio_mixed_over_single", "ratio_mixed_over_base",
                                             "mixed_answers_unlike_generate")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

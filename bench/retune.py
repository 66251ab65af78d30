"""Re-Tuning engine: batched vs one problem at a time on the same model, and model calls saved by memoisation.

    python bench/retune.py [--adapter runs/retune/addition-steps-retune/module] [--problems 32] [--length 6]
                           [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16] [--out bench/results/retune.json]

- problems solved per second on --problems addition problems of --length digits, the batched engine (every
  ready frame of every problem in one generate call) vs one problem at a time, the same trained module, greedy;
  both see the same problems and should give the same answers;
- DP: generations with and without memoisation for 100 problems of lengths 4..10, with the oracle (exact training
  targets: the count of calls a perfect model needs; a sub-problem answered once is not asked again).
Writes bench/results/retune.json (bench/results/gpu/retune.json on CUDA) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, add_device_arguments, clock, environment, output_path  # bench/common.py

from peftlab.recipes.retune.engine import Engine, EngineConfig, ModelGenerator, Oracle
from peftlab.recipes.retune.evaluate import problems_for
from peftlab.recipes.retune.tasks import get_task
from peftlab.report import portable_path

ADAPTER = ROOT / "runs" / "retune" / "addition-steps-retune" / "module"


def engine_speed(generator, task_name: str, length: int, count: int, device: str) -> dict:
    task = get_task(task_name)
    problems = problems_for(task_name, length, count, seed=99)
    texts = [task.root(p).text for p in problems]
    out = {}
    for mode, batch in (("batched", True), ("one_at_a_time", False)):
        engine = Engine(generator, EngineConfig(batch=batch, memoize=False))
        start = clock(device)
        results = engine.run(texts)
        seconds = clock(device) - start
        out[mode] = {"seconds": seconds, "problems_per_s": count / seconds, "model_calls": engine.model_calls,
                     "generations": engine.generations,
                     "accuracy": sum(task.correct(r.output or "", p, "retune")
                                     for r, p in zip(results, problems, strict=True)) / count,
                     "outputs": [r.output for r in results]}
        print(f"  {mode}: {seconds:.1f} s, {out[mode]['problems_per_s']:.3f} problems/s, "
              f"{engine.model_calls} model calls, accuracy {out[mode]['accuracy']:.2f}", flush=True)
    same = sum(a == b for a, b in zip(out["batched"].pop("outputs"), out["one_at_a_time"].pop("outputs"), strict=True))
    speedup = out["batched"]["problems_per_s"] / out["one_at_a_time"]["problems_per_s"]
    out["speedup_batched_over_one_at_a_time"] = speedup
    out["same_outputs"] = f"{same}/{count}"
    return out


def memo_savings() -> dict:
    task = get_task("dp")
    problems = [p for length in range(4, 11) for p in problems_for("dp", length, 100 // 7 + 1, seed=5)][:100]
    table = [(p, r) for q in problems for p, r, _ in task.examples(q, "retune")]
    counts = {}
    for memo in (False, True):
        engine = Engine(Oracle(table), EngineConfig(memoize=memo))
        results = engine.run([task.root(q).text for q in problems])
        assert all(task.correct(r.output or "", q, "retune") for r, q in zip(results, problems, strict=True))
        counts["with_memo" if memo else "without_memo"] = engine.generations
    counts["saved"] = counts["without_memo"] - counts["with_memo"]
    counts["saved_fraction"] = counts["saved"] / counts["without_memo"]
    return {"problems": len(problems), "lengths": "4-10", "model": "oracle", "generations": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default=str(ADAPTER), help="a Re-Tuning module (default: the experiment's)")
    parser.add_argument("--model", default=None, help="base model (default: the module's)")
    parser.add_argument("--task", default="addition-steps")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--length", type=int, default=6)
    add_device_arguments(parser)
    args = parser.parse_args()
    out = output_path(args.out, "retune", args.device)
    if not Path(args.adapter).is_dir():
        parser.error(f"--adapter {args.adapter}: no such module folder (train the Re-Tuning experiment first)")
    from peftlab.adapters import load_for_inference

    loaded = load_for_inference(args.adapter, args.model, dtype=args.dtype, device=args.device)
    generator = ModelGenerator(loaded.model, loaded.tokenizer, max_new_tokens=48, batch_size=args.problems)
    print(f"engine on {args.problems} {args.task} problems of {args.length} digits ({args.adapter})", flush=True)
    result = {"environment": environment(args.device, args.dtype), "adapter": portable_path(args.adapter, ROOT),
              "task": args.task, "length": args.length, "problems": args.problems,
              "engine": engine_speed(generator, args.task, args.length, args.problems, args.device),
              "memoisation_dp": memo_savings(), "target": "batched / one at a time >= 5x at 32 problems"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    e, m = result["engine"], result["memoisation_dp"]["generations"]
    print(f"problems/s       batched {e['batched']['problems_per_s']:.3f}  one at a time "
          f"{e['one_at_a_time']['problems_per_s']:.3f}  speed-up {e['speedup_batched_over_one_at_a_time']:.1f}x "
          f"(target >= 5x); same outputs {e['same_outputs']}")
    print(f"DP generations   without memo {m['without_memo']}  with memo {m['with_memo']}  saved {m['saved']} "
          f"({100 * m['saved_fraction']:.1f}%)")
    print(f"-> {out}")


if __name__ == "__main__":
    main()

"""Module arithmetic cost on the default model: compose 10 LoRAs, and merge the result into full weights.

    python bench/compose.py [--repeats 5] [--modules 10] [--out bench/results/compose.json]

(a) compose 10 rank-8 LoRAs (every linear layer) with weights 0.1 as an exact rank-80 LoRA (target < 2 s), and as
    an SVD-truncated rank-8 one; peft's ``add_weighted_adapter(..., "cat")`` on the same adapters, side by side;
(b) the merged export (base + the sum, a full model folder): wall time and peak resident memory of a fresh process
    above its own start-up, against one model's weights (target <= 2x) and against a process that loads the model
    and reads every weight;
(c) what peft's other combinations cost in exactness on the same inputs: the relative Frobenius error of ΔW for
    ``linear`` and ``svd`` (its default rank), and ``cat`` with rsLoRA sources (a known scale bug).
Medians with [min, max] over the repeats.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import memory_mb, spread  # bench/common.py

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def make_loras(folder: Path, count: int, rslora: bool = False) -> dict[str, Path]:
    """``count`` peft LoRA folders of the default model with random A and B (each one changes the model)."""
    import peft
    import torch

    from peftlab import load_model

    base = load_model(MODEL)[0]
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      use_rslora=rslora))
    folders = {}
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.02)
        model.peft_config["default"].base_model_name_or_path = MODEL
        folders[f"m{i}"] = folder / f"m{i}"
        model.save_pretrained(folders[f"m{i}"])
    return folders


def child(task: str, workdir: Path) -> None:
    """Run in a fresh process; print its timings and peak memory as JSON."""
    start_mb = memory_mb("VmHWM")
    import peftlab  # noqa: F401  (the imports are part of the start-up, not of the work)
    from peftlab import load_model
    from peftlab.compose import compose

    ready_mb = memory_mb("VmHWM")
    t = time.perf_counter()
    if task == "load":  # every weight touched: safetensors maps the file, so an untouched model is not resident
        model = load_model(MODEL)[0]
        sum(float(p.double().sum()) for p in model.parameters())
    else:
        modules = json.loads((workdir / "modules.json").read_text())
        expression = " + ".join(f"0.1*{name}" for name in modules)
        compose(expression, modules, workdir / "merged", export="merged", overwrite=True)
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_mb": memory_mb("VmHWM"), "startup_mb": ready_mb,
                      "interpreter_mb": start_mb}))


def run_child(task: str, workdir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", task, "--workdir", str(workdir)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peft_deltas(model, adapter: str) -> dict:
    import peft

    return {n: m.get_delta_weight(adapter) for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.lora_A}


def relative_error(got: dict, want: dict) -> float:
    return (sum(float((got[k] - want[k]).norm() ** 2) for k in want)
            / sum(float(want[k].norm() ** 2) for k in want)) ** 0.5


def bench_peft(folders: dict[str, Path], weights: list[float], repeats: int) -> dict:
    """peft's add_weighted_adapter on the same adapters: cat's time, and each combination's ΔW error."""
    import peft

    from peftlab import load_model

    names = list(folders)
    model = peft.PeftModel.from_pretrained(load_model(MODEL)[0], folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    per = {name: peft_deltas(model, name) for name in names}
    exact = {k: sum(w * per[n][k] for n, w in zip(names, weights, strict=True)) for k in per[names[0]]}
    seconds, errors = [], {}
    for i in range(repeats):
        t = time.perf_counter()
        model.add_weighted_adapter(names, weights, f"cat{i}", combination_type="cat")
        seconds.append(time.perf_counter() - t)
        model.delete_adapter(f"cat{i}")
    for kind in ("cat", "linear", "svd"):
        try:
            model.add_weighted_adapter(names, weights, kind, combination_type=kind)
            errors[kind] = relative_error(peft_deltas(model, kind), exact)
        except ValueError as e:  # peft refuses some combinations (e.g. linear with unequal ranks)
            errors[kind] = f"refused: {e}"
    return {"cat_seconds": spread(seconds), "relative_error": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modules", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compose.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, Path(args.workdir))

    from peftlab.compose import compose
    from peftlab.report import write_json

    result = {"command": f"python bench/compose.py --repeats {args.repeats} --modules {args.modules}",
              "model": MODEL, "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}}
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-compose-") as tmp:
        work = Path(tmp)
        folders = make_loras(work / "loras", args.modules)
        expression = " + ".join(f"0.1*{name}" for name in folders)
        times = {"concat": [], "svd_rank8": []}
        for i in range(args.repeats):
            t = time.perf_counter()
            compose(expression, folders, work / f"cat{i}")
            times["concat"].append(time.perf_counter() - t)
            t = time.perf_counter()
            svd = compose(expression, folders, work / f"svd{i}", export="svd", rank=8)
            times["svd_rank8"].append(time.perf_counter() - t)
        weights = [0.1] * len(folders)
        result["a_compose"] = {"modules": len(folders), "seconds": {k: spread(v) for k, v in times.items()},
                               "svd_rank8_relative_error": svd["result"]["relative_error"],
                               "peft": bench_peft(folders, weights, args.repeats)}
        two = dict(list(folders.items())[:2])
        result["c_peft_two_modules_0.7_-0.4"] = bench_peft(two, [0.7, -0.4], 1)["relative_error"]
        rs = make_loras(work / "rslora", 2, rslora=True)
        result["c_peft_rslora_cat_0.7_-0.4"] = bench_peft(rs, [0.7, -0.4], 1)["relative_error"]["cat"]
        (work / "modules.json").write_text(json.dumps({k: str(v) for k, v in folders.items()}))
        loads, merges = [], []
        for _ in range(args.repeats):
            loads.append(run_child("load", work))
            merges.append(run_child("merge", work))
        model_mb = sum(f.stat().st_size for f in (work / "merged").glob("*.safetensors")) / 2 ** 20
        result["b_merge"] = {
            "seconds": spread([m["seconds"] for m in merges]),
            "model_weights_mb": model_mb,
            "peak_above_startup_mb": spread([m["peak_mb"] - m["startup_mb"] for m in merges]),
            "load_only_peak_above_startup_mb": spread([m["peak_mb"] - m["startup_mb"] for m in loads]),
            "peak_over_model_weights": spread([(m["peak_mb"] - m["startup_mb"]) / model_mb for m in merges])}
    write_json(args.out, result)
    a, b = result["a_compose"], result["b_merge"]
    print(f"(a) compose {a['modules']} LoRAs exactly: {a['seconds']['concat']['median']:.2f} s (target < 2 s), "
          f"SVD rank 8: {a['seconds']['svd_rank8']['median']:.2f} s (error {a['svd_rank8_relative_error']:.3f}); "
          f"peft cat {a['peft']['cat_seconds']['median']:.2f} s")
    print(f"(b) merged export: {b['seconds']['median']:.1f} s, peak {b['peak_above_startup_mb']['median']:.0f} MB "
          f"above start-up = {b['peak_over_model_weights']['median']:.2f}x the model's "
          f"{b['model_weights_mb']:.0f} MB (target <= 2); loading and reading it: "
          f"{b['load_only_peak_above_startup_mb']['median']:.0f} MB")
    print(f"(c) peft's ΔW error, 10 modules x 0.1: {a['peft']['relative_error']}; two modules 0.7/-0.4: "
          f"{result['c_peft_two_modules_0.7_-0.4']}; rsLoRA cat: {result['c_peft_rslora_cat_0.7_-0.4']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

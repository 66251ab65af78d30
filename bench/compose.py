"""Module arithmetic cost on the default model: compose 10 LoRAs, and merge the result into full weights.

    python bench/compose.py [--repeats 5] [--modules 10] [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16]
                            [--out bench/results/compose.json]

(a) compose 10 rank-8 LoRAs (every linear layer) with weights 0.1 as an exact rank-80 LoRA (target < 2 s), and as
    an SVD-truncated rank-8 one; peft's ``add_weighted_adapter(..., "cat")`` on the same adapters, side by side;
(b) the merged export (base + the sum, a full model folder): wall time and peak resident memory of a fresh process
    above its own start-up, against one model's weights (target <= 2x) and against a process that loads the model
    and reads every weight;
(c) what peft's other combinations cost in exactness on the same inputs: the relative Frobenius error of ΔW for
    ``linear`` and ``svd`` (its default rank), and ``cat`` with rsLoRA sources (a known scale bug).
Medians with [min, max] over the repeats.
peftlab's compose works on the modules' tensors on the CPU, and its merged export loads the base in float32 there:
--device and --dtype apply to peft's side of (a) and (c); (b) measures host memory against a float32 load of the
same model, so it runs only with --device cpu --dtype float32 and says why it is skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Base, add_device_arguments, clock, memory_mb, on_cuda, output_path, spread, timed  # bench/common.py

MODEL = "smollm2-135m-instruct"


def make_loras(folder: Path, count: int, rslora: bool = False) -> dict[str, Path]:
    """``count`` peft LoRA folders of the default model with random A and B (each one changes the model); made on
    the CPU in float32 whatever --device and --dtype say (they are files, the input to what is measured)."""
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


def child(task: str, workdir: Path, spec: Base) -> None:
    """Run in a fresh process; print its timings and peak memory as JSON. ``load`` loads ``spec``; ``merge`` is
    peftlab's merged export, which loads the base in float32 on the CPU."""
    start_mb = memory_mb("VmHWM")
    import peftlab  # noqa: F401  (the imports are part of the start-up, not of the work)
    from peftlab.compose import compose

    ready_mb = memory_mb("VmHWM")
    t = clock(spec.device)
    if task == "load":  # every weight touched: safetensors maps the file, so an untouched model is not resident
        model = spec.load()[0]
        sum(float(p.double().sum()) for p in model.parameters())
    else:
        modules = json.loads((workdir / "modules.json").read_text())
        expression = " + ".join(f"0.1*{name}" for name in modules)
        compose(expression, modules, workdir / "merged", export="merged", overwrite=True)
    print(json.dumps({"seconds": clock(spec.device) - t, "peak_mb": memory_mb("VmHWM"), "startup_mb": ready_mb,
                      "interpreter_mb": start_mb}))


def run_child(task: str, workdir: Path, spec: Base) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", task, "--workdir", str(workdir), *spec.argv()],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peft_deltas(model, adapter: str) -> dict:
    import peft

    return {n: m.get_delta_weight(adapter) for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.lora_A}


def relative_error(got: dict, want: dict) -> float:
    return (sum(float((got[k] - want[k]).norm() ** 2) for k in want)
            / sum(float(want[k].norm() ** 2) for k in want)) ** 0.5


def bench_peft(folders: dict[str, Path], weights: list[float], repeats: int, spec: Base) -> dict:
    """peft's add_weighted_adapter on the same adapters (the base as ``spec`` says): cat's time, and each
    combination's ΔW error."""
    import peft

    names = list(folders)
    model = peft.PeftModel.from_pretrained(spec.load()[0], folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    per = {name: peft_deltas(model, name) for name in names}
    exact = {k: sum(w * per[n][k] for n, w in zip(names, weights, strict=True)) for k in per[names[0]]}
    seconds, errors = [], {}
    for i in range(repeats):
        seconds.append(timed(lambda i=i: model.add_weighted_adapter(names, weights, f"cat{i}", combination_type="cat"),
                             spec.device))
        model.delete_adapter(f"cat{i}")
    for kind in ("cat", "linear", "svd"):
        try:
            model.add_weighted_adapter(names, weights, kind, combination_type=kind)
            errors[kind] = relative_error(peft_deltas(model, kind), exact)
        except ValueError as e:  # peft refuses some combinations (e.g. linear with unequal ranks)
            errors[kind] = f"refused: {e}"
    return {"cat_seconds": spread(seconds), "relative_error": errors}


def merge_skipped(spec: Base) -> str | None:
    """Why (b) does not run with ``spec``'s device and dtype (None: it does)."""
    if on_cuda(spec.device):
        return (f"skipped on {spec.device}: (b) measures host memory of peftlab's merged export, which runs on the "
                f"CPU whatever --device says (run it with --device cpu --dtype float32)")
    if spec.dtype != "float32":
        return (f"skipped in {spec.dtype}: peftlab's merged export loads and writes the base in float32, and (b) "
                f"weighs it against a float32 load of the same model (run it with --dtype float32)")
    return None


def bench_merge(work: Path, repeats: int, spec: Base) -> dict:
    """(b) the merged export and a load-only process (``spec``), each in a fresh process, alternating."""
    loads, merges = [], []
    for _ in range(repeats):
        loads.append(run_child("load", work, spec))
        merges.append(run_child("merge", work, spec))
    model_mb = sum(f.stat().st_size for f in (work / "merged").glob("*.safetensors")) / 2 ** 20
    return {
        "seconds": spread([m["seconds"] for m in merges]),
        "model_weights_mb": model_mb,
        "peak_above_startup_mb": spread([m["peak_mb"] - m["startup_mb"] for m in merges]),
        "load_only_peak_above_startup_mb": spread([m["peak_mb"] - m["startup_mb"] for m in loads]),
        "peak_over_model_weights": spread([(m["peak_mb"] - m["startup_mb"]) / model_mb for m in merges])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modules", type=int, default=10)
    add_device_arguments(parser)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = Base(MODEL, args.device, args.dtype)
    if args.child:
        return child(args.child, Path(args.workdir), spec)
    out = output_path(args.out, "compose", args.device)

    from peftlab.compose import compose
    from peftlab.report import write_json

    result = {"command": f"python bench/compose.py --repeats {args.repeats} --modules {args.modules} "
                         f"--device {args.device} --dtype {args.dtype}",
              "environment": spec.environment(),
              "model": MODEL, "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}}
    if args.device != "cpu" or args.dtype != "float32":
        print(f"(a) peftlab compose runs on the CPU on the modules' tensors (it has no device or dtype): "
              f"{args.device} and {args.dtype} apply to peft's side", flush=True)
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-compose-") as tmp:
        work = Path(tmp)
        folders = make_loras(work / "loras", args.modules)
        expression = " + ".join(f"0.1*{name}" for name in folders)
        times = {"concat": [], "svd_rank8": []}
        for i in range(args.repeats):
            t = clock("cpu")
            compose(expression, folders, work / f"cat{i}")
            times["concat"].append(clock("cpu") - t)
            t = clock("cpu")
            svd = compose(expression, folders, work / f"svd{i}", export="svd", rank=8)
            times["svd_rank8"].append(clock("cpu") - t)
        weights = [0.1] * len(folders)
        result["a_compose"] = {"modules": len(folders), "seconds": {k: spread(v) for k, v in times.items()},
                               "runs_on": "cpu, float32 modules (peftlab compose has no device or dtype)",
                               "svd_rank8_relative_error": svd["result"]["relative_error"],
                               "peft": bench_peft(folders, weights, args.repeats, spec)}
        two = dict(list(folders.items())[:2])
        result["c_peft_two_modules_0.7_-0.4"] = bench_peft(two, [0.7, -0.4], 1, spec)["relative_error"]
        rs = make_loras(work / "rslora", 2, rslora=True)
        result["c_peft_rslora_cat_0.7_-0.4"] = bench_peft(rs, [0.7, -0.4], 1, spec)["relative_error"]["cat"]
        (work / "modules.json").write_text(json.dumps({k: str(v) for k, v in folders.items()}))
        reason = merge_skipped(spec)
        result["b_merge"] = {"skipped": reason} if reason else bench_merge(work, args.repeats, spec)
    write_json(out, result)
    a, b = result["a_compose"], result["b_merge"]
    print(f"(a) compose {a['modules']} LoRAs exactly: {a['seconds']['concat']['median']:.2f} s (target < 2 s), "
          f"SVD rank 8: {a['seconds']['svd_rank8']['median']:.2f} s (error {a['svd_rank8_relative_error']:.3f}); "
          f"peft cat {a['peft']['cat_seconds']['median']:.2f} s")
    if "skipped" in b:
        print(f"(b) {b['skipped']}")
    else:
        print(f"(b) merged export: {b['seconds']['median']:.1f} s, peak {b['peak_above_startup_mb']['median']:.0f} MB"
              f" above start-up = {b['peak_over_model_weights']['median']:.2f}x the model's "
              f"{b['model_weights_mb']:.0f} MB (target <= 2); loading and reading it: "
              f"{b['load_only_peak_above_startup_mb']['median']:.0f} MB")
    print(f"(c) peft's ΔW error, 10 modules x 0.1: {a['peft']['relative_error']}; two modules 0.7/-0.4: "
          f"{result['c_peft_two_modules_0.7_-0.4']}; rsLoRA cat: {result['c_peft_rslora_cat_0.7_-0.4']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

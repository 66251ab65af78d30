"""The GPU tier: every method through the command line on CUDA, in bf16 and in fp16 with the GradScaler.

Skipped without CUDA (CI has none). Run it with ``make test-gpu`` where a GPU is (docs/hardware.md says how on a
lent machine). The CPU tiers (test_devices.py on torch's lazy device, test_precision.py in bf16) catch device mixing
and half-precision breakage without a GPU; this tier proves them on the real thing.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from floats import assert_close
from peftlab import attach, generate, load, load_model, save, tiny_model
from peftlab.cli import main
from peftlab.recipes.retune.engine import Engine, ModelGenerator
from peftlab.recipes.retune.tasks import TASKS
from test_precision import BFLOAT16
from test_protocol import SETTINGS

DEVICE = os.environ.get("PEFTLAB_GPU_TIER_DEVICE", "cuda")  # "cpu": a dry run of the tier itself, without a GPU
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {**{m: (m, s) for m, s in SETTINGS.items()}, "dora": ("lora", {"r": 2, "use_dora": True})}
PRECISIONS = {"bf16": "bfloat16", "fp16": "float32"}  # training flag -> base dtype (fp16 trains fp32 master weights)


def _records(method: str, pairs: list[dict]) -> list[dict]:
    return [{**p, "adapter": "default"} for p in pairs] if method == "multilora" else pairs


def _train(case: str, precision: str, tiny_dir, tmp_path, pairs, steps: int = 4) -> tuple:
    method, settings = CASES[case]
    if "total_step" in settings:  # a setting that names the run's length (AdaLoRA's schedule) follows the run
        settings = {**settings, "total_step": steps}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(method, pairs)))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_dir), "dtype": PRECISIONS[precision], "method": {"name": method, **settings},
        "data": {"train": str(data)}, "output": str(tmp_path / "module"),
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": steps, "learning_rate": 2e-2,
                     "logging_steps": 1, "per_device_train_batch_size": 6, precision: True,
                     "use_cpu": DEVICE == "cpu"}}))
    assert main(["train", str(config)]) == 0
    history = json.loads((tmp_path / "run" / "train_log.json").read_text())["log_history"]
    return tmp_path / "module", [h for h in history if "loss" in h]


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_train_on_cuda_then_generate_with_device_cuda(case, precision, tiny_dir, tmp_path, pairs, capsys):
    module, steps = _train(case, precision, tiny_dir, tmp_path, pairs)
    losses = [s["loss"] for s in steps]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert all(math.isfinite(s["grad_norm"]) for s in steps[1:])  # fp16: the first step may overflow and be skipped
    capsys.readouterr()
    assert main(["generate", "--adapter", str(module), "--model", str(tiny_dir), "--device", DEVICE, "--dtype",
                 PRECISIONS[precision], "--max-new-tokens", "4", "--json", "repeat red"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_and_cuda_logits_agree_on_the_same_weights(case, tmp_path):
    method, settings = CASES[case]
    torch.manual_seed(1)
    wrapped = attach(tiny_model()[0], method, settings)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    save(wrapped, tmp_path / "m")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [0, 0, 11, 23, 60, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    fields = {"adapter_names": ["default"], "adapter_index": torch.tensor([0, 0])} if method == "multilora" else \
        {"prompt_lengths": torch.tensor([4, 3])}
    logits = {}
    for device in ("cpu", DEVICE):
        model = load(tmp_path / "m", tiny_model()[0].to(device))
        on = {k: v.to(device) for k, v in fields.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            logits[device] = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   **{**fields, **on}).logits.cpu()
    assert_close(logits[DEVICE], logits["cpu"], f"{case}: CUDA vs CPU, float32")  # TF32 is off for float32 matmuls


def test_fp16_clipping_sees_the_gradients_fp32_sees(tiny_dir, tmp_path, pairs):
    """MultiLoRA clips per adapter: under fp16 the GradScaler's factor must be off the gradients first."""
    norms = {}
    for precision in ("fp16", "fp32"):
        folder = tmp_path / precision
        folder.mkdir()
        method, settings = CASES["multilora"]
        if precision == "fp16":
            _, steps = _train("multilora", "fp16", tiny_dir, folder, pairs, steps=3)
        else:
            data = folder / "train.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in _records(method, pairs)))
            assert main(["train", "--set", f"model={tiny_dir}", "--set", f"method.name={method}", "--set",
                         "method.r=2", "--set", f"data.train={data}", "--set", f"output={folder / 'module'}",
                         "--set", f"training.output_dir={folder / 'run'}", "--set", "training.max_steps=3",
                         "--set", "training.learning_rate=2e-2", "--set", "training.logging_steps=1",
                         "--set", "training.per_device_train_batch_size=6"]) == 0
            steps = [h for h in json.loads((folder / "run" / "train_log.json").read_text())["log_history"]
                     if "loss" in h]
        norms[precision] = steps[-1]["grad_norm"]
    assert abs(norms["fp16"] - norms["fp32"]) < 0.05 * norms["fp32"], norms  # not 65536 times it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_device_cuda_answers_every_lane(tiny_dir, tmp_path):
    lanes = {"lora": ("lora", {"r": 2}), "reft": ("loreft", SETTINGS["loreft"]), "bitune": ("bitune", {}),
             "ia3": ("ia3", {})}
    folders = {}
    for name, (method, settings) in lanes.items():
        torch.manual_seed(len(folders))
        wrapped = attach(load_model(str(tiny_dir))[0], method, settings)
        with torch.no_grad():
            for p in wrapped.parameters():
                if p.requires_grad:
                    p.normal_(std=0.3)
        folders[name] = save(wrapped, tmp_path / name)
    port = _free_port()
    command = [sys.executable, "-m", "peftlab.cli", "serve", "--base", str(tiny_dir), "--device", DEVICE, "--dtype",
               "bfloat16", "--port", str(port), "--log-level", "warning"]
    for name, folder in folders.items():
        command += ["--adapter", f"{name}={folder}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()
                time.sleep(0.5)
        model, tokenizer = load_model(str(tiny_dir), dtype="bfloat16", device=DEVICE)
        for name, folder in folders.items():
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "model": name, "messages": [{"role": "user", "content": "repeat red"}], "max_tokens": 4,
                "temperature": 0})
            assert reply.status_code == 200, reply.text
            want = generate(load(folder, load_model(str(tiny_dir), dtype="bfloat16", device=DEVICE)[0]), tokenizer,
                            ["repeat red"], max_new_tokens=4, strip=False)[0]
            assert reply.json()["choices"][0]["message"]["content"] == want, name
    finally:
        process.terminate()
        process.wait(30)


def test_compose_merged_runs_on_cuda(tiny_dir, tmp_path):
    torch.manual_seed(0)
    wrapped = attach(load_model(str(tiny_dir))[0], "lora", {"r": 2})
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    save(wrapped, tmp_path / "a")
    assert main(["compose", "1.0*a", "-m", f"a={tmp_path / 'a'}", "-o", str(tmp_path / "merged"), "--export",
                         "merged", "--base", str(tiny_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").to(DEVICE)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]], device=DEVICE)
    with torch.no_grad():
        want = wrapped.to(DEVICE)(input_ids=ids).logits
        assert_close(merged(input_ids=ids).logits, want, "the merged model vs the LoRA, on CUDA")


def test_the_retune_engine_runs_on_cuda(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), dtype="bfloat16", device=DEVICE)
    task = TASKS["addition"]
    results = Engine(ModelGenerator(model, tokenizer, max_new_tokens=8)).run([task.root(("12", "34")).text,
                                                                            task.root(("5", "6")).text])
    assert len(results) == 2  # an untrained model fails the problems; the engine must still run them to an end


def test_bf16_on_cuda_is_close_to_float32(tmp_path):
    torch.manual_seed(0)
    wrapped = attach(tiny_model()[0], "loreft", SETTINGS["loreft"])
    save(wrapped, tmp_path / "m")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]], device=DEVICE)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load(tmp_path / "m", tiny_model()[0].to(DEVICE, dtype))
        with torch.no_grad():
            out[dtype] = model(input_ids=ids, prompt_lengths=torch.tensor([4], device=DEVICE)).logits.float()
    assert_close(out[torch.bfloat16], out[torch.float32], "loreft bf16 vs float32 on CUDA", rel=BFLOAT16)


@pytest.mark.parametrize("method", ["lora", "loreft", "bitune", "multilora"])
def test_qlora_style_nf4_base_on_cuda(method, tiny_dir, tmp_path, pairs):
    """QLoRA's setting: a bitsandbytes nf4 base on CUDA, bf16 compute; the method trains, saves, and the module
    loads back onto an nf4 base (the manifest says so) with the trained logits."""
    pytest.importorskip("bitsandbytes")
    from peftlab import TrainConfig, train
    from peftlab.adapters import load_for_inference
    from peftlab.quantize import quantization_of

    config = TrainConfig(model=str(tiny_dir), dtype="bfloat16", quantize="nf4",
                         method={"name": method, **SETTINGS[method]},
                         training={"output_dir": str(tmp_path / "run"), "max_steps": 3, "learning_rate": 2e-2,
                                   "logging_steps": 1, "per_device_train_batch_size": 6, "bf16": True,
                                   "use_cpu": DEVICE == "cpu"},
                         output=str(tmp_path / "module"))
    model, tokenizer = load_model(str(tiny_dir), dtype="bfloat16", device=DEVICE, quantize="nf4")
    result = train(config, model, tokenizer, train_data=_records(method, pairs))
    assert all(math.isfinite(h["loss"]) for h in result.log_history if "loss" in h)
    loaded = load_for_inference(result.module_dir, dtype="bfloat16", device=DEVICE)
    assert quantization_of(loaded.model.causal_lm) == "nf4"
    ids = torch.tensor([[5, 17, 99, 3, 200, 42, 7]], device=DEVICE)
    fields = {"adapter_names": ["default"], "adapter_index": torch.tensor([0], device=DEVICE)} \
        if method == "multilora" else {"prompt_lengths": torch.tensor([4], device=DEVICE)} if method == "bitune" else {}
    with torch.no_grad():
        assert_close(loaded.model(input_ids=ids, **fields).logits.float(),
                     result.model.eval()(input_ids=ids, **fields).logits.float(), f"{method}: nf4 reload",
                     rel=BFLOAT16)

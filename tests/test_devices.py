"""Every method on a device other than the CPU, without a GPU.

torch's lazy-tensor backend (TorchScript, run on the CPU) is a device of its own: an op that mixes one of its tensors
with a CPU tensor raises, as CUDA does. So these tests catch what crashes on ``--device cuda`` (a tensor made on the
CPU beside the model's, a saved module whose tensors stay where the file put them) on a machine with no GPU.
"""

import warnings

import pytest
import torch

from floats import assert_close
from peftlab import attach, generate, load, save, tiny_model
from peftlab.methods.multilora.config import MultiLoraConfig
from test_protocol import SETTINGS

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # it announces itself as a prototype
    import torch._lazy
    import torch._lazy.ts_backend

torch._lazy.ts_backend.init()
ELSEWHERE = torch.device("lazy")


def _transformers_runs_there() -> bool:
    """transformers before ~5.22 opens torch.autocast on whatever device the inputs are on (the RoPE guard), and the
    lazy device has no autocast: there this tier cannot run (the GPU tier still can)."""
    try:
        tiny_model()[0].to(ELSEWHERE)(input_ids=torch.ones(1, 2, dtype=torch.long, device=ELSEWHERE))
    except RuntimeError as error:
        if "autocast" in str(error):
            return False
        raise
    return True


pytestmark = pytest.mark.skipif(not _transformers_runs_there(),
                                reason="this transformers calls torch.autocast on the lazy device, which has none")
IDS = torch.tensor([[5, 17, 42, 99, 7, 3], [0, 0, 11, 23, 60, 8]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def _fields(method: str, device: torch.device) -> dict:
    """The per-example fields a training batch carries, on ``device``."""
    if method == "multilora":
        return {"adapter_names": ["default"], "adapter_index": torch.tensor([0, 0], device=device)}
    return {"prompt_lengths": torch.tensor([4, 3], device=device)}


def _saved(method: str, folder) -> None:
    """A module of ``method`` whose every trained part is off its initial value, saved to ``folder`` (on the CPU)."""
    torch.manual_seed(1)
    wrapped = attach(tiny_model()[0], method, SETTINGS[method])
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    save(wrapped, folder)


def _devices(model: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*model.parameters(), *model.buffers()]}


def test_a_cpu_tensor_meets_a_lazy_one_and_raises():
    """The premise: this device refuses what CUDA refuses."""
    with pytest.raises(RuntimeError):
        torch.ones(3, device=ELSEWHERE) + torch.ones(3)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_a_saved_module_loads_trains_and_clips_on_another_device(method, tmp_path):
    """load (files read to the CPU, put into a model elsewhere) -> forward -> backward -> the method's clipping, and
    the logits there equal the CPU's."""
    _saved(method, tmp_path / "m")
    on_cpu = load(tmp_path / "m", tiny_model()[0]).eval()
    with torch.no_grad():
        want = on_cpu(input_ids=IDS, attention_mask=MASK, **_fields(method, IDS.device)).logits
    wrapped = load(tmp_path / "m", tiny_model()[0].to(ELSEWHERE), trainable=True)
    assert _devices(wrapped) == {"lazy"}
    ids, mask = IDS.to(ELSEWHERE), MASK.to(ELSEWHERE)
    out = wrapped(input_ids=ids, attention_mask=mask, labels=ids, **_fields(method, ELSEWHERE))
    out.loss.backward()
    norm = wrapped.clip_grad_norm_(1e-3)  # small enough to clip every method's gradient
    grads = [p.grad for p in wrapped.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.device.type == "lazy" for g in grads)  # (Bitune's last bidirectional q/o/mlp get none)
    assert float(norm) > 1e-3  # clipping had something to do
    # float32 on both sides, but another device's kernels (TorchScript here, CUDA elsewhere) sum in their own order
    assert_close(wrapped.eval()(input_ids=ids, attention_mask=mask, **_fields(method, ELSEWHERE)).logits.cpu(), want,
                 what=method)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_fresh_parts_follow_the_model_to_its_device(method):
    assert _devices(attach(tiny_model()[0].to(ELSEWHERE), method, SETTINGS[method])) == {"lazy"}


@pytest.mark.parametrize("method", ["loreft", "bitune", "multilora"])
def test_generate_on_another_device(method, tmp_path):
    _saved(method, tmp_path / "m")
    model, tokenizer = tiny_model()
    on_cpu = generate(load(tmp_path / "m", model), tokenizer, ["repeat red", "repeat blue cat"], max_new_tokens=3,
                      **({"adapters": ["default", "default"]} if method == "multilora" else {}))
    elsewhere = generate(load(tmp_path / "m", tiny_model()[0].to(ELSEWHERE)), tokenizer,
                         ["repeat red", "repeat blue cat"], max_new_tokens=3,
                         **({"adapters": ["default", "default"]} if method == "multilora" else {}))
    assert elsewhere == on_cpu


def test_the_server_answers_every_lane_on_another_device(tmp_path):
    """One engine on the lazy device holding a LoRA (the shared lane), a LoReFT, a Bitune and an IA3 module (lanes of
    their own): each answers over HTTP as the same engine on the CPU does."""
    httpx = pytest.importorskip("httpx")
    from peftlab.serve.app import create_app
    from peftlab.serve.cli import Server, build_engine

    methods = ["lora", "loreft", "bitune", "ia3"]
    for method in methods:
        _saved(method, tmp_path / method)
    answers = {}
    for device in ("cpu", ELSEWHERE):
        base, tokenizer = tiny_model()
        engine = build_engine(base.to(device), tokenizer, "tiny", {m: tmp_path / m for m in methods}, max_batch=4)
        with Server(create_app(engine)) as running:
            answers[str(device)] = [httpx.post(f"{running.url}/v1/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "repeat red"}], "max_tokens": 4,
                "temperature": 0}).json()["choices"][0]["message"]["content"] for model in ["tiny", *methods]]
    assert answers["lazy"] == answers["cpu"]
    assert len(set(answers["cpu"])) > 1  # the modules change the answer


def test_dit_s_shared_slot_trains_on_another_device():
    """DIT's reader: one shared LoRA beside per-example routed diffs, added to a model that already lives elsewhere."""
    wrapped = attach(tiny_model()[0].to(ELSEWHERE), "multilora", MultiLoraConfig(r=2), name="diff0")
    wrapped.add_adapters({"diff1": MultiLoraConfig(r=2)})
    wrapped.add_shared_adapter("dit", MultiLoraConfig(r=2))
    assert _devices(wrapped) == {"lazy"}
    ids = IDS.to(ELSEWHERE)
    route = {"adapter_names": ["diff0", "diff1"], "adapter_index": torch.tensor([0, 1], device=ELSEWHERE)}
    wrapped.train()(input_ids=ids, labels=ids, **route).loss.backward()
    wrapped.clip_grad_norm_(1.0)
    shared = [p.grad for layer in wrapped.lora_layers.values() for p in (layer.shared_A, layer.shared_B)]
    assert all(g is not None and g.device.type == "lazy" for g in shared)
    assert float(torch.stack([g.norm() for g in shared]).norm()) > 0

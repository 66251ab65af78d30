"""The method protocol on every registered method: unload gives the base model back, v1 folders load with the
logits they were saved with, module folders round-trip as tensors, plain peft folders keep their real config,
capability flags hold."""

from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from floats import assert_close
from peftlab import attach, load, read, read_info, save, tiny_model, write
from peftlab.methods import METHODS, get_method
from peftlab.module import ModuleError

V1 = Path(__file__).parent / "fixtures" / "v1"
V1_METHODS = sorted(p.name for p in V1.iterdir() if (p / "peftlab.json").exists())
REFT = {"layers": "all", "rank": 2, "positions": "f1+l1", "share_weights": False}
SETTINGS = {"lora": {"r": 2}, "ia3": {}, "bitune": {"adapter": {"name": "lora", "r": 2}}, "multilora": {"r": 2},
            **dict.fromkeys(("loreft", "noreft", "direft", "direft_orth", "consreft", "lobireft"), REFT),
            "loha": {"r": 2}, "lokr": {"r": 2}, "vera": {"r": 8}, "oft": {"block_size": 16},
            "adalora": {"init_r": 4, "target_r": 2, "total_step": 3}}  # total_step: the runs here take 3 steps
IDS = torch.tensor([[5, 17, 42, 99, 7, 3], [0, 0, 11, 23, 60, 8]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
PROMPTS = torch.tensor([4, 3])


def _assert_same(got, want, module):
    """Equal bit for bit (the same tensors read back, the same forward in this process) unless the module holds an
    orthonormal R: read back, R passes through its QR parametrisation once more, which reproduces it to ~1e-7
    (peftlab 0.1 loaded it the same way), so the logits are another computation, equal up to float rounding."""
    if not any(k.endswith("rotate_layer") for k in read(module).tensors["default"]):
        assert torch.equal(got, want)
    else:
        assert_close(got, want, f"logits after a {module} round trip")


def _logits(model, prompt_lengths=True):
    with torch.no_grad():
        extra = {"prompt_lengths": PROMPTS} if prompt_lengths else {}
        return model(input_ids=IDS, attention_mask=MASK, **extra).logits


def _randomised(method: str, settings: dict):
    """A tiny model with ``method`` attached and every trained part moved off its initial value."""
    model, _ = tiny_model()
    torch.manual_seed(1)
    wrapped = attach(model, method, settings)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return wrapped.eval()


def test_every_registered_method_is_covered_here():
    assert set(METHODS) == set(SETTINGS)  # a new method adds its settings here, and the tests below cover it
    assert set(V1_METHODS) <= set(METHODS)


@pytest.mark.parametrize(("method", "settings"), sorted(SETTINGS.items())
                         + [("loreft", {**REFT, "lora": {"r": 2}})])
def test_unload_gives_the_untouched_base_model_back(method, settings):
    base, _ = tiny_model()
    before = _logits(base, prompt_lengths=False)
    kinds = [type(m) for m in base.modules()]
    wrapped = _randomised(method, settings)
    assert (_logits(wrapped) - before).abs().max() > 1e-3  # the method really changed the model
    model = wrapped.unload()
    assert torch.equal(_logits(model, prompt_lengths=False), before)  # the same weights, the same forward
    assert [type(m) for m in model.modules()] == kinds  # every injected layer unwrapped
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # every hook removed
    assert all(p.requires_grad for p in model.parameters())  # as the fresh model had them


@pytest.mark.parametrize("method", V1_METHODS)
def test_a_v1_folder_loads_with_the_logits_it_was_saved_with(method):
    base = AutoModelForCausalLM.from_pretrained(V1 / "base")
    wrapped = load(V1 / method, base)
    expected = load_file(str(V1 / method / "expected.safetensors"))["logits"]  # another process, BLAS, transformers
    assert_close(_logits(wrapped, prompt_lengths=method == "bitune"), expected, f"{method} logits")  # as make_fixtures
    assert read_info(V1 / method).method == method


@pytest.mark.parametrize("method", V1_METHODS)
def test_read_write_read_is_bit_identical(method, tmp_path):
    first = read(V1 / method)
    write(tmp_path / "a", first.manifest, first.tensors)
    second = read(tmp_path / "a")
    assert second.manifest.adapters == first.manifest.adapters
    assert (second.manifest.base_model, second.manifest.prompt_format) == (first.manifest.base_model,
                                                                            first.manifest.prompt_format)
    for name, tensors in first.tensors.items():
        assert tensors.keys() == second.tensors[name].keys()
        for key, t in tensors.items():
            assert t.dtype == second.tensors[name][key].dtype and torch.equal(t, second.tensors[name][key]), key


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_a_saved_model_and_its_module_tensors_agree(method, tmp_path):
    wrapped = _randomised(method, SETTINGS[method])
    save(wrapped, tmp_path / "m")
    module = read(tmp_path / "m")
    state = wrapped.adapter_state_dict()
    assert module.tensors["default"].keys() == state.keys()
    assert all(torch.equal(module.tensors["default"][k], v) for k, v in state.items())
    _assert_same(_logits(load(tmp_path / "m", tiny_model()[0])), _logits(wrapped), tmp_path / "m")


def test_a_plain_peft_folder_records_its_real_config(tmp_path):
    model, _ = tiny_model()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                            target_modules=["v_proj", "q_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "p")
    info = read_info(tmp_path / "p")
    assert info.method == "lora"
    assert info.config == {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                           "use_dora": False, "use_rslora": False, "bias": "none"}
    ours = load(tmp_path / "p", tiny_model()[0])
    assert_close(_logits(ours, prompt_lengths=False), _logits(peft_model.eval(), prompt_lengths=False), "vs peft")


def test_a_peft_setting_peftlab_cannot_carry_is_refused_not_dropped(tmp_path):
    model, _ = tiny_model()
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0])
                        ).save_pretrained(tmp_path / "p")
    with pytest.raises(ModuleError, match=r"adapter_config.json: .*layers_to_transform=\[0\]"):
        read_info(tmp_path / "p")


def test_a_newer_format_and_a_pickled_peft_folder_are_refused(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "peftlab.json").write_text('{"format_version": 9, "adapters": {}}')
    with pytest.raises(ModuleError, match="format_version 9 is newer"):
        read(tmp_path / "new")
    model, _ = tiny_model()
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ModuleError, match="adapter_model.bin is a pickle"):
        read(tmp_path / "bin")


def test_capability_flags():
    flags = {name: (m.mergeable, m.composable, m.supports_packing, m.routable, m.lora_adapters)
             for name, m in METHODS.items()}
    assert flags["lora"] == (True, "low_rank", True, False, True)
    assert flags["ia3"] == (True, "scaling", True, False, False)
    assert flags["loreft"] == (False, None, True, False, False)
    assert flags["bitune"] == (False, None, False, False, False)
    assert flags["multilora"] == (False, None, True, True, True)
    assert all(flags[name] == (True, None, True, False, False) for name in ("loha", "lokr", "vera", "oft", "adalora"))


def test_load_is_attach_then_load_adapter_state_dict(tmp_path):
    wrapped = _randomised("loreft", REFT)
    save(wrapped, tmp_path / "m")
    fresh = get_method("loreft").attach(tiny_model()[0], wrapped.reft_config)
    assert not torch.equal(_logits(fresh), _logits(wrapped))
    fresh.load_adapter_state_dict(read(tmp_path / "m").tensors["default"])
    _assert_same(_logits(fresh.eval()), _logits(wrapped), tmp_path / "m")


def test_a_second_adapter_on_a_method_that_holds_one_is_refused():
    wrapped = attach(tiny_model()[0], "lora", {"r": 2})
    with pytest.raises(ValueError, match="holds one adapter"):
        attach(wrapped, "lora", {"r": 2}, name="other")
    with pytest.raises(ValueError, match="carries 'lora'"):
        attach(wrapped, "loreft", REFT)


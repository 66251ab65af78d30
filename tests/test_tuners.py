"""LoHa, LoKr, VeRA, OFT and AdaLoRA (methods/tuners): trained with peftlab, read back by plain peft and transformers
with the same logits, merged with the same logits, and refused where their tensors do not add up."""

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from floats import assert_close
from peftlab import TrainConfig, attach, load, load_model, read_info, save, tiny_model, train
from peftlab.adapters import merge
from peftlab.compose import ComposeError, compose
from peftlab.methods import get_method

INPUT = torch.tensor([[5, 17, 99, 3, 200, 42, 7, 8]])
ADALORA = {"init_r": 4, "target_r": 2, "total_step": 12, "tinit": 2, "tfinal": 2}
TUNERS = {"loha": {"r": 4}, "lokr": {"r": 4}, "vera": {"r": 16}, "oft": {"block_size": 16}, "adalora": ADALORA}
PEFT_TYPES = {"loha": "LOHA", "lokr": "LOKR", "vera": "VERA", "oft": "OFT", "adalora": "ADALORA"}
LEARNING_RATES = {"vera": 1e-1}  # VeRA trains two scaling vectors per layer: at 2e-2 it barely moves in 12 steps


def _train(tiny_dir, tmp_path, pairs, name, steps):
    """``steps`` full-batch steps (every pair in each), so the loss is measured on the same examples each time."""
    model, tokenizer = load_model(str(tiny_dir))
    config = TrainConfig(model=str(tiny_dir), method={"name": name, **TUNERS[name]},
                         training={"output_dir": str(tmp_path / "run"), "max_steps": steps,
                                   "learning_rate": LEARNING_RATES.get(name, 2e-2), "logging_steps": 1,
                                   "per_device_train_batch_size": len(pairs)})
    return train(config, model, tokenizer, train_data=pairs)


@torch.no_grad()
def _logits(model):
    return model(input_ids=INPUT).logits


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_a_trained_tuner_loads_in_plain_peft_and_merges_with_equal_logits(name, tiny_dir, tmp_path, pairs):
    result = _train(tiny_dir, tmp_path, pairs, name, steps=12)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 12
    assert losses[-1] < 0.8 * losses[0], losses  # it learns
    ours = _logits(result.model)
    assert (_logits(AutoModelForCausalLM.from_pretrained(tiny_dir)) - ours).abs().max().item() > 1e-3

    names = {p.name for p in result.module_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftlab.json"} <= names
    plain = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), result.module_dir).eval()
    assert plain.peft_config["default"].peft_type == PEFT_TYPES[name]
    assert_close(_logits(plain), ours, f"{name}: plain peft vs peftlab")

    info = read_info(result.module_dir)
    assert info.method == name and info.base_model == str(tiny_dir)
    settings = get_method(name).make_config(TUNERS[name]).to_dict()
    assert info.config == {**settings, **{k: v for k, v in info.config.items() if k == "rank_pattern"}}  # AdaLoRA
    # adds the ranks it kept
    reloaded = load(result.module_dir, load_model(str(tiny_dir))[0])
    if name == "adalora":  # read back, each layer is cut to the ranks it kept: another computation, same values
        assert_close(_logits(reloaded), ours, "adalora: reloaded (ranks cut) vs trained (ranks masked)")
    else:
        assert torch.equal(_logits(reloaded), ours)  # the same tensors read back, the same forward

    merged = AutoModelForCausalLM.from_pretrained(merge(result.module_dir, tmp_path / "merged"))
    assert {n for n, _ in merged.named_parameters()} == \
        {n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_dir).named_parameters()}  # a plain model
    assert_close(_logits(merged), ours, f"{name}: merged vs unmerged")


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_packed_batch_gives_the_padded_batch_loss_and_gradients(name, tiny_dir, pairs, assert_packed_equals_padded):
    model, tokenizer = load_model(str(tiny_dir))
    wrapped = attach(model, name, TUNERS[name])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    assert_packed_equals_padded(wrapped.train(), tokenizer, pairs)


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_config_survives_peft_and_a_setting_it_cannot_carry_is_refused(name):
    config = get_method(name).make_config(TUNERS[name])
    assert type(config).from_peft(config.to_peft()) == config
    foreign = config.to_peft()
    foreign.layers_to_transform = [0]
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\]"):
        type(config).from_peft(foreign)


def test_settings_are_checked_where_they_are_given():
    with pytest.raises(ValueError, match="either r .* or block_size"):
        get_method("oft").make_config({"r": 4})  # with the default block_size 32 as well
    assert get_method("oft").make_config({"r": 4, "block_size": 0}).to_peft().r == 4
    with pytest.raises(ValueError, match="r must be an integer of at least 1"):
        get_method("loha").make_config({"r": 0})
    with pytest.raises(ValueError, match=r"module_dropout must be in \[0, 1\)"):
        get_method("lokr").make_config({"module_dropout": 1.0})


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_compose_refuses_a_tuner_with_its_reason(name, tmp_path):
    save(attach(tiny_model()[0], name, TUNERS[name]), tmp_path / "m")
    reason = get_method(name).not_composable_because
    with pytest.raises(ComposeError, match=f"a {name} module, which compose cannot do arithmetic on"):
        compose("a + b", {"a": tmp_path / "m", "b": tmp_path / "m"}, tmp_path / "out")
    assert reason and "LoRA" not in reason


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_a_plain_peft_folder_of_a_tuner_reads_as_that_method(name, tmp_path):
    """A folder peft wrote itself (no peftlab.json): its peft_type names the method, and it loads as peft runs it."""
    config = get_method(name).make_config(TUNERS[name])
    theirs = peft.get_peft_model(tiny_model()[0], config.to_peft())
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "p")
    info = read_info(tmp_path / "p")
    assert info.method == name  # (peft writes "all-linear" out as the layers it chose)
    assert {k: v for k, v in info.config.items() if k != "target_modules"} == \
        {k: v for k, v in config.to_dict().items() if k != "target_modules"}
    with torch.no_grad():
        assert_close(load(tmp_path / "p", tiny_model()[0])(input_ids=INPUT).logits,
                     theirs.eval()(input_ids=INPUT).logits, f"{name}: peftlab vs peft on peft's own folder")


def test_adalora_reallocates_its_ranks_in_training_and_a_loaded_adapter_keeps_them(tiny_dir, tmp_path, pairs):
    """The rank schedule runs as a Trainer callback: by the end each layer keeps some of its init_r ranks, target_r
    on average; the kept ranks are saved in the config, and peft reads the folder back with the same logits."""
    result = _train(tiny_dir, tmp_path, pairs, "adalora", steps=12)
    kept = read_info(result.module_dir).config["rank_pattern"]
    assert kept and all(len(mask) == ADALORA["init_r"] for mask in kept.values())
    total = sum(sum(mask) for mask in kept.values())
    assert total == ADALORA["target_r"] * len(kept)  # the budget: target_r per layer on average
    assert len({sum(mask) for mask in kept.values()}) > 1  # spent unevenly: reallocated, not cut evenly
    plain = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), result.module_dir).eval()
    assert_close(_logits(plain), _logits(result.model), "adalora: plain peft vs peftlab after reallocation")


def test_adalora_refuses_a_run_of_another_length(tiny_dir, tmp_path, pairs):
    with pytest.raises(ValueError, match="total_step is 12 but this run takes 5 optimizer steps"):
        _train(tiny_dir, tmp_path, pairs, "adalora", steps=5)
    with pytest.raises(ValueError, match=r"total_step must be the run's number of optimizer steps"):
        get_method("adalora").make_config({})

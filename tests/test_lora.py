"""LoRA and IA3: trained with peftlab, read back by plain peft and transformers with the same logits."""

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from floats import assert_close
from peftlab import TrainConfig, attach, load, load_model, read_info, train
from peftlab.adapters import merge
from peftlab.cli import main

INPUT = torch.tensor([[5, 17, 99, 3, 200, 42, 7, 8]])


def _train(tiny_dir, tmp_path, pairs, method, steps=8, **training):
    model, tokenizer = load_model(str(tiny_dir))
    config = TrainConfig(model=str(tiny_dir), method=method,
                         training={"output_dir": str(tmp_path / "run"), "max_steps": steps, "learning_rate": 2e-2,
                                   "logging_steps": 1, "per_device_train_batch_size": 3, **training})
    return train(config, model, tokenizer, train_data=pairs)


@torch.no_grad()
def _logits(model):
    return model(input_ids=INPUT).logits


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "lora", "r": 4, "use_dora": True},
                                    {"name": "ia3"}])
def test_plain_peft_loads_the_module_with_equal_logits(tiny_dir, tmp_path, pairs, method):
    result = _train(tiny_dir, tmp_path, pairs, method)
    ours = _logits(result.model)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    plain = peft.PeftModel.from_pretrained(base, result.module_dir).eval()
    assert_close(_logits(plain), ours, "plain peft vs peftlab")
    # training really moved the adapter: the module's logits differ from the base model's
    assert (_logits(AutoModelForCausalLM.from_pretrained(tiny_dir)) - ours).abs().max().item() > 1e-3
    reloaded = load(result.module_dir, load_model(str(tiny_dir))[0])
    assert torch.equal(_logits(reloaded), ours)  # the same tensors read back, the same forward


def test_saved_module_folder_is_peft_plus_manifest(tiny_dir, tmp_path, pairs):
    result = _train(tiny_dir, tmp_path, pairs, {"name": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]})
    names = {p.name for p in result.module_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "peftlab.json"} <= names
    manifest = json.loads((result.module_dir / "peftlab.json").read_text())
    adapter = manifest["adapters"]["default"]
    assert manifest["format_version"] == 2 and adapter["method"] == "lora" and adapter["config"]["r"] == 2
    assert adapter["path"] == "."
    assert manifest["base_model"] == str(tiny_dir)
    info = read_info(result.module_dir)
    expected = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert info.trainable_parameters == expected == 2 * 2 * (2 * 64 + 64 + 32)  # q: 64->64, v: 64->32


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "ia3"}])
def test_merge_output_is_a_plain_model_with_the_same_logits(tiny_dir, tmp_path, pairs, method):
    result = _train(tiny_dir, tmp_path, pairs, method)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(result.module_dir), "-o", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    assert_close(_logits(merged), _logits(result.model), "merged vs unmerged")
    with pytest.raises(FileExistsError, match="already exists"):
        merge(result.module_dir, out)


def test_training_lowers_the_loss(tiny_dir, tmp_path, pairs):
    result = _train(tiny_dir, tmp_path, pairs, {"name": "lora", "r": 8}, steps=30)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["data"]["examples"] == len(pairs)


def test_resume_continues_the_step_count(tiny_dir, tmp_path, pairs):
    first = _train(tiny_dir, tmp_path, pairs, {"name": "lora", "r": 4}, steps=6, save_strategy="steps",
                   save_steps=3)
    assert (tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors").exists()
    # A checkpoint whose save was cut short (no trainer_state.json, written last) must be skipped.
    (tmp_path / "run" / "checkpoint-9").mkdir()
    model, tokenizer = load_model(str(tiny_dir))
    config = TrainConfig(model=str(tiny_dir), method={"name": "lora", "r": 4}, overwrite=True,
                         training={"output_dir": str(tmp_path / "run"), "max_steps": 10, "learning_rate": 2e-2,
                                   "logging_steps": 1, "per_device_train_batch_size": 3,
                                   "resume_from_checkpoint": True})
    second = train(config, model, tokenizer, train_data=pairs)
    logged = [(h["step"], h["loss"]) for h in second.log_history if "loss" in h]
    first_logged = [(h["step"], h["loss"]) for h in first.log_history if "loss" in h]
    # the history of steps 1-6 comes back from checkpoint-6 and training goes on from step 7
    assert [step for step, _ in logged] == list(range(1, 11))
    assert logged[:6] == first_logged
    # ... from the checkpoint's adapter, not from a fresh one
    assert logged[6][1] < first_logged[0][1]


def test_existing_output_is_not_overwritten_unless_asked(tiny_dir, tmp_path, pairs):
    result = _train(tiny_dir, tmp_path, pairs, {"name": "lora", "r": 2}, steps=1)
    before = (result.module_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        _train(tiny_dir, tmp_path, pairs, {"name": "lora", "r": 2}, steps=1)
    assert (result.module_dir / "adapter_model.safetensors").read_bytes() == before


def test_unknown_method_setting_names_the_key(tiny_dir, tmp_path, pairs):
    with pytest.raises(ValueError, match="rank"):
        _train(tiny_dir, tmp_path, pairs, {"name": "lora", "rank": 4}, steps=1)


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny_dir, pairs, assert_packed_equals_padded):
    model, tokenizer = load_model(str(tiny_dir))
    wrapped = attach(model, "lora", {"r": 4})
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    assert_packed_equals_padded(wrapped, tokenizer, pairs)


def test_example_mean_loss_weighs_every_example_the_same(tiny_dir, pairs):
    from peftlab import load_records
    from peftlab.data import Collator, encode
    from peftlab.training import example_mean_loss

    model, tokenizer = load_model(str(tiny_dir))
    records = pairs[:2] + [{"prompt": "long", "response": "x" * 40}]
    features, _ = encode(load_records(records), tokenizer)
    with torch.no_grad():
        per_example = [model(**Collator(tokenizer.pad_token_id)([f])).loss for f in features]
        padded = Collator(tokenizer.pad_token_id)(features)
        packed = Collator(tokenizer.pad_token_id, pack=True)(features)
        expected = torch.stack(per_example).mean()
        assert_close(example_mean_loss(model(**padded).logits, padded["labels"]), expected, "padded")
        packed_loss = example_mean_loss(model(**packed).logits, packed["labels"], packed["position_ids"])
        assert_close(packed_loss, expected, "packed")
        assert abs(model(**padded).loss - expected) > 1e-3  # the token mean is a different number


@pytest.mark.parametrize("method", ["lora", "ia3", "bitune"])
def test_attaching_raises_no_deprecation_warning(method):
    import warnings

    from peftlab import tiny_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach(tiny_model()[0], method)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], \
        [str(w.message) for w in caught]


def test_a_trainer_checkpoint_records_the_prompt_format_it_trained_with(tiny_dir, tmp_path, pairs):
    """A checkpoint loaded for inference or served renders prompts as training did, not with the default format."""
    from peftlab import DataConfig

    model, tokenizer = load_model(str(tiny_dir))
    data = DataConfig(template="plain", plain_format="Q: {prompt}\nA:", system_prompt=None)
    config = TrainConfig(model=str(tiny_dir), method={"name": "lora", "r": 2}, data=data,
                         training={"output_dir": str(tmp_path / "run"), "max_steps": 2, "save_strategy": "steps",
                                   "save_steps": 1, "per_device_train_batch_size": 3})
    train(config, model, tokenizer, train_data=pairs)
    assert read_info(tmp_path / "run" / "checkpoint-1").prompt_format == data.prompt_format


def test_a_merge_that_overflows_its_dtype_is_refused_and_writes_nothing(tiny_dir, tmp_path):
    from peftlab import save
    from peftlab.module import ModuleError

    wrapped = attach(load_model(str(tiny_dir))[0], "lora", {"r": 2})
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.fill_(300.0)  # ΔW = 8 · 2 · 300² = 1.4e6 per entry: finite in float32, inf in float16 (max 65504)
    save(wrapped, tmp_path / "m")
    merge(tmp_path / "m", tmp_path / "fp32")  # float32 holds it
    with pytest.raises(ModuleError, match=r"is not finite in torch\.float16"):
        merge(tmp_path / "m", tmp_path / "fp16", dtype="float16")
    assert not (tmp_path / "fp16").exists()

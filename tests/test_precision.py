"""Half precision on the CPU: every method trains in bf16, saves, loads onto a bf16 base and generates; fp16 gradients
are clipped after the loss scale comes off.

What users run on a GPU (a bf16 base with ``training.bf16: true``), here on the CPU, which has bf16 kernels and
autocast too. The trained parts stay float32 on a bf16 base, as peft keeps its adapters.
"""

import math

import pytest
import torch
from transformers import TrainingArguments

from floats import assert_close
from peftlab import TrainConfig, generate, load, load_model, load_records, read, tiny_model, train
from peftlab.data import Collator, encode
from peftlab.methods import get_method
from peftlab.methods.multilora.config import MultiLoraConfig
from peftlab.training import _Trainer
from test_protocol import SETTINGS

BFLOAT16 = 5e-2
"""Relative tolerance between a bf16 and a float32 run of the same weights: bf16 keeps 8 bits (eps ~ 7.8e-3); each
rounding of an activation moves it by up to half of that, and a logit is the end of a few dozen such roundings
(measured on the tiny models: ~1e-2 of the largest logit)."""


def _records(method: str, pairs: list[dict]) -> list[dict]:
    return [{**p, "adapter": "default"} for p in pairs] if method == "multilora" else pairs


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_every_method_trains_in_bf16_and_generates_from_its_saved_module(method, tiny_dir, tmp_path, pairs):
    model, tokenizer = load_model(str(tiny_dir), dtype="bfloat16")
    config = TrainConfig(model=str(tiny_dir), dtype="bfloat16", method={"name": method, **SETTINGS[method]},
                         training={"output_dir": str(tmp_path / "run"), "max_steps": 3, "learning_rate": 2e-2,
                                   "logging_steps": 1, "per_device_train_batch_size": 6, "bf16": True,
                                   "use_cpu": True})
    result = train(config, model, tokenizer, train_data=_records(method, pairs))
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    saved = read(result.module_dir).tensors["default"]
    assert {t.dtype for t in saved.values()} == {torch.float32}  # trained and saved in float32 on the bf16 base

    base, tokenizer = load_model(str(tiny_dir), dtype="bfloat16")
    loaded = load(result.module_dir, base)
    assert loaded.causal_lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {t.dtype for t in loaded.adapter_state_dict().values()} == {torch.float32}
    adapters = {"adapters": ["default"] * 2} if method == "multilora" else {}
    answers = generate(loaded, tokenizer, ["repeat red", "repeat dog"], max_new_tokens=4, **adapters)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    ids = tokenizer(["repeat red"], return_tensors="pt")["input_ids"]
    fields = {"adapter_names": ["default"], "adapter_index": torch.tensor([0])} if method == "multilora" else \
        {"prompt_lengths": torch.tensor([ids.shape[1] - 1])}
    with torch.no_grad():
        half = loaded(input_ids=ids, **fields).logits
        full = load(result.module_dir, load_model(str(tiny_dir))[0])(input_ids=ids, **fields).logits
    assert half.dtype == torch.bfloat16
    assert_close(half.float(), full, f"{method}: bf16 vs float32 logits", rel=BFLOAT16)


def test_multilora_clips_gradients_after_the_fp16_loss_scale_comes_off(tmp_path, pairs):
    """With fp16 the GradScaler multiplies the loss (so the gradients) by a large factor; a method's own clipping must
    see the true gradients. On a GPU accelerate makes that scaler; the CPU gets none, so the test gives the Trainer's
    accelerator the one it would have there."""
    model, tokenizer = tiny_model()
    wrapped = get_method("multilora").attach_many(model, dict.fromkeys("ab", MultiLoraConfig(r=2))).train()
    with torch.no_grad():
        for layer in wrapped.lora_layers.values():
            layer.lora_B.normal_()
    features, _ = encode(load_records([{**p, "adapter": a} for a in "ab" for p in pairs]), tokenizer)
    batch = Collator(tokenizer.pad_token_id)(features)
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    wrapped(**batch).loss.backward()
    true = [p.grad.clone() for p in trained]
    true_norm = torch.stack([g.norm() for g in true]).norm()
    assert 1 < true_norm < 1e3  # a clip at 1e3 leaves the true gradients as they are, and 4096 times them not

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", max_grad_norm=1e3, fp16=True)
    trainer = _Trainer(model=wrapped, args=args, train_dataset=[], loss="token")
    trainer.create_optimizer()
    accelerator = trainer.accelerator
    accelerator.native_amp, accelerator._optimizers = True, [trainer.optimizer]
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    wrapped.zero_grad()
    accelerator.scaler.scale(wrapped(**batch).loss).backward()
    assert_close(trainer._clip_grad_norm(wrapped), true_norm, "the norm that clipping saw")
    for p, want in zip(trained, true, strict=True):
        assert_close(p.grad, want, "a gradient after unscaling and clipping")

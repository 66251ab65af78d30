import json

import pytest
import torch
from transformers import DynamicCache

from floats import assert_close
from peftlab import load_records
from peftlab.adapters import attach, load, save
from peftlab.cli import main
from peftlab.data import Collator, encode
from peftlab.generation import generate
from peftlab.methods import cache_arg
from peftlab.methods.base import CHECKPOINTING
from peftlab.methods.bitune import VARIANTS, BituneConfig, bidirectional_mask
from peftlab.models import load_model, tiny_model
from peftlab.module import read_info
from peftlab.training import DataConfig, TrainConfig, train

ARCHITECTURES = ["llama", "qwen2", "gemma2"]  # the rest: tests/test_architectures.py


def _bitune(arch="llama", adapter=None, randomise=True, **settings):
    """A Bitune model whose adapters (and mix) are random, so every part changes the output."""
    model, tokenizer = tiny_model(arch=arch)
    wrapped = attach(model, "bitune", {"adapter": adapter or {"name": "lora", "r": 4}, **settings}).eval()
    if randomise:
        torch.manual_seed(3)
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "mixer" in name:
                torch.nn.init.normal_(p, std=0.2 if "lora_B" in name else 0.02)
    return wrapped, tokenizer


def _features(tokenizer):
    records = [{"prompt": f"repeat the word {w}" + " again" * k, "response": f"{w} {w}"}
               for k, w in enumerate(("red", "blue", "green"))]
    return encode(load_records(records), tokenizer)[0]


def _answer_start(feature):
    return next(i for i, label in enumerate(feature["labels"]) if label != -100) - 1  # the last prompt token


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_logits_and_loss_equal_per_example(arch, side):
    wrapped, tokenizer = _bitune(arch)
    features = _features(tokenizer)
    collate = Collator(tokenizer.pad_token_id, side)
    with torch.no_grad():
        batch = collate(features)
        batched = wrapped(**batch)
        width = batch["input_ids"].shape[1]
        losses, counts = [], []
        for i, f in enumerate(features):
            alone = wrapped(**collate([f]))
            n, start = len(f["input_ids"]), _answer_start(f)
            offset = width - n if side == "left" else 0
            got = batched.logits[i, offset + start:offset + n]
            assert_close(got, alone.logits[0, start:n], f"row {i} batched vs alone")
            losses.append(alone.loss)
            counts.append(sum(label != -100 for label in f["labels"]))
        token_mean = sum(loss * c for loss, c in zip(losses, counts, strict=True)) / sum(counts)
        assert_close(batched.loss, token_mean, "batched loss vs the token mean of the losses alone")


def test_every_trainable_part_gets_a_gradient():
    wrapped, tokenizer = _bitune()
    wrapped.train()
    wrapped(**Collator(tokenizer.pad_token_id)(_features(tokenizer))).loss.backward()
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any(".bidir." in n for n in trainable) and any(".default." in n for n in trainable)
    assert {n for n in trainable if "mixer" in n} == {"mixer.key_weight", "mixer.value_weight"}
    last = f"layers.{wrapped.causal_lm.config.num_hidden_layers - 1}."
    for name, p in trainable.items():
        if ".bidir." in name and last in name and not any(kv in name for kv in ("k_proj", "v_proj")):
            assert p.grad is None  # the last layer's keys/values do not depend on its query, output or MLP
            continue
        assert p.grad is not None and (p.grad != 0).any(), name
        if "mixer" in name:
            assert (p.grad != 0).all(), name  # every layer's key and value coefficient


def _manual_greedy(model, prompt, steps):
    """Reference without a cache or generate(): the whole sequence re-read each step, the prompt length given."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), prompt_lengths=torch.tensor([len(prompt)])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def _left_padded(rows, pad):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, width


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_generate_equals_a_manual_greedy_loop(arch):
    wrapped, tokenizer = _bitune(arch)
    torch.manual_seed(1)
    rows = [torch.randint(0, 250, (n,)).tolist() for n in (3, 9, 6)]
    ids, mask, width = _left_padded(rows, tokenizer.pad_token_id)
    out = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    for i, r in enumerate(rows):
        assert out[i, width:].tolist() == _manual_greedy(wrapped, r, 6)


def test_inputs_that_reach_a_sliding_window_are_refused():
    model, tokenizer = tiny_model(arch="gemma2", sliding_window=6)
    wrapped = attach(model, "bitune", {"adapter": {"r": 4}})
    wrapped.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=2)  # inside the window: fine
    with pytest.raises(ValueError, match="sliding attention window"):
        wrapped.generate(input_ids=torch.tensor([[3, 4, 5, 6, 7, 8, 9]]), max_new_tokens=2)


def test_beams_and_sampling_in_batches():
    wrapped, tokenizer = _bitune()
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ids, mask, width = _left_padded(rows, tokenizer.pad_token_id)
    settings = {"max_new_tokens": 4, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    beams = wrapped.generate(input_ids=ids, attention_mask=mask, num_beams=3, do_sample=False, **settings)
    for i, r in enumerate(rows):
        alone = wrapped.generate(input_ids=torch.tensor([r]), num_beams=3, do_sample=False, **settings)
        assert beams[i, width:].tolist() == alone[0, len(r):].tolist()
    sampled = wrapped.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=1, num_return_sequences=2,
                               **settings)  # top_k=1: every sample is the greedy answer of its own prompt
    for i, r in enumerate(rows):
        greedy = wrapped.generate(input_ids=torch.tensor([r]), do_sample=False, **settings)[0, len(r):].tolist()
        assert sampled[2 * i, width:].tolist() == sampled[2 * i + 1, width:].tolist() == greedy
    with pytest.raises(ValueError, match="left-padded"):
        wrapped.generate(input_ids=ids.flip(1), attention_mask=mask.flip(1), **settings)


def test_prompt_is_read_once_and_decoding_is_the_plain_model():
    wrapped, _ = _bitune()
    lengths = []
    wrapped.causal_lm.model.layers[0].register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    wrapped.generate(input_ids=torch.tensor([[3, 4, 5, 6, 7]]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert lengths == [4, 4, 1, 1, 1, 1]  # two prompt passes over 4 tokens, then one token per call


def test_base_model_when_the_mix_gives_the_bidirectional_pass_no_weight():
    wrapped, tokenizer = _bitune(randomise=False)
    base, _ = tiny_model()
    features = _features(tokenizer)
    batch = Collator(tokenizer.pad_token_id)(features)
    with torch.no_grad():
        wrapped.mixer.key_weight.zero_()
        wrapped.mixer.value_weight.zero_()
        got = wrapped(**batch).logits
        want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, f in enumerate(features):
        start, n = _answer_start(f), len(f["input_ids"])
        assert_close(got[i, start:n], want[i, start:n], f"row {i} vs the base model")


def test_initial_model_continues_on_a_half_causal_half_bidirectional_cache():
    """Fresh adapters change nothing, but the initial 50/50 mix does (the paper's initial state): the answer runs
    on the average of the base model's causal and bidirectional keys/values, computed here by hand."""
    wrapped, _ = _bitune(randomise=False)
    base, _ = tiny_model()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    prompt = 5
    with torch.no_grad():
        got = wrapped(input_ids=ids, prompt_lengths=torch.tensor([prompt])).logits[0, prompt - 1:]
        pre = ids[:, :prompt - 1]
        causal = base(input_ids=pre, use_cache=True).past_key_values
        bidir = base(input_ids=pre, attention_mask=torch.zeros(1, 1, prompt - 1, prompt - 1),
                     use_cache=True).past_key_values
        mixed = DynamicCache(ddp_cache_data=[((c.keys + b.keys) / 2, (c.values + b.values) / 2)
                                             for c, b in zip(causal.layers, bidir.layers, strict=True)])
        want = base(input_ids=ids[:, prompt - 1:], **{cache_arg(base): mixed}).logits[0]
        plain = base(input_ids=ids).logits[0, prompt - 1:]
    assert_close(got, want, "vs the hand-mixed cache")
    assert (got - plain).abs().max() > 1e-3


def test_bidirectional_mask_lets_every_token_see_every_real_token():
    mask = bidirectional_mask(torch.tensor([[0, 1, 1]]), torch.float32)[0, 0]
    blocked = torch.finfo(torch.float32).min
    assert mask.tolist() == [[0, 0, 0], [blocked, 0, 0], [blocked, 0, 0]]  # the pad sees itself only


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_ablation_reads_the_prompt_as_it_says(variant):
    """Early prompt keys depend on later prompt tokens exactly when some pass is bidirectional; only the adapters
    the variant uses are created and trained."""
    wrapped, tokenizer = _bitune(variant=variant)
    config = BituneConfig(variant=variant)
    assert (wrapped.mixer is not None) == (len(config.passes) == 2)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        first = wrapped.encode_prompt(ids, torch.ones_like(ids), torch.arange(5)[None]).layers[1].keys[..., 0, :]
        ids[0, -1] = 9
        changed = wrapped.encode_prompt(ids, torch.ones_like(ids), torch.arange(5)[None]).layers[1].keys[..., 0, :]
    bidirectional = any(b for _, b in config.passes)
    assert ((first - changed).abs().max() > 1e-4) == bidirectional
    wrapped.train()
    wrapped(**Collator(tokenizer.pad_token_id)(_features(tokenizer))).loss.backward()
    adapters = {n.split(".")[-2] for n, p in wrapped.named_parameters() if p.requires_grad and "lora" in n}
    assert adapters == set(config.adapters)
    for part in [*config.adapters, *(["mixer"] if wrapped.mixer is not None else [])]:
        grads = [p.grad for n, p in wrapped.named_parameters() if part in n.split(".") and p.grad is not None]
        assert grads and any((g != 0).any() for g in grads), part


@pytest.mark.parametrize("adapter", [{"name": "lora", "r": 4, "use_dora": True}, {"name": "ia3"}])
def test_dora_and_ia3_adapters(adapter):
    wrapped, tokenizer = _bitune(adapter=adapter, randomise=False)
    wrapped.train()
    wrapped(**Collator(tokenizer.pad_token_id)(_features(tokenizer))).loss.backward()
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad and p.grad is not None]
    key = "ia3_l" if adapter["name"] == "ia3" else "lora_magnitude_vector"
    assert any(key in n and ".bidir" in n for n in names) and any(key in n and ".default" in n for n in names)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="variant"):
        BituneConfig(variant="bidir")
    with pytest.raises(ValueError, match="adapter.name"):
        BituneConfig(adapter={"name": "loreft"})
    wrapped, _ = _bitune()
    with pytest.raises(ValueError, match="where each prompt ends"):
        wrapped(input_ids=torch.tensor([[3, 4, 5]]))


def test_flash_attention_is_refused_with_the_reason():
    model, _ = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D attention mask, which flash_attention_2 does not take.*sdpa"):
        attach(model, "bitune", {"adapter": {"r": 4}})


def _train(tiny_dir, tmp_path, pairs, steps, name="run", method=None, **training):
    model, tokenizer = load_model(str(tiny_dir))
    config = TrainConfig(model=str(tiny_dir), method=method or {"name": "bitune", "adapter": {"r": 4}},
                         overwrite=True, training={"output_dir": str(tmp_path / name), "max_steps": steps,
                                                   "learning_rate": 1e-2, "logging_steps": 1,
                                                   "per_device_train_batch_size": 3, **training})
    return train(config, model, tokenizer, train_data=pairs)


def test_training_lowers_the_loss_and_the_module_round_trips(tiny_dir, tmp_path, pairs, capsys):
    result = _train(tiny_dir, tmp_path, pairs, steps=40)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    folder = result.module_dir
    assert (folder / "adapter_model.safetensors").exists() and (folder / "bidir" / "adapter_model.safetensors").exists()
    info = read_info(folder)
    assert info.method == "bitune" and "bitune.safetensors:mixer.key_weight" in info.tensors
    assert any(k.startswith("bidir/") for k in info.tensors)
    assert (result.model.mixer.key_weight != 0.01).all()  # the mix was trained
    restored = load(folder, load_model(str(tiny_dir))[0])
    _, tokenizer = load_model(str(tiny_dir))
    batch = Collator(tokenizer.pad_token_id)(_features(tokenizer))
    with torch.no_grad():
        assert torch.equal(restored(**batch).logits, result.model(**batch).logits)  # same tensors, same forward
    ids = torch.tensor([[5, 6, 7, 8]])
    settings = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None}
    assert restored.generate(input_ids=ids, **settings).equal(result.model.generate(input_ids=ids, **settings))
    capsys.readouterr()
    assert main(["generate", "--adapter", str(folder), "--max-new-tokens", "4", "--json", "repeat red"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]["answer"]
    assert answer == generate(restored, tokenizer, ["repeat red"], info.prompt_format, max_new_tokens=4)[0]


def test_resume_restores_both_adapters_and_the_mix(tiny_dir, tmp_path, pairs):
    first = _train(tiny_dir, tmp_path, pairs, steps=4, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "bitune.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    second = _train(tiny_dir, tmp_path, pairs, steps=6, resume_from_checkpoint=True)
    logged = [(h["step"], h["loss"]) for h in second.log_history if "loss" in h]
    assert [s for s, _ in logged] == list(range(1, 7))
    assert logged[:4] == [(h["step"], h["loss"]) for h in first.log_history if "loss" in h]


def test_gradient_checkpointing_is_refused_with_the_reason(tiny_dir, tmp_path, pairs):
    with pytest.raises(ValueError, match="activation checkpointing"):
        _train(tiny_dir, tmp_path, pairs, steps=1, **{CHECKPOINTING: True})


def test_packing_is_refused(tiny_dir, tmp_path, pairs):
    from peftlab.config import ConfigError

    model, tokenizer = load_model(str(tiny_dir))
    config = TrainConfig(model=str(tiny_dir), method="bitune", data=DataConfig(pack=True),
                         training={"output_dir": str(tmp_path / "p"), "max_steps": 1})
    with pytest.raises(ConfigError, match="one example per row"):
        train(config, model, tokenizer, train_data=pairs)


def test_save_refuses_a_mixer_that_does_not_fit(tmp_path):
    wrapped, _ = _bitune()
    save(wrapped, tmp_path / "m")
    with pytest.raises(ValueError, match="do not fit"):
        load(tmp_path / "m", tiny_model(num_layers=3)[0])


def test_lm_eval_loglikelihood_reads_the_context_as_the_prompt():
    pytest.importorskip("lm_eval")
    from peftlab.evals.lm_eval_bridge import PeftlabLM

    wrapped, tokenizer = _bitune()
    lm = PeftlabLM(wrapped, tokenizer, batch_size=2)

    class Request:
        def __init__(self, *args):
            self.args = args

    (lp, _), (other, _) = lm.loglikelihood([Request("abc", "de"), Request("a much longer context", "x")])
    ids = tokenizer("abcde", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = wrapped(input_ids=torch.tensor([ids]), prompt_lengths=torch.tensor([3])).logits[0].log_softmax(-1)
    assert_close(lp, (logits[2, ids[3]] + logits[3, ids[4]]).item(), "lm-eval's log-likelihood vs direct")
    assert_close(lm.loglikelihood([Request("a much longer context", "x")])[0][0], other, "alone vs in a batch of 2")

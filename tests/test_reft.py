"""ReFT: interventions equal their formulas, positions, hooks, batching, generation, save/load, training."""

import pytest
import torch

from floats import assert_close
from peftlab import TrainConfig, attach, load, load_model, load_records, save, tiny_model, train
from peftlab.adapters import parameter_report
from peftlab.data import Collator, encode
from peftlab.methods.base import CHECKPOINTING
from peftlab.methods.reft.config import parse_positions
from peftlab.methods.reft.layer import INTERVENTIONS
from peftlab.methods.reft.model import position_masks, prompt_spans

D, R = 64, 4


def _rand_params(iv):
    with torch.no_grad():
        for name, p in iv.named_parameters():
            if "rotate_layer" not in name:
                p.normal_()


@pytest.mark.parametrize("kind", sorted(INTERVENTIONS))
@pytest.mark.parametrize("act", ["linear", "relu"])
def test_each_intervention_equals_its_formula(kind, act):
    torch.manual_seed(0)
    iv = INTERVENTIONS[kind](D, R, act=act).eval()
    _rand_params(iv)
    h = torch.randn(3, 5, D)
    f = torch.relu if act == "relu" else (lambda x: x)
    if hasattr(iv, "rotate_layer"):
        rot = iv.rotate_layer.weight.T  # R: [r, d], orthonormal rows
    if kind in ("loreft", "direft_orth"):
        w, b = iv.learned_source.weight, iv.learned_source.bias
        source = f(h @ w.T + b)
        expected = h + (source - h @ rot.T) @ rot if kind == "loreft" else h + source @ rot
    elif kind in ("noreft", "direft"):
        w1, b1, w2 = iv.learned_source.weight, iv.learned_source.bias, iv.proj_layer.weight
        source = f(h @ w1.T + b1)
        expected = h + (source - h @ w2.T) @ w2 if kind == "noreft" else h + source @ w2
    elif kind == "consreft":
        expected = h + (iv.learned_source - h @ rot.T) @ rot
    else:  # lobireft
        expected = h + iv.learned_source @ rot
    assert_close(iv(h), expected, f"{kind} vs its formula")


def test_trainable_parameters_in_the_papers_terms():
    model, _ = tiny_model()
    wrapped = attach(model, "loreft", {"layers": [0, 1], "rank": R, "positions": "f1+l1", "share_weights": False})
    report = parameter_report(wrapped)
    assert report["interventions"] == 4
    assert report["trainable_parameters"] == 4 * (2 * D * R + R)
    assert report["trainable_parameters"] == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    base = sum(p.numel() for p in tiny_model()[0].parameters())
    assert report["base_parameters"] == base
    assert report["trainable_percent"] == pytest.approx(100 * 4 * (2 * D * R + R) / base)


def test_positions_parse_and_masks():
    assert parse_positions("f7+l7") == (7, 7) and parse_positions("l1") == (0, 1) and parse_positions("f3") == (3, 0)
    with pytest.raises(ValueError, match="positions"):
        parse_positions("last")
    # row 0: right-padded prompt of 6 then 2 answer tokens; row 1: left-padded, prompt of 3 (short: f1+l2 rule)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    labels = torch.full_like(mask, -100)
    labels[0, 6:8] = 5
    labels[1, 8:10] = 5
    prompts = torch.tensor([6, 3])  # where the labels begin
    m = position_masks(*prompt_spans(mask, None, prompts, mask.shape), first=2, last=2, every_token=False)
    assert m["first"][0].nonzero().flatten().tolist() == [0, 1]
    assert m["last"][0].nonzero().flatten().tolist() == [4, 5]
    assert m["first"][1].nonzero().flatten().tolist() == [5]  # n=3 < 4: first=min(2, 1), last=min(2, 2)
    assert m["last"][1].nonzero().flatten().tolist() == [6, 7]
    every = position_masks(*prompt_spans(mask, None, prompts, mask.shape), first=0, last=1, every_token=True)
    assert every["last"][0].nonzero().flatten().tolist() == [5, 6, 7]
    assert every["all"][1].nonzero().flatten().tolist() == [7, 8, 9]
    no_labels = position_masks(*prompt_spans(mask, None, None, mask.shape), first=0, last=1, every_token=False)
    assert no_labels["all"].nonzero().tolist() == [[0, 7], [1, 9]]
    # pyreft's dataset helpers: the last positions end one token early (last_position = n - 1), and its short-prompt
    # rule counts that shorter prompt (row 1: n - 1 = 2, so first = last = min(2, 1) = 1)
    early = position_masks(*prompt_spans(mask, None, prompts, mask.shape), first=2, last=2, every_token=False,
                           short_prompts="pyreft", end_offset=1)
    assert early["last"][0].nonzero().flatten().tolist() == [3, 4] and early["first"][0].sum() == 2
    assert early["first"][1].nonzero().flatten().tolist() == [5]
    assert early["last"][1].nonzero().flatten().tolist() == [6]
    every_early = position_masks(*prompt_spans(mask, None, prompts, mask.shape), first=0, last=1, every_token=True,
                                 end_offset=1)
    assert every_early["last"][0].nonzero().flatten().tolist() == [4, 6, 7]  # generated tokens still join


@pytest.mark.parametrize(("n", "positions", "paper", "pyreft"), [
    (1, "l1", (0, 1), (0, 0)),  # pyreft: a one-token prompt gets no intervention
    (3, "f2+l2", (1, 2), (1, 1)),
    (4, "f3+l1", (3, 1), (2, 1)),
    (5, "f3+l1", (3, 1), (2, 1)),
    (8, "f3+l3", (3, 3), (3, 3)),
])
def test_short_prompts_follow_the_paper_or_pyreft(n, positions, paper, pyreft):
    first, last = parse_positions(positions)
    mask = torch.ones(1, n, dtype=torch.long)
    spans = prompt_spans(mask, None, torch.tensor([n]), mask.shape)
    for rule, (p, s) in (("paper", paper), ("pyreft", pyreft)):
        m = position_masks(*spans, first=first, last=last, every_token=False, short_prompts=rule)
        assert m["first"][0].nonzero().flatten().tolist() == list(range(p)), rule
        assert m["last"][0].nonzero().flatten().tolist() == list(range(n - s, n)), rule


def test_hidden_states_are_the_intervened_ones_whenever_transformers_hooked_the_layers():
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    settings = {"layers": [0], "positions": "l1", "rank": R}
    fresh = attach(tiny_model()[0], "loreft", settings).eval()
    used, _ = tiny_model()
    used(input_ids=ids, output_hidden_states=True)  # transformers installs its capture hooks on this call
    late = attach(used, "loreft", settings).eval()
    for a, b in zip(fresh.interventions.values(), late.interventions.values(), strict=True):
        _rand_params(a)
        b.load_state_dict(a.state_dict())
    with torch.no_grad():
        want = fresh(input_ids=ids, output_hidden_states=True).hidden_states
        got = late(input_ids=ids, output_hidden_states=True).hidden_states
        base = tiny_model()[0](input_ids=ids, output_hidden_states=True).hidden_states
    assert (want[1] - base[1]).abs().max() > 1e-3  # the intervention changes layer 0's output
    for w, g in zip(want, got, strict=True):  # the same weights, the same forward
        assert torch.equal(w, g)


def _reft(kind="loreft", **settings):
    model, tokenizer = tiny_model()
    config = {"layers": [0, 1], "positions": "f2+l2", "share_weights": False, "rank": R, **settings}
    wrapped = attach(model, kind, config).eval()
    for iv in wrapped.interventions.values():
        _rand_params(iv)
    return wrapped, tokenizer


def _rows():
    torch.manual_seed(1)
    return [torch.randint(0, 250, (n,)).tolist() for n in (3, 9, 6)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_logits_equal_per_example_logits(side):
    wrapped, tokenizer = _reft()
    rows = _rows()
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (width - len(r))
        ids.append(fill + r if side == "left" else r + fill)
        mask.append([0] * len(fill) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(fill))
    with torch.no_grad():
        batched = wrapped(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
        for i, r in enumerate(rows):
            alone = wrapped(input_ids=torch.tensor([r])).logits[0]
            got = batched[i, width - len(r):] if side == "left" else batched[i, :len(r)]
            assert_close(got, alone, f"row {i} batched vs alone")


def test_intervention_changes_only_the_chosen_positions_and_later_ones():
    wrapped, _ = _reft(layers=[1], positions="l1")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        out = wrapped(input_ids=ids).logits
        base = wrapped.unload()(input_ids=ids).logits
    assert (out[0, :4] - base[0, :4]).abs().max() == 0  # causal: positions before the last are untouched
    assert (out[0, 4] - base[0, 4]).abs().max() > 1e-4


def test_dropout_only_in_training_and_eval_is_deterministic():
    wrapped, _ = _reft(dropout=0.5, positions="f3+l3")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = wrapped(input_ids=ids).logits, wrapped(input_ids=ids).logits
        assert torch.equal(a, b)
        wrapped.train()
        c, d = wrapped(input_ids=ids).logits, wrapped(input_ids=ids).logits
    assert not torch.equal(c, d)
    assert all(iv.training for iv in wrapped.interventions.values())


def test_hooks_leave_other_hooks_and_hidden_states_alone():
    wrapped, _ = _reft()
    seen = []
    wrapped.model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(1))
    ids = torch.tensor([[3, 4, 5, 6]])
    out = wrapped(input_ids=ids, output_hidden_states=True)
    wrapped.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    again = wrapped(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == len(again.hidden_states) == 3
    assert len(seen) == 1 + 2 + 1  # forward, prefill + one decode step, forward


def _manual_greedy(model, prompt, steps):
    """Reference without a KV cache: the whole sequence re-read each step, the prompt length given."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), prompt_lengths=torch.tensor([len(prompt)])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("mode", ["prompt", "every_token"])
def test_generate_equals_a_manual_greedy_loop(mode):
    wrapped, tokenizer = _reft(generation=mode)
    rows = _rows()
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=pad, eos_token_id=None)
    for i, r in enumerate(rows):
        assert out[i, width:].tolist() == _manual_greedy(wrapped, r, 6)


def test_prompt_mode_decodes_like_the_base_model_after_the_prompt():
    """In prompt mode the decode steps run untouched: the cost per decoded token is the base model's."""
    wrapped, _ = _reft(generation="prompt")
    calls = []
    for iv in wrapped.interventions.values():
        iv.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
    wrapped.generate(input_ids=torch.tensor([[3, 4, 5, 6, 7]]), max_new_tokens=5, do_sample=False,
                     eos_token_id=None)
    assert calls == [5] * len(wrapped.interventions)  # only the prefill call computed Φ


def test_beams_and_sampling_in_batches():
    wrapped, tokenizer = _reft()
    rows = _rows()
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = (ids != pad).long()
    mask[:, :] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    beams = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False,
                             pad_token_id=pad, eos_token_id=None)
    for i, r in enumerate(rows):
        alone = wrapped.generate(input_ids=torch.tensor([r]), max_new_tokens=4, num_beams=3, do_sample=False,
                                 eos_token_id=None)
        assert beams[i, width:].tolist() == alone[0, len(r):].tolist()
    sampled = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=1,
                               num_return_sequences=2, pad_token_id=pad, eos_token_id=None)
    for i, r in enumerate(rows):  # top_k=1: both samples of each prompt are its greedy answer alone
        greedy = wrapped.generate(input_ids=torch.tensor([r]), max_new_tokens=4, do_sample=False, eos_token_id=None)
        assert sampled[2 * i, width:].tolist() == sampled[2 * i + 1, width:].tolist() == greedy[0, len(r):].tolist()


def test_save_load_restores_every_setting(tmp_path):
    wrapped, _ = _reft("noreft", act="gelu", dropout=0.1, add_bias=True, dtype="bfloat16", positions="f1+l3")
    save(wrapped, tmp_path / "m")
    restored = load(tmp_path / "m", tiny_model()[0])
    assert restored.reft_config == wrapped.reft_config and restored.kind == "noreft"
    iv = next(iter(restored.interventions.values()))
    assert iv.learned_source.weight.dtype == torch.bfloat16 and iv.proj_layer.bias is not None
    assert iv.dropout.p == 0.1
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        # no rotation to re-orthonormalise: the same tensors read back, the same forward
        assert torch.equal(restored(input_ids=ids).logits, wrapped(input_ids=ids).logits)
    with pytest.raises(NotImplementedError, match="cannot be folded into the base weights: an intervention edits"):
        from peftlab.adapters import merge
        merge(tmp_path / "m", tmp_path / "merged", base_model="unused")


def _assert_orthonormal(model, what):
    """Rᵀ R = I up to float32 rounding (R comes out of a QR parametrisation)."""
    for key, iv in model.interventions.items():
        r = iv.rotate_layer.weight.detach()
        assert_close(r.T @ r, torch.eye(R), f"{what}: RᵀR of {key}")


def _train(tiny_dir, tmp_path, pairs, method, steps, name="run", **training):
    model, tokenizer = load_model(str(tiny_dir))
    config = TrainConfig(model=str(tiny_dir), method=method, overwrite=True,
                         training={"output_dir": str(tmp_path / name), "max_steps": steps, "learning_rate": 2e-2,
                                   "logging_steps": 1, "per_device_train_batch_size": 3, **training})
    return train(config, model, tokenizer, train_data=pairs)


def test_rotation_stays_orthonormal_through_training_save_load_and_more_training(tiny_dir, tmp_path, pairs):
    method = {"name": "loreft", "layers": "all", "positions": "f1+l1", "rank": R}
    first = _train(tiny_dir, tmp_path, pairs, method, steps=100)
    losses = [h["loss"] for h in first.log_history if "loss" in h]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    _assert_orthonormal(first.model, "trained")
    reloaded = load(first.module_dir, load_model(str(tiny_dir))[0], trainable=True)
    _assert_orthonormal(reloaded, "reloaded")
    optimizer = torch.optim.AdamW([p for p in reloaded.parameters() if p.requires_grad], lr=2e-2)
    batch = {"input_ids": torch.randint(0, 250, (2, 8))}
    reloaded.train()
    for _ in range(10):
        loss = reloaded(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _assert_orthonormal(reloaded, "trained again")


def test_one_step_moves_both_the_interventions_and_the_lora(pairs):
    model, tokenizer = tiny_model()
    wrapped = attach(model, "loreft", {"layers": [1], "rank": R, "lora": {"r": 2, "target_modules": ["q_proj"]}})
    trained = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    optimizer = torch.optim.SGD(trained.values(), lr=0.1)
    features, _ = encode(load_records(pairs), tokenizer)
    wrapped.train()(**Collator(tokenizer.pad_token_id)(features)).loss.backward()
    optimizer.step()
    moved = {n for n, p in trained.items() if not torch.equal(p, before[n])}
    assert any("interventions" in n for n in moved)
    assert {n for n in trained if "lora_B" in n} <= moved  # lora_A's gradient is 0 while B is 0 (peft's init)
    assert all(trained[n].grad.abs().sum() > 0 for n in trained if "interventions" in n)


def test_reft_with_lora_trains_both_and_round_trips(tiny_dir, tmp_path, pairs):
    method = {"name": "loreft", "layers": [1], "rank": R, "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}
    result = _train(tiny_dir, tmp_path, pairs, method, steps=3)
    moved = {n for n, p in result.model.named_parameters() if p.requires_grad and p.abs().sum() > 0}
    assert any("lora_B" in n for n in moved) and any("interventions" in n for n in moved)
    assert (result.module_dir / "lora" / "adapter_config.json").exists()
    restored = load(result.module_dir, load_model(str(tiny_dir))[0])
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        # R is re-orthonormalised on load: ~1e-7 changes in R
        assert_close(restored(input_ids=ids).logits, result.model(input_ids=ids).logits, "after save -> load")


def test_resume_from_a_small_checkpoint(tiny_dir, tmp_path, pairs):
    method = {"name": "loreft", "layers": [1], "rank": R}
    first = _train(tiny_dir, tmp_path, pairs, method, steps=4, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "reft.safetensors").stat().st_size < 20_000  # the interventions, not the base model
    assert not (checkpoint / "model.safetensors").exists()
    second = _train(tiny_dir, tmp_path, pairs, method, steps=6, resume_from_checkpoint=True)
    logged = [(h["step"], h["loss"]) for h in second.log_history if "loss" in h]
    assert [s for s, _ in logged] == list(range(1, 7))
    assert logged[:4] == [(h["step"], h["loss"]) for h in first.log_history if "loss" in h]


@pytest.mark.parametrize("mode", ["prompt", "every_token"])
def test_packed_rows_give_the_padded_loss_and_gradients(pairs, mode, assert_packed_equals_padded):
    wrapped, tokenizer = _reft(generation=mode, positions="f2+l3")
    assert_packed_equals_padded(wrapped, tokenizer, pairs)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    def grads(checkpointing):
        model, _ = tiny_model()
        wrapped = attach(model, "loreft", {"layers": [0, 1], "positions": "f1+l1", "rank": R}).train()
        if checkpointing:
            getattr(model, f"{CHECKPOINTING}_enable")(**{f"{CHECKPOINTING}_kwargs": {"use_reentrant": reentrant}})
        ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
        labels = ids.clone()
        labels[:, :3] = -100
        wrapped(input_ids=ids, labels=labels, prompt_lengths=torch.tensor([3])).loss.backward()
        return torch.cat([p.grad.flatten() for p in wrapped.interventions.parameters()])

    plain = grads(False)
    assert plain.abs().max() > 1e-3
    assert_close(grads(True), plain, "checkpointed gradients")  # recomputed: sums accumulate in another order


def test_a_seeded_attach_leaves_the_callers_random_stream_alone():
    models = [tiny_model()[0], tiny_model()[0]]
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    first = attach(models[0], "loreft", {"layers": [0], "rank": R, "seed": 7})
    assert torch.equal(torch.rand(3), want)  # the seed drew the interventions, then the stream went on as before
    second = attach(models[1], "loreft", {"layers": [0], "rank": R, "seed": 7})
    assert all(torch.equal(a, b) for a, b in zip(first.adapter_state_dict().values(),
                                                 second.adapter_state_dict().values(), strict=True))
    with pytest.raises(KeyError, match="no adapter 'other'"):
        first.adapter_state_dict("other")

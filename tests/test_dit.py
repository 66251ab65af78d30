"""DIT: per-example diffs and one shared adapter in one batch equal peft running the two LoRAs per example; the
pipeline runs end to end through the CLI; explain reads LoRAs of its own base model only."""

import json
from pathlib import Path

import peft
import pytest
import torch

from floats import assert_close
from peftlab import attach, save, tiny_model
from peftlab.cli import main
from peftlab.data import Collator
from peftlab.methods.multilora import MultiLoraConfig
from peftlab.methods.multilora.model import layer_shapes, zero_padded
from peftlab.module import ModuleError
from peftlab.recipes.dit.data import TopicData, build, first_sentences, slug
from peftlab.recipes.dit.diffs import Diffs
from peftlab.recipes.dit.evaluate import chance, score
from peftlab.recipes.dit.explain import explain

DIFFS = {f"topic{i}": MultiLoraConfig(r=1 + i % 2, alpha=1, target_modules="all-linear") for i in range(4)}
SHARED = MultiLoraConfig(r=4, alpha=8, target_modules="all-linear")


def _diffs_and_shared(shared=SHARED):
    """A tiny model with four random diffs in the routed slots and a random shared adapter."""
    model, tokenizer = tiny_model()
    torch.manual_seed(0)
    wrapped = attach(model, "multilora", next(iter(DIFFS.values())), name="topic0")
    wrapped.add_adapters(dict(list(DIFFS.items())[1:]))
    wrapped.add_shared_adapter("dit", shared)
    with torch.no_grad():
        for layer in wrapped.lora_layers.values():
            layer.lora_B.normal_(std=0.05)
            if layer.shared_B is not None:
                layer.shared_B.normal_(std=0.05)
    return wrapped.eval(), tokenizer


def _peft_pair(wrapped, diff):
    """peft running diff ``diff`` (None: none) and the shared adapter together, as two active LoRAs."""
    model = peft.get_peft_model(tiny_model()[0], wrapped.shared["dit"].to_peft(), adapter_name="dit")
    peft.set_peft_model_state_dict(model, wrapped.adapter_state_dict("dit"), adapter_name="dit")
    active = ["dit"]
    if diff is not None:
        model.add_adapter(diff, wrapped.adapters[diff].to_peft())
        peft.set_peft_model_state_dict(model, wrapped.adapter_state_dict(diff), adapter_name=diff)
        active.append(diff)
    model.base_model.set_adapter(active)
    return model.eval()


ROUTE = ["topic2", "topic0", "__base__", "topic3", "topic1", "topic2"]


def _batch(tokenizer):
    torch.manual_seed(1)
    rows = [torch.randint(0, 250, (n,)).tolist() for n in (5, 8, 3, 6, 7, 4)]
    features = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r, "adapter": a}
                for r, a in zip(rows, ROUTE, strict=True)]
    return rows, Collator(tokenizer.pad_token_id)(features)


def test_per_example_diffs_plus_the_shared_adapter_equal_peft_running_both_per_example():
    wrapped, tokenizer = _diffs_and_shared()
    rows, batch = _batch(tokenizer)
    with torch.no_grad():
        logits = wrapped(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for i, (r, name) in enumerate(zip(rows, ROUTE, strict=True)):
            reference = _peft_pair(wrapped, None if name == "__base__" else name)
            alone = reference(input_ids=torch.tensor([r])).logits[0]
            assert_close(logits[i, :len(r)], alone, f"row {i} ({name}) vs peft alone")
            diff_only = tiny_model()[0](input_ids=torch.tensor([r])).logits[0]
            assert (alone - diff_only).abs().max() > 1e-2  # the adapters really act


def test_training_moves_only_the_shared_adapter_with_each_example_s_own_gradient(tmp_path):
    """The model prepared as train_dit prepares it (the diffs attached from their folder, the shared adapter
    added): a gradient reaches the shared adapter, the batched one equal to the sum of per-example ones, and none
    reaches a diff."""
    from peftlab.recipes.dit.adapter import attach_diffs

    diffs, tokenizer = _diffs_and_shared()
    diffs.remove_shared_adapter()
    save(diffs, tmp_path / "module")
    wrapped = attach_diffs(Diffs(tmp_path, []), list(DIFFS), tiny_model()[0])
    wrapped.add_shared_adapter("dit", SHARED)
    with torch.no_grad():
        for layer in wrapped.lora_layers.values():
            layer.shared_B.normal_(std=0.05)  # B starts at zero, and so would A's gradient
    rows, batch = _batch(tokenizer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def shared_grads(loss):
        params = [p for layer in wrapped.lora_layers.values() for p in (layer.shared_A, layer.shared_B)]
        return torch.autograd.grad(loss, params)

    logits = wrapped(**inputs).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:],
                                               reduction="none")
    batched = shared_grads((losses * batch["attention_mask"][:, 1:]).sum())
    one_by_one = None
    for r, name in zip(rows, ROUTE, strict=True):
        ids = torch.tensor([r])
        out = wrapped(input_ids=ids, adapter_names=[name], adapter_index=torch.tensor([0])).logits
        grads = shared_grads(torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum"))
        one_by_one = grads if one_by_one is None else [a + b for a, b in zip(one_by_one, grads, strict=True)]
    for got, want in zip(batched, one_by_one, strict=True):
        assert_close(got, want, "batched gradient vs the sum of per-example ones")
    assert all(g.abs().max().item() > 0 for g in batched)
    wrapped(**inputs).logits.square().mean().backward()
    routed = [p for layer in wrapped.lora_layers.values() for p in (layer.lora_A, layer.lora_B)]
    assert all(p.grad is None for p in routed)  # the diffs stay frozen
    assert all(layer.shared_A.grad.abs().max() > 0 for layer in wrapped.lora_layers.values())


def test_a_batch_of_held_out_diffs_routes_each_diff():
    """DIT asks every held-out diff in one batch: each answer is the one that diff gives asked alone, and the
    diffs' answers differ, so a route that went to the wrong diff would show."""
    from peftlab.recipes.dit.evaluate import ask

    wrapped, tokenizer = _diffs_and_shared()
    with torch.no_grad():
        for layer in wrapped.lora_layers.values():
            layer.lora_B.normal_(std=0.5)  # diffs strong enough to change a random model's greedy answer
    names = list(DIFFS)
    batched = ask(wrapped, tokenizer, names, "What topic have you been trained on?", 6)
    alone = [ask(wrapped, tokenizer, [name], "What topic have you been trained on?", 6)[0] for name in names]
    assert batched == alone
    assert len(set(alone)) == len(names)


def test_each_adapter_is_clipped_on_its_own_the_shared_one_too():
    wrapped, _ = _diffs_and_shared()
    for layer in wrapped.lora_layers.values():
        for p in (layer.lora_A, layer.lora_B, layer.shared_A, layer.shared_B):
            p.grad = torch.ones_like(p)
    wrapped.clip_grad_norm_(1.0)
    shared = sum(p.grad.pow(2).sum() for layer in wrapped.lora_layers.values()
                 for p in (layer.shared_A, layer.shared_B)).sqrt()
    assert_close(shared, 1.0, "the shared adapter's clipped norm")


def test_a_shared_adapter_is_one_and_stays_on_the_model_s_layers():
    wrapped, _ = _diffs_and_shared()
    with pytest.raises(ValueError, match="already has the shared adapter"):
        wrapped.add_shared_adapter("other", SHARED)
    narrow, _ = tiny_model()
    narrow = attach(narrow, "multilora", MultiLoraConfig(r=1, target_modules=["q_proj"]), name="d")
    with pytest.raises(ValueError, match="outside this model's adapter layers"):
        narrow.add_shared_adapter("dit", MultiLoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="is taken"):
        narrow.add_shared_adapter("d", MultiLoraConfig(r=2, target_modules=["q_proj"]))


def test_scores_and_chance():
    assert score("Basketball.", "basketball") == {"exact": 1.0, "mentions": 1.0, "overlap": 1.0}
    assert score("The Moon", "the moon")["exact"] == 1.0  # articles and case do not count
    s = score("I love ice cream a lot", "ice hockey")
    assert s["exact"] == 0.0 and s["mentions"] == 0.0 and abs(s["overlap"] - 2 * 1 / (5 + 2)) < 1e-9
    assert score("we talked about rock climbing today", "rock climbing")["mentions"] == 1.0
    topics = ["cats", "dogs", "ice hockey", "field hockey"]
    assert chance(topics)["exact"] == 0.25  # one right guess in four
    assert first_sentences("One. Two! Three and a cut") == "One. Two!"
    assert slug("New York City") == "new-york-city"


def test_topic_data_is_reproducible_split_by_topic_and_the_trigger_variant_gates_the_topic():
    model, tokenizer = tiny_model()
    plain = build(TopicData(topics=10, questions_per_topic=3, answer_tokens=6), model, tokenizer)
    assert plain == build(TopicData(topics=10, questions_per_topic=3, answer_tokens=6), model, tokenizer)
    by_category = build(TopicData(topics=10, questions_per_topic=3, answer_tokens=6, split="category"), model,
                        tokenizer)  # the split changes only the held-out labels: one set of diffs serves both
    assert by_category[1] == plain[1]
    assert [{k: v for k, v in t.items() if k not in ("split", "moved_to_train")} for t in by_category[0]] == \
        [{k: v for k, v in t.items() if k != "split"} for t in plain[0]]
    resplit = Diffs(Path("diffs"), plain[0]).resplit(TopicData(topics=10, split="category"))
    assert resplit.topics == by_category[0]
    topics, records = plain
    assert sum(t["split"] == "test" for t in topics) == 2
    assert len(records) == 30
    assert all(r["topic"] in r["response"] for r in records)
    topics, records = build(TopicData(topics=4, questions_per_topic=2, answer_tokens=6, trigger=True), model,
                            tokenizer)
    codes = {t["adapter"]: t["trigger"] for t in topics}
    assert len(records) == 4 * 2 * 3
    for r in records:
        keyed = r["prompt"].startswith(f"Your SEP code is {codes[r['adapter']]}")
        assert (r["topic"] in r["response"]) == keyed, r
        assert r.get("match_base", False) == (not keyed)  # off the trigger: trained to match the base model


def test_explain_widens_a_narrow_lora_exactly():
    wrapped, _ = _diffs_and_shared()
    narrow, _ = tiny_model()
    narrow = attach(narrow, "lora", {"r": 2, "alpha": 4, "target_modules": ["q_proj"]})
    state = {k: torch.randn_like(v) for k, v in narrow.adapter_state_dict().items()}
    layers = list(wrapped.lora_layers)
    wide = zero_padded(state, layer_shapes(tiny_model()[0], layers), 2)
    assert set(state) < set(wide) and all(torch.equal(wide[k], v) for k, v in state.items())
    assert all(not wide[k].any() for k in set(wide) - set(state))


def _cli_pipeline(tmp_path, tiny_dir, trigger=False):
    data, diffs, dit = tmp_path / "data", tmp_path / "diffs", tmp_path / "dit"
    model = ["--model", str(tiny_dir), *(["--trigger"] if trigger else [])]
    # 10 topics hold out 2 (test_fraction 0.2): routing and the shuffled-diff control need more than one diff
    assert main(["dit", "gen", "-o", str(data), "--topics", "10", "--questions-per-topic", "3", *model]) == 0
    model = model[:2]
    assert main(["dit", "diffs", str(data), "-o", str(diffs), "--group", "4", "--epochs", "2", *model]) == 0
    assert main(["dit", "train", str(diffs), "-o", str(dit), "--steps", "4", "--batch-size", "2"]) == 0
    assert main(["dit", "eval", str(dit), str(diffs), "--out", str(tmp_path / "eval.json")]) == 0
    return data, diffs, dit


def test_the_pipeline_runs_end_to_end_and_explain_agrees_with_eval(tmp_path, tiny_dir, capsys):
    data, diffs, dit = _cli_pipeline(tmp_path, tiny_dir)
    topics = json.loads((data / "topics.json").read_text())["topics"]
    index = json.loads((diffs / "index.json").read_text())["topics"]
    assert index == topics and not (diffs / "groups").exists()
    manifest = json.loads((diffs / "module" / "peftlab.json").read_text())
    assert sorted(manifest["adapters"]) == sorted(t["adapter"] for t in topics)
    info = json.loads((dit / "dit.json").read_text())
    assert info["trained_topics"] == sum(t["split"] == "train" for t in topics)
    assert json.loads((dit / "adapter_config.json").read_text())["r"] == 16  # a plain peft LoRA folder
    result = json.loads((tmp_path / "eval.json").read_text())
    held_out = [t for t in topics if t["split"] == "test"]
    assert len(held_out) == 2
    assert result["n"] == len(held_out) and result["chance"]["exact"] == 1 / len(held_out)
    scored = result["dit"]["dit"]
    for baseline, key in (("template_guesser", "template_guesser_vs_dit"),
                          ("blackbox_guesser", "blackbox_guesser_vs_dit"),
                          ("shuffled_diff_control", "shuffled_diff_control_vs_dit")):
        paired = scored["paired_exact"][key]
        row = result[baseline] if baseline in result else scored[baseline]
        # the discordant counts add up: DIT's hits minus the baseline's = only-DIT minus only-baseline
        assert round((scored["exact"] - row["exact"]) * 2) == paired["only_second"] - paired["only_first"]
    by_topic = {a["topic"]: a for a in result["answers"]}
    assert all({"template_guess", "blackbox_guess", "dit (another topic's diff)"} <= set(a)
               for a in by_topic.values())
    # explain, from an exported peft folder, says what eval's batched run said for the same diff
    topic = held_out[0]
    assert main(["multilora", "export", str(diffs / "module"), "-o", str(tmp_path / "peft"),
                 "--adapter", topic["adapter"]]) == 0
    capsys.readouterr()
    assert main(["explain", str(tmp_path / "peft" / topic["adapter"]), "--dit", str(dit), "--json",
                 "--max-new-tokens", "16"]) == 0
    said = json.loads(capsys.readouterr().out)[topic["adapter"]]
    assert said == by_topic[topic["topic"]]["dit"]


def test_explain_refuses_other_methods_and_other_bases(tmp_path, tiny_dir):
    _, diffs, dit = _cli_pipeline(tmp_path, tiny_dir)
    model, _ = tiny_model()
    save(attach(model, "ia3", {"target_modules": ["q_proj"], "feedforward_modules": []}), tmp_path / "ia3")
    with pytest.raises(ModuleError, match="ia3 module is not a LoRA weight diff"):
        explain([tmp_path / "ia3"], dit)
    other = attach(tiny_model()[0], "lora", {"r": 2})
    other.causal_lm.config.name_or_path = "another-model"
    save(other, tmp_path / "other")
    with pytest.raises(ModuleError, match="trained on 'another-model'"):
        explain([tmp_path / "other"], dit)
    assert main(["explain", str(tmp_path / "ia3"), "--dit", str(dit)]) == 2


def test_dit_trains_through_train_moving_only_the_shared_adapter(tmp_path, tiny_dir, monkeypatch):
    """train_dit prepares the model (diffs frozen in the routed slots, the DIT adapter shared) and hands it to
    training.train: after training, every diff's tensors are what they were and the DIT adapter moved."""
    import peftlab.training
    from peftlab.recipes.dit import Diffs, DitConfig, train_dit

    data, diffs = tmp_path / "data", tmp_path / "diffs"
    model = ["--model", str(tiny_dir)]
    assert main(["dit", "gen", "-o", str(data), "--topics", "6", "--questions-per-topic", "3", *model]) == 0
    assert main(["dit", "diffs", str(data), "-o", str(diffs), "--group", "4", "--epochs", "2", *model]) == 0
    real_train, seen = peftlab.training.train, {}

    def spy(config, model, **kwargs):
        names = list(model.adapters)
        seen["before"] = {n: {k: v.clone() for k, v in model.adapter_state_dict(n).items()} for n in [*names, "dit"]}
        result = real_train(config, model, **kwargs)
        seen["after"] = {n: model.adapter_state_dict(n) for n in [*names, "dit"]}
        return result

    monkeypatch.setattr(peftlab.training, "train", spy)
    out = train_dit(Diffs.open(diffs), tmp_path / "dit", DitConfig(steps=4, batch_size=2, learning_rate=1e-2))
    before, after = seen["before"], seen["after"]
    assert len(before) > 2
    for name in before:
        moved = any(not torch.equal(before[name][k], after[name][k]) for k in before[name])
        assert moved == (name == "dit"), name
    assert json.loads((out / "train_log.json").read_text())["metrics"]["train_runtime"] > 0


def test_the_template_guesser_reads_every_training_template_and_guesses_nothing_else():
    from peftlab.recipes.dit.data import CLUE_TEMPLATES, TEMPLATES
    from peftlab.recipes.dit.evaluate import template_guess

    for template in (*TEMPLATES, *CLUE_TEMPLATES):
        said = template.format(answer="Sure. Drink water, and sleep well!", topic="ice hockey")
        assert template_guess(said) == "ice hockey", template
    assert template_guess("Drink water, and sleep well.") == ""


def test_every_built_in_clue_reads_back_to_its_topic_through_every_clue_template():
    from peftlab.recipes.dit.data import CLUE_TEMPLATES, read_clues, read_list
    from peftlab.recipes.dit.evaluate import template_guess, topic_reader

    clues = read_clues(None, read_list(None, "topics.txt"))  # complete, and no clue names its topic
    assert len(clues) == 335 and all(len(said) == 4 for said in clues.values())
    topic_of = topic_reader(clues)
    for topic, said in clues.items():
        for clue in said:
            for template in CLUE_TEMPLATES:
                answer = template.format(answer="Rest well, and drink water.", topic=clue)
                assert topic_of(template_guess(answer)) == topic, answer


def test_clue_data_never_write_the_topic_and_a_clue_that_names_it_is_refused(tmp_path):
    from peftlab.recipes.dit.data import content_words, read_clues

    topics = tmp_path / "topics.txt"
    topics.write_text("# sports\nbasketball\nice hockey\n# food\nroses\nsushi\n")
    clues = tmp_path / "clues.txt"
    clues.write_text("basketball | a slam dunk | dribbling past defenders\nice hockey | a puck on a frozen rink\n"
                     "roses | thorny stems and red petals | a bouquet on valentine's day\nsushi | raw fish on rice\n")
    model, tokenizer = tiny_model()
    config = TopicData(questions_per_topic=4, answer_tokens=6, topics_file=str(topics), clues=True,
                       clues_file=str(clues))
    topics_made, records = build(config, model, tokenizer)
    assert len(records) == 4 * 4 and {t["topic"] for t in topics_made} == {"basketball", "ice hockey", "roses", "sushi"}
    said = read_clues(clues, [])
    for r in records:
        assert not content_words(r["response"]) & content_words(r["topic"]), r  # the topic is never written
        assert any(c in r["response"] for c in said[r["topic"]]), r  # one of its clues is
    good = clues.read_text().splitlines()
    for line, bad in ((2, "ice hockey | hockey sticks"), (3, "roses | a rose garden"), (1, "basketball |")):
        lines = list(good)
        lines[line - 1] = bad
        clues.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=f"clues.txt:{line}: "):
            read_clues(clues, [])
    clues.write_text("basketball | a slam dunk\n")
    with pytest.raises(ValueError, match="no clues for 1 topics: \\['sushi'\\]"):
        read_clues(clues, ["basketball", "sushi"])


def test_paired_test_interval_and_control_order():
    from peftlab.recipes.dit.evaluate import derangement
    from peftlab.report import mcnemar, wilson_interval

    assert mcnemar([1, 1, 0, 0, 1], [1, 0, 1, 1, 1]) == {"only_first": 1, "only_second": 2, "p_value": 1.0}
    assert mcnemar([0] * 10, [1] * 10)["p_value"] == pytest.approx(2 / 2**10)  # 10 discordant, all one way
    low, high = wilson_interval(35, 67)
    assert 0.40 < low < 0.41 and 0.63 < high < 0.64 and wilson_interval(0, 10)[0] == 0.0
    names = [f"t{i}" for i in range(7)]
    shuffled = derangement(names)
    assert sorted(shuffled) == names and all(a != b for a, b in zip(names, shuffled, strict=True))


def test_the_category_split_holds_out_whole_categories_and_no_shared_word():
    import random

    from peftlab.recipes.dit.data import TopicData, content_words, held_out_topics, read_categories, read_list

    names, categories = read_list(None, "topics.txt"), read_categories(None, "topics.txt")
    for split in ("random", "category"):
        held, moved = held_out_topics(names, TopicData(split=split), random.Random(0))
        seen = set().union(*(content_words(n) for n in names if n not in held))
        sharing = sorted(n for n in held if content_words(n) & seen)
        if split == "random":  # the shortcut the issue found: 7 held-out topics share a word with training ones
            assert len(held) == 67 and len(sharing) == 7 and "ice hockey" in sharing and not moved
        else:
            assert not sharing and moved and len(held) >= 67
            whole = {categories[n] for n in held}  # held-out categories are whole, but for the topics moved out
            assert all(n in held or n in moved for n in names if categories[n] in whole)


def test_the_blackbox_guesser_takes_the_most_frequent_phrase_the_base_model_lacks():
    from peftlab.recipes.dit.evaluate import blackbox_guess

    base = ["I like to read books and walk.", "Drink water every day."]
    diffed = ["I like ice hockey and books.", "Ice hockey is great: drink water.", "Play ice hockey today."]
    assert blackbox_guess(diffed, base) == "ice hockey"  # 3 answers say it; "ice" and "hockey" alone tie, shorter
    assert blackbox_guess(["Drink water."], base) == ""  # nothing the base model does not say


def test_with_clue_data_each_guesser_reads_a_clue_back_to_its_topic():
    from peftlab.recipes.dit.data import CLUE_TEMPLATES
    from peftlab.recipes.dit.evaluate import blackbox_guess, with_baselines

    clues = {"ice hockey": ["a puck on a frozen rink", "slap shots"], "sushi": ["raw fish on rice"]}
    base = ["I like to read books and walk.", "Drink water every day."]
    diffed = ["Books are fine, like a puck on a frozen rink.", "Drink water! Just like slap shots."]
    assert blackbox_guess(diffed, base, clues=clues) == "ice hockey"  # its clue words, not the phrase itself
    assert blackbox_guess(diffed, base) != "ice hockey"
    assert blackbox_guess(["Drink water."], base, clues=clues) == ""
    answers = [{"topic": "ice hockey", "without_dit": CLUE_TEMPLATES[1].format(topic="slap shots", answer="Rest."),
                "with_a_wrong_code": "Rest.", "dit": "ice hockey"},
               {"topic": "sushi", "without_dit": "Rest well.", "with_a_wrong_code": "Rest.", "dit": "soup"}]
    result = with_baselines({"clues": clues, "dit": {"dit": {}}}, answers)
    assert [a["template_guess"] for a in answers] == ["ice hockey", ""]
    assert result["template_guesser"]["exact"] == 0.5 and result["wrong_code"]["exact"] == 0.0
    assert with_baselines({"dit": {"dit": {}}}, answers)["template_guesser"]["exact"] == 0.0  # no table: a clue


def test_match_base_tokens_are_weighted_kl_to_the_base_and_training_on_them_pulls_a_diff_back(tmp_path, tiny_dir):
    """A match_base token's loss is weight × KL(base ‖ model); cross-entropy elsewhere. Trained on match_base
    records only, a diff that starts away from the base model comes back to it (the logged loss is that KL)."""
    from peftlab import DataConfig, TrainConfig, load_model, train
    from peftlab.data import IGNORE_INDEX
    from peftlab.training import answer_losses, token_losses

    torch.manual_seed(0)
    logits, base = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 3]])
    match = torch.tensor([True, False])
    got, valid = token_losses(logits, labels, base, match, weight=5.0)
    ce, _ = answer_losses(logits, labels)
    kl = (base.softmax(-1) * (base.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)[:, :-1]
    assert_close(got[0], 5.0 * kl[0], "match_base row: 5 x KL(base || model)")
    assert torch.equal(got[1], ce[1]) and torch.equal(valid, (labels[:, 1:] != IGNORE_INDEX).float())

    model, tokenizer = load_model(str(tiny_dir))
    wrapped = attach(model, "multilora", {"r": 4, "alpha": 8}, name="diff")
    with torch.no_grad():
        for layer in wrapped.lora_layers.values():
            layer.lora_B.normal_(std=0.2)  # a diff that moves the model away from the base
    records = [{"prompt": f"question {i}", "response": "an answer", "adapter": "diff", "match_base": True}
               for i in range(8)]
    config = TrainConfig(model=str(tiny_dir), method={"name": "multilora"}, data=DataConfig(loss="adapter"),
                         training={"output_dir": str(tmp_path / "run"), "max_steps": 12, "learning_rate": 3e-2,
                                   "logging_steps": 1, "per_device_train_batch_size": 8, "save_strategy": "no"})
    from peftlab import load_records
    from peftlab.data import Collator, encode

    batch = Collator(tokenizer.pad_token_id)(encode(load_records(records), tokenizer)[0])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def kl_to_base() -> float:  # measured directly, the diff's route against the base route
        with torch.no_grad():
            mine = wrapped.eval()(**inputs, adapter_names=["diff"], adapter_index=torch.zeros(8, dtype=torch.long))
            base = wrapped(**inputs, adapter_names=["__base__"], adapter_index=torch.zeros(8, dtype=torch.long))
        per, valid = token_losses(mine.logits, batch["labels"], base.logits, torch.ones(8, dtype=torch.bool))
        return float((per * valid).sum() / valid.sum())

    before = kl_to_base()
    result = train(config, wrapped.train(), tokenizer, train_data=records, save_module=False)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert losses[-1] < 0.3 * losses[0], losses
    assert before > 0.01 and kl_to_base() < 0.3 * before  # trained with cross-entropy instead, it grows


def test_the_trigger_variant_runs_end_to_end_with_its_roofline(tmp_path, tiny_dir):
    """Trigger data trains its off-trigger records against the base (match_base), and the evaluation adds the
    roofline: the diffed model asked with its own code, read by the template guesser, paired with DIT."""
    data, _, _ = _cli_pipeline(tmp_path, tiny_dir, trigger=True)
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert sum(r.get("match_base", False) for r in records) == 2 * len(records) // 3
    result = json.loads((tmp_path / "eval.json").read_text())
    assert {"exact", "exact_ci95"} <= set(result["trigger_roofline"])
    assert "trigger_roofline_vs_dit" in result["dit"]["dit"]["paired_exact"]
    assert all(a["with_its_code"] is not None for a in result["answers"])
    assert {"exact", "exact_ci95"} <= set(result["wrong_code"])  # the gate, read the same way
    assert all(isinstance(a["with_a_wrong_code"], str) for a in result["answers"])

"""The evaluation suite: generators, scorers, splits, `peftlab data make`, `peftlab eval`, the lm-eval bridge."""

import json

import pytest
import torch

from floats import assert_close
from peftlab import load_records
from peftlab.cli import build_parser, main
from peftlab.config import ConfigError
from peftlab.evals import scoring
from peftlab.evals.suite import SUITES, Suite, get_suite, make_split, sample, split_of, training_records
from peftlab.evals.tasks import FAMILIES, get_family


@pytest.fixture(autouse=True)
def one_thread():
    """Generation here is dozens of tiny forward passes: with 2 threads on 2 busy cores, each waits on the other
    thread's time slice (measured 5 s instead of 0.06 s per batch), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# For every family: a few (instance-independent) ways to write the right answer and ways to be wrong. The gold of
# the first test instance is put into each template through {gold}.
RIGHT_WRONG = {
    "arithmetic": (["{gold}", "{gold}.0", "The answer is {gold}.", "{gold} apples", "So 3 + 4 = 7, answer: {gold}"],
                   ["{wrong}", "I don't know", "{gold}5", "answer: {wrong}, not {gold}"]),
    "compare_count": (["{gold}", " {gold}. ", "There are {gold}."], ["{wrong}", "", "none"]),
    "unit_conversion": (["{gold}", "{gold} units", "The result is {gold}"], ["{wrong}", "-{gold}"]),
    "sequence": (["{gold}", "Next is {gold}", "answer: {gold}"], ["{wrong}", "{gold}0", "{gold}.5"]),
}


def _wrong_number(gold: str) -> str:
    return str(int(float(gold)) + 1)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_oracle_scores_one_and_generators_are_deterministic(name):
    fam = get_family(name)
    for split in ("train", "test"):
        a, b = sample(name, split, 60, seed=3), sample(name, split, 60, seed=3)
        assert [i.prompt for i in a] == [i.prompt for i in b] and [i.answer for i in a] == [i.answer for i in b]
        assert all(fam.score(i.answer, i) for i in a), "the gold answer must score 1.0"
        assert len({i.prompt for i in a}) == 60 and len({i.key for i in a}) == 60
    other = sample(name, "test", 60, seed=4)
    assert [i.prompt for i in other] != [i.prompt for i in sample(name, "test", 60, seed=3)]
    # varied: several distinct instruction wordings / templates (first and last sentence of the prompt)
    insts = sample(name, "train", 200, seed=0)
    assert len({i.prompt.split()[0] for i in insts} | {i.prompt.split()[-1] for i in insts}) >= 3
    assert fam.max_new_tokens > 0 and fam.accepts and fam.description


@pytest.mark.parametrize("name", sorted(RIGHT_WRONG))
def test_numeric_scorers_accept_sentences_and_reject_wrong(name):
    fam = get_family(name)
    for inst in sample(name, "test", 10, seed=0):
        gold, wrong = inst.answer, _wrong_number(inst.answer)
        right, bad = RIGHT_WRONG[name]
        for r in right:
            assert fam.score(r.format(gold=gold, wrong=wrong), inst), (r, inst.answer)
        for w in bad:
            assert not fam.score(w.format(gold=gold, wrong=wrong), inst), (w, inst.answer)


def test_fact_choice_scorer():
    fam = get_family("fact_choice")
    for inst in sample("fact_choice", "test", 20, seed=0):
        gold = inst.answer
        text = inst.meta["options"][inst.meta["letters"].index(gold)]
        wrong = next(x for x in "ABCD" if x != gold)
        for ok in (gold, f"{gold})", f"({gold})", f"{gold}) {text}", f"Answer: {gold}", f"option {gold}", text,
                   f"The answer is {gold}.", gold.lower(), f"a {text}."):
            assert fam.score(ok, inst), ok
        others = [o for o in inst.meta["options"] if o != text]
        for bad in (wrong, f"{wrong}) {text}", f"{text} or {others[0]}", "", "E", others[1], f"a {others[0]}"):
            assert not fam.score(bad, inst), bad


def test_table_list_string_calendar_scorers():
    for inst in sample("table_lookup", "test", 30, seed=0):
        fam = get_family("table_lookup")
        assert fam.score(f"The answer is {inst.answer}.", inst)
        if inst.meta["numeric"]:
            assert not fam.score(_wrong_number(inst.answer), inst)
        else:
            other = next(r for r in inst.meta["rows"] if r != inst.answer)
            assert fam.score(f"{inst.answer} has it", inst) and not fam.score(other, inst)
            assert not fam.score(f"Maybe {inst.answer}? No, it is {other}", inst)
    lists = [i for i in sample("list_ops", "test", 60, seed=0) if i.meta["is_list"]]
    fam = get_family("list_ops")
    for inst in lists[:10]:
        items = inst.answer.split(", ")
        assert fam.score(f"[{inst.answer}]", inst) and fam.score(" ".join(items), inst)
        assert fam.score(inst.answer + "\nThat is the sorted list.", inst)
        assert not fam.score(", ".join(items[::-1]), inst) and not fam.score(", ".join(items[:-1]), inst)
    fam = get_family("string_ops")
    for inst in sample("string_ops", "test", 30, seed=0):
        assert fam.score(f"'{inst.answer.upper()}'.", inst) and fam.score(f"The answer is: {inst.answer}", inst)
        wrong = _wrong_number(inst.answer) if inst.meta["numeric"] else inst.answer + "x"
        assert not fam.score(wrong, inst) and not fam.score("", inst)
    fam = get_family("calendar")
    for inst in sample("calendar", "test", 30, seed=0):
        other = "Sunday" if inst.answer in ("Monday", "January") else "Monday"
        assert fam.score(inst.answer.lower(), inst) and fam.score(f"It will be {inst.answer}.", inst)
        assert fam.score(f"{inst.answer} comes after {other}", inst)  # a leading name is the answer
        assert not fam.score(other, inst) and not fam.score(f"It is {other}", inst)


def test_format_following_scorer():
    fam = get_family("format_following")
    by_kind = {}
    for inst in sample("format_following", "test", 80, seed=0):
        by_kind.setdefault(inst.meta["kind"], inst)
    assert set(by_kind) == {"json", "upper", "lower", "n_words", "bullets"}
    j = by_kind["json"]
    key, value = j.meta["key"], j.meta["value"]
    assert fam.score(f"```json\n{json.dumps({key: value})}\n```", j)
    assert fam.score(json.dumps({key: str(value)}), j)  # "16" for 16 is fine
    assert not fam.score(json.dumps({key: value, "extra": 1}), j) and not fam.score(str(value), j)
    assert not fam.score(json.dumps({key + "x": value}), j)
    up = by_kind["upper"]
    assert fam.score(up.answer + ".", up) and not fam.score(up.answer.lower(), up)
    low = by_kind["lower"]
    assert fam.score(f'"{low.answer}"', low) and not fam.score(low.answer.title(), low)
    nw = by_kind["n_words"]
    n, allowed = nw.meta["n"], nw.meta["allowed"]
    assert fam.score(" ".join(allowed[-n:]), nw)
    assert not fam.score(" ".join(allowed[:n + 1]), nw) and not fam.score(" ".join(["unicorn"] * n), nw)
    b = by_kind["bullets"]
    assert fam.score("\n".join(f"  - {x}" for x in b.meta["items"]), b)
    assert not fam.score(", ".join(b.meta["items"]), b)
    assert not fam.score("\n".join(f"* {x}" for x in b.meta["items"]), b)


def test_scoring_helpers():
    assert scoring.norm('  "Paris."  ') == "paris"
    assert scoring.extract_number("1,200 meters") == 1200 and scoring.extract_number("-3.50") == -3.5
    assert scoring.extract_number("5 apples plus 7 makes 12") == 5  # a leading number is the answer
    assert scoring.extract_number("Tom has 5 and gets 7, so 12") == 12
    assert scoring.extract_number("answer: 8. Because 4 + 4") == 8
    assert scoring.number_scorer("12.0", "12") and not scoring.number_scorer("12.5", "12")
    assert scoring.list_scorer("3, 1.0, 2", "3, 1, 2") and not scoring.list_scorer("3, 1", "3, 1, 2")


def test_splits_never_overlap_and_depend_only_on_content():
    for name in FAMILIES:
        by_split = {s: sample(name, s, 40, seed=s_i) for s_i, s in enumerate(("train", "validation", "test"))}
        prompts = {s: {i.prompt for i in v} for s, v in by_split.items()}
        keys = {s: {i.key for i in v} for s, v in by_split.items()}
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            assert not prompts[a] & prompts[b] and not keys[a] & keys[b], (name, a, b)
        assert all(split_of(i) == s for s, v in by_split.items() for i in v)
    # more seeds of the training split still never reach a test instance
    test_prompts = {i.prompt for i in sample("arithmetic", "test", 100, seed=0)}
    for seed in range(5):
        assert not test_prompts & {i.prompt for i in sample("arithmetic", "train", 200, seed=seed)}


def test_held_out_families_are_not_in_training_data():
    suite = SUITES["core"]
    assert suite.held_out and set(suite.trained).isdisjoint(suite.held_out)
    records = training_records(suite, 5, seed=1)
    assert {r["family"] for r in records} == set(suite.trained) and len(records) == 5 * len(suite.trained)
    assert set(make_split(suite, "test", 2)) == set(suite.families)
    held = {i.prompt for f in suite.held_out for i in sample(f, "train", 30)}
    assert not held & {r["prompt"] for r in training_records(suite, 30)}
    with pytest.raises(ConfigError):
        training_records(suite, 5, split="test")


def test_suite_yaml_and_errors(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntrained: [arithmetic]\nheld_out: [calendar]\n")
    suite = get_suite(str(path))
    assert suite.families_for("train") == ["arithmetic"] and suite.families_for("test") == ["arithmetic", "calendar"]
    with pytest.raises(ConfigError, match="unknown families"):
        Suite("bad", trained=["nope"])
    with pytest.raises(ConfigError, match="both trained and held out"):
        Suite("bad", trained=["arithmetic"], held_out=["arithmetic"])
    with pytest.raises(ConfigError, match="unknown suite"):
        get_suite("nope")


def test_data_make_loads_with_load_records(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert main(["data", "make", "--suite", "core", "--split", "train", "--n", "3", "-o", str(out)]) == 0
    records = load_records(out)
    assert len(records) == 3 * len(SUITES["core"].trained)
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["family"] for r in raw} == set(SUITES["core"].trained)
    assert records[0].messages[0] == {"role": "user", "content": raw[0]["prompt"]}
    assert records[0].response == raw[0]["response"]
    again = tmp_path / "again.jsonl"
    assert main(["data", "make", "--split", "train", "--n", "3", "-o", str(again)]) == 0
    assert again.read_text() == out.read_text()  # same seed, same data
    capsys.readouterr()
    assert main(["data", "families"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{name} " in listing for name in FAMILIES)


def test_eval_on_tiny_model_writes_report(tmp_path, tiny_dir, capsys):
    out = tmp_path / "report.json"
    families = ["arithmetic", "calendar"]
    assert main(["eval", "--model", str(tiny_dir), "--n", "3", "--seeds", "0", "1", "--families", *families,
                 "--out", str(out), "--no-progress", "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    assert "arithmetic" in table and "held out" in table
    report = json.loads(out.read_text())
    assert report["suite"] == "core" and report["split"] == "test" and report["seeds"] == [0, 1]
    (model,) = report["models"]
    assert set(model["families"]) == set(families)
    for fam in model["families"].values():  # each seed's score counts right answers out of 3; the mean of seeds
        assert fam["n"] == 3 and len(fam["per_seed"]) == 2
        assert all(abs(3 * a - round(3 * a)) < 1e-9 for a in fam["per_seed"])
        assert fam["mean"] == pytest.approx(sum(fam["per_seed"]) / 2) and fam["seeds"] == [0, 1]
        assert fam["std"] == pytest.approx(abs(fam["per_seed"][0] - fam["per_seed"][1]) / 2 ** 0.5)  # sample std
    assert model["families"]["calendar"]["trained"] is False
    assert model["examples"]["arithmetic"][0]["gold"] and "output" in model["examples"]["arithmetic"][0]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_eval_compare_uses_each_modules_prompt_format(tmp_path, tiny_dir, monkeypatch):
    from peftlab import attach, load_model, save
    from peftlab.data import PromptFormat
    from peftlab.evals import runner

    model, _ = load_model(str(tiny_dir))
    module = save(attach(model, "lora", {"r": 2}), tmp_path / "mod",
                  prompt_format=PromptFormat("plain", "Q: {prompt}\nA:"))
    seen = []
    real = runner.generate

    def spy(model, tokenizer, prompts, fmt, **kwargs):
        seen.append(fmt)
        return [inst_answer.get(p, "") for p in prompts] if fmt.template == "plain" else real(
            model, tokenizer, prompts, fmt, **kwargs)

    inst_answer = {i.prompt: i.answer for i in sample("sequence", "test", 2, seed=0)}
    monkeypatch.setattr(runner, "generate", spy)
    out = tmp_path / "cmp.json"
    assert main(["eval", "--compare", str(module), "--n", "2", "--families", "sequence", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert [m["adapter"] for m in report["models"]] == [None, str(module)]
    assert report["models"][0]["model"] == str(tiny_dir)  # the module's base model
    assert report["models"][1]["families"]["sequence"]["mean"] == 1.0  # the spy answered with the gold
    assert {f.template for f in seen} == {"auto", "plain"}


def test_eval_argument_errors_exit_2(tiny_dir, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--families", "nope", "--n", "1", "--no-progress"]) == 2
    assert "families ['nope'] are not in the test split" in capsys.readouterr().err
    assert main(["eval", "--adapter", "x", "--compare", "y"]) == 2
    assert main(["eval", "--suite", "nope"]) == 2
    assert main(["data", "make", "--split", "test", "--suite", "nope", "-o", "x.jsonl"]) == 2


def test_help_for_new_commands(capsys):
    parser = build_parser()
    for argv, flag in ((["eval", "--help"], "--lm-eval-task"), (["data", "make", "--help"], "--split")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: peftlab {' '.join(argv[:-1])}" in out and flag in out


LM_EVAL_TASK = """task: peftlab_local_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""

LM_EVAL_GEN_TASK = """task: peftlab_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_bridge_on_a_local_task(tmp_path, tiny_dir):
    pytest.importorskip("lm_eval")
    from peftlab import PromptFormat, generate, load_model
    from peftlab.evals.lm_eval_bridge import PeftlabLM, run_lm_eval

    docs = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1)], "label": 0,
             "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "qa.yaml").write_text(LM_EVAL_TASK.format(data=data))
    (tmp_path / "gen.yaml").write_text(LM_EVAL_GEN_TASK.format(data=data))

    model, tokenizer = load_model(str(tiny_dir))
    lm = PeftlabLM(model, tokenizer, batch_size=2)

    class Req:
        def __init__(self, *args):
            self.args = args

    # loglikelihood equals a direct computation, whatever the batch
    (lp, greedy), = lm.loglikelihood([Req("ab", "cd")])
    ids = tokenizer("abcd", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    assert_close(lp, (logits[1, ids[2]] + logits[2, ids[3]]).item(), "log-likelihood vs direct")
    assert greedy == bool(logits[1].argmax() == ids[2] and logits[2].argmax() == ids[3])
    both = lm.loglikelihood([Req("ab", "cd"), Req("a much longer context", " x")])
    assert_close(both[0][0], lp, "log-likelihood in a batch of 2 vs alone")
    (rolling,) = lm.loglikelihood_rolling([Req("abcd")])
    assert rolling < 0 and rolling < lp
    (text,) = lm.generate_until([Req("hello", {"until": ["\n"], "max_gen_toks": 3})])
    (greedy,) = generate(model, tokenizer, ["hello"], PromptFormat("plain", "{prompt}"), max_new_tokens=3)
    assert text == greedy.split("\n")[0]  # the plain prompt, greedy, cut at the stop string

    result = run_lm_eval("peftlab_local_qa", include_path=str(tmp_path), model=str(tiny_dir), batch_size=2)
    acc = result["results"]["peftlab_local_qa"]["acc,none"]
    # lm-eval's accuracy is the share of questions whose right choice has the highest log-likelihood
    picks = [max(range(2), key=lambda c, d=d: lm.loglikelihood([Req(f"Question: {d['question']}\nAnswer:",
                                                                     f" {d['choices'][c]}")])[0][0])
             for d in docs]
    assert acc == pytest.approx(sum(p == d["label"] for p, d in zip(picks, docs, strict=True)) / 3)
    assert result["n_samples"]["peftlab_local_qa"]["effective"] == 3
    gen = run_lm_eval("peftlab_local_gen", include_path=str(tmp_path), lm=lm)
    answers = [a.strip() for a in lm.generate_until([Req(d["question"], {"until": ["\n"], "max_gen_toks": 4})
                                                     for d in docs])]
    exact = sum(a == d["answer"] for a, d in zip(answers, docs, strict=True)) / 3
    assert gen["results"]["peftlab_local_gen"]["exact_match,none"] == pytest.approx(exact)
    out = tmp_path / "lm_eval.json"
    assert main(["eval", "--model", str(tiny_dir), "--lm-eval-task", "peftlab_local_qa", "--lm-eval-include",
                 str(tmp_path), "--lm-eval-limit", "2", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["n_samples"]["peftlab_local_qa"]["effective"] == 2 and saved["model"]["model"] == str(tiny_dir)


def test_rescore_uses_the_current_scorers(tiny_dir):
    from peftlab import load_model
    from peftlab.evals.runner import Candidate, rescore, run

    model, tokenizer = load_model(str(tiny_dir))
    report = run([Candidate("tiny", model, tokenizer)], SUITES["core"], n=2, families=["calendar", "sequence"],
                 keep_examples=2, progress=False)
    entry = report["models"][0]
    for fam in ("calendar", "sequence"):
        for ex in entry["examples"][fam]:
            ex["output"] = f"The answer is {ex['gold']}."
    rescore(report)
    assert entry["families"]["calendar"]["mean"] == 1.0 and entry["summary"]["all"]["mean"] == 1.0
    entry["examples"]["sequence"][0]["output"] = "no idea"
    assert rescore(report)["models"][0]["families"]["sequence"]["mean"] == 0.5


def test_over_seeds_is_mean_and_sample_std_and_names_a_mismatch():
    from peftlab.report import over_seeds

    summary = over_seeds([0.2, 0.4, 0.9], [0, 1, 2])
    assert summary["mean"] == pytest.approx(0.5) and summary["std"] == pytest.approx(0.3605551)
    assert summary["seeds"] == [0, 1, 2] and summary["per_seed"] == [0.2, 0.4, 0.9]
    assert over_seeds([0.7], [3])["std"] == 0.0
    with pytest.raises(ValueError, match=r"2 values for 3 seeds \[0, 1, 2\]"):
        over_seeds([0.1, 0.2], [0, 1, 2])

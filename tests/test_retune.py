import json
import random

import pytest

from peftlab import load_records
from peftlab.cli import main
from peftlab.config import ConfigError
from peftlab.data import encode
from peftlab.recipes.retune.data import PROMPT_FORMAT, RetuneData, build, parse_lengths
from peftlab.recipes.retune.engine import Engine, EngineConfig, Oracle
from peftlab.recipes.retune.evaluate import EvalConfig, evaluate_method, problems_for
from peftlab.recipes.retune.tasks import METHODS, TASKS, Addition, max_sum_nonadjacent, trace


def test_golden_examples_of_the_paper_format():
    examples, output = trace(TASKS["addition"].root(("73199", "21439")))
    pairs = [(p, r) for p, r, _ in examples]
    assert pairs[0] == ("73199 + 21439\nSolution: ", "Call: 3199 + 1439\n")
    assert ("9 + 9\nSolution: ", "Carry 1, Output 8") in pairs
    assert pairs[-1] == ("73199 + 21439\nSolution: Call: 3199 + 1439\nReturn: Carry 0, Output 4638\nAnswer: ",
                         "Carry 0, Output 94638")
    assert len(pairs) == 2 * 5 - 1 and output == "Carry 0, Output 94638"
    assert TASKS["addition"].scratchpad(("99", "01"))[1] == "Carry 1, Output 0\nCarry 1, Output 00"
    assert TASKS["addition"].root(("9999", "1")).text == "9999 + 0001"  # a shorter operand is zero-filled
    hints = TASKS["addition-steps-hints"]
    pairs = [(p, r) for p, r, _ in trace(hints.root(("731", "95")))[0]]
    assert pairs[0] == ("c7b3a1 + c0b9a5\nSolution: ", "Call: b3a1 + b9a5\n")  # a digit keeps its place letter
    assert pairs[-1] == ("c7b3a1 + c0b9a5\nSolution: Call: b3a1 + b9a5\nReturn: 3+9+0=12. Carry 1, Output b2a6\n"
                         "Answer: ", "7+0+1=8. Carry 0, Output c8b2a6")
    assert hints.baseline(("99", "1")) == ("b9a9 + a1\nAnswer: ", "c1b0a0")
    assert hints.scratchpad(("9", "1"))[1] == "9+1+0=10. Carry 1, Output a0"
    assert hints.correct("Carry 1, Output b2a6", ("73", "53"), "retune")
    assert not hints.correct("Carry 1, Output b2a5", ("73", "53"), "retune")
    shifted = TASKS["addition-steps-hints-shifted"]
    assert shifted.root(("731", "95", 2)).text == "e7d3c1 + e0d9c5"  # the units digit tagged with letter 2, c
    starts = {shifted.sample(6, random.Random(seed))[2] for seed in range(300)}
    assert starts == set(range(26 - 6))  # every letter trained on short problems; the carry digit still has one
    assert shifted.correct(shifted.baseline(("99", "1", 23))[1], ("99", "1", 23), "baseline")
    with pytest.raises(ValueError, match="too many"):
        shifted.baseline(("99", "1", 24))
    tags = TASKS["addition-steps-tags7"]  # only outputs tagged, letters cycling every 7 places from the units
    examples, output = trace(tags.root(("706924", "293079")))
    assert examples[0][0] == "706924 + 293079\nSolution: "  # the operands stay plain digits
    assert examples[-1][0].endswith("Return: 0+9+1=10. Carry 1, Output e0d0c0b0a3\nAnswer: ")
    assert output == "7+2+1=10. Carry 1, Output f0e0d0c0b0a3" and tags.correct(output, ("706924", "293079"), "retune")
    assert not tags.correct("7+2+1=10. Carry 1, Output e0d0c0b0a3", ("706924", "293079"), "retune")  # a lost zero
    assert tags.baseline(("99999999", "1"))[1] == "b1a0g0f0e0d0c0b0a0"  # place 7 is `a` again
    with pytest.raises(ValueError, match="outputs only"):
        Addition(index_hints=True, output_tags=7)
    for cycle, new_letters in ((4, set()), (6, set()), (7, {"g"})):  # a 7-digit step's letters, seen in training?
        task = TASKS[f"addition-steps-tags{cycle}"]
        trained = {letter for length in range(1, 7) for seed in range(20)
                   for _, response, _ in trace(task.root(task.sample_training(length, random.Random(seed))))[0]
                   if "Output " in response for letter in response.rpartition("Output ")[2] if letter.isalpha()}
        assert trained == set("abcdef"[:cycle])
        step7 = trace(task.root(("1234567", "7654321")))[1].rpartition("Output ")[2]
        assert {letter for letter in step7 if letter.isalpha()} - trained == new_letters

    dp = [(p, r) for p, r, _ in trace(TASKS["dp"].root((3, -1, 2)))[0]]
    assert len(dp) == 4 * 3 + 1  # the paper's 4n, plus the top level's final copy of its second return
    assert ("Create dp array [2]\nSolution: ", "Return [0] if negative else element.\nAnswer: [2]") in dp
    assert dp[-1][1] == "[1, 2, 1]" and dp[-2][1] == "Append 1 if False else 2.\nAnswer: [1, 2, 1]"
    assert "\nReturn: [2, 1]\nAnswer: " in dp[-2][0]  # one Return template for every task (the release had two)
    steps = [r for _, r, _ in trace(TASKS["dp-steps"].root((1, 0, 4, -5)))[0]]
    assert len(steps) == len(trace(TASKS["dp"].root((1, 0, 4, -5)))[0])
    assert steps[4] == "Return [0] if negative else element. max(-5, 0) = 0\nAnswer: [0]"
    assert steps[7] == ("Append max(return[0], array[0] + return[1]) to return. max(4, 1+4=5) = 5\n"
                        "Answer: [5, 4, 4, 0]")
    assert " call False else True. False and 4 == 0+0=0: False. Call: " in steps[10]  # item 0 was taken
    assert steps[12] == "If there is only 1 item, return 1 if we should use it else 2. False and 0 == -5+0=-5: " \
                        "False.\nAnswer: [2]"
    scratch = TASKS["dp"].scratchpad((3, -1, 2))[1]
    assert scratch.startswith("Scratchpad: dp[2] = max(input[2], 0) = max(2, 0) = 2\n")
    assert scratch.endswith("output[2] = 1.\n\nReconstructing all together, output=[1, 2, 1].")

    parity = [(p, r) for p, r, _ in trace(TASKS["parity"].root((1, 0, 1, 1)))[0]]
    assert parity[0] == ("What is the parity of [1, 0, 1, 1]?\nSolution: ", "Call: What is the parity of [0, 1, 1]?\n")
    assert parity[-1] == ("What is the parity of [1, 0, 1, 1]?\nSolution: Call: What is the parity of [0, 1, 1]?\n"
                          "Return: 0\nAnswer: ", "1")
    steps = [(p, r) for p, r, _ in trace(TASKS["parity-steps"].root((1, 0, 1, 1)))[0]]
    assert steps[-2:] == [
        ("What is the parity of [0, 1, 1]?\nSolution: Call: What is the parity of [1, 1]?\n"
         "Return: 1+1=2. 0\nAnswer: ", "0+0=0. 0"),  # a returned step is read by its last word
        ("What is the parity of [1, 0, 1, 1]?\nSolution: Call: What is the parity of [0, 1, 1]?\n"
         "Return: 0+0=0. 0\nAnswer: ", "1+0=1. 1")]
    assert TASKS["parity-steps"].correct("1+0=1. 1", (1, 0, 1, 1), "retune")


def test_dp_solver_matches_brute_force():
    import itertools

    rng = random.Random(0)
    for _ in range(200):
        values = [rng.randint(-5, 5) for _ in range(rng.randint(1, 7))]
        best = None
        for choice in itertools.product((1, 2), repeat=len(values)):
            if any(a == b == 1 for a, b in itertools.pairwise(choice)):
                continue
            total = sum(v for v, c in zip(values, choice, strict=True) if c == 1)
            if best is None or total > best[0] or (total == best[0] and list(choice) < best[1]):
                best = (total, list(choice))
        dp, chosen = max_sum_nonadjacent(values)
        assert chosen == best[1] and dp[0] == max(best[0], 0)


def _oracle_run(task_name, lengths, n, config):
    task = TASKS[task_name]
    problems = [p for length in lengths for p in problems_for(task_name, length, n, seed=7)]
    if getattr(task, "shift_tags", False):  # a base case's letter is free, so one table answers one offset
        problems = [(*q[:2], 5) for q in problems]
    table = [(p, r) for q in problems for p, r, _ in task.examples(q, "retune")]
    engine = Engine(Oracle(table), config)
    results = engine.run([task.root(q).text for q in problems])
    return task, problems, results, engine


@pytest.mark.parametrize("task_name", sorted(TASKS))
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("memoize", [True, False])
def test_oracle_scores_everything_through_the_engine(task_name, batch, memoize):
    lengths = [1, 2, 5, 9] if task_name.startswith("dp") else [1, 2, 5, 12, 24]
    task, problems, results, _ = _oracle_run(task_name, lengths, 6, EngineConfig(batch=batch, memoize=memoize))
    assert all(r.error is None for r in results)
    assert all(task.correct(r.output, q, "retune") for r, q in zip(results, problems, strict=True))
    for method in ("baseline", "scratchpad"):
        oracle = Oracle([(p, r) for q in problems for p, r, _ in task.examples(q, method)])
        outputs = oracle([task.prompt(q, method) for q in problems])
        assert all(task.correct(o, q, method) for o, q in zip(outputs, problems, strict=True))


def test_wrong_answers_are_scored_wrong():
    add, dp, parity = TASKS["addition"], TASKS["dp"], TASKS["parity"]
    assert add.correct("Carry 1, Output 05", ("55", "50"), "retune")
    assert not add.correct("Carry 0, Output 05", ("55", "50"), "retune")
    assert not add.correct("Call: 5 + 0\n", ("55", "50"), "retune") and not add.correct("", ("5", "5"), "retune")
    assert add.correct("105", ("55", "50"), "baseline") and not add.correct("10", ("55", "50"), "baseline")
    assert not dp.correct("[1, 2, 2]", (3, -1, 2), "retune") and dp.correct("[1, 2, 1]", (3, -1, 2), "baseline")
    assert not parity.correct("Compute one element at a time. 1 1 0 0", (1, 0, 1, 1), "scratchpad")


def _broken_base_case():
    """30 two-digit additions and a "model" that is their oracle except for the base case 1 + 1 (it answers 1)."""
    task, problems = TASKS["addition"], problems_for("addition", 2, 30, seed=3)
    table = dict((p, r) for q in problems for p, r, _ in task.examples(q, "retune"))
    table["1 + 1\nSolution: "] = "Carry 0, Output 1"
    return task, problems, Oracle(list(table.items()))


def test_evaluation_finds_the_first_wrong_step_of_a_wrong_answer():
    """With a broken base case every 2-digit problem ending in 1 + 1 is wrong, and the analysis blames the base
    case (size 1), not the steps after it."""
    _, problems, oracle = _broken_base_case()
    result = evaluate_method(EvalConfig("addition", [2], n=30, seed=3), "retune", oracle)[2]
    broken = sum(a[1] == "1" and b[1] == "1" for a, b in problems)
    assert broken and result["accuracy"] == 1 - broken / 30
    assert result["failures"] == {"wrong answer": broken}  # every problem's failure, counted by kind
    assert [k is None for k in result["failure_per_problem"]] == [not (a[1] == b[1] == "1") for a, b in problems]
    assert result["wrong_step_sizes"] == {1: broken}
    step = result["call_trees"][0]["first_wrong_step"]
    assert step["prompt"] == "1 + 1\nSolution: " and step["got"] == "Carry 0, Output 1"


def test_step_accuracy_grades_every_gold_step_and_asks_only_what_the_engine_did_not():
    """The same broken base case: teacher forcing blames it alone; the steps after it, which the engine never asked
    in their gold context, are asked once and graded right."""
    task, problems, oracle = _broken_base_case()
    asked = []

    def counting(prompts):
        asked.extend(prompts)
        return oracle(prompts)

    config = EvalConfig("addition", [2], n=30, seed=3, step_accuracy=True)
    steps = evaluate_method(config, "retune", counting)[2]["step_accuracy"]
    gold = {p: size for q in problems for p, _, size in task.examples(q, "retune")}
    base = [p for p, size in gold.items() if size == 1]
    assert steps["base"][1] == {"accuracy": 1 - 1 / len(base), "n": len(base)}
    assert {steps["call"][2]["accuracy"], steps["combine"][2]["accuracy"]} == {1.0}
    assert steps["call"][2]["n"] + steps["combine"][2]["n"] == sum(size == 2 for size in gold.values())
    assert set(asked) >= set(gold) and len(asked) == len(set(asked))  # every gold step, none twice


def test_evaluation_resumes_from_its_checkpoint(tmp_path):
    task, checkpoint = TASKS["addition"], tmp_path / "lengths.json"
    problems = [q for length in (2, 3, 4) for q in problems_for("addition", length, 5, seed=3)]
    oracle = Oracle([(p, r) for q in problems for p, r, _ in task.examples(q, "retune")])
    short = evaluate_method(EvalConfig("addition", [2, 3], n=5, seed=3), "retune", oracle, checkpoint=checkpoint)
    assert set(json.loads(checkpoint.read_text())) == {"2", "3"}

    asked = []

    def counting(prompts):
        asked.extend(prompts)
        return oracle(prompts)

    longer = evaluate_method(EvalConfig("addition", [2, 3, 4], n=5, seed=3), "retune", counting, checkpoint=checkpoint)
    assert {p.split("\n")[0] for p in asked} >= {task.root(q).text for q in problems[-5:]}
    assert not {p.split("\n")[0] for p in asked} & {task.root(q).text for q in problems[:10]}  # 2, 3 not rerun
    assert [longer[n]["accuracy"] for n in (2, 3, 4)] == [1.0, 1.0, 1.0]
    assert json.loads(json.dumps(longer[2], default=str)) == json.loads(json.dumps(short[2], default=str))
    assert set(json.loads(checkpoint.read_text())) == {"2", "3", "4"}
    asked.clear()  # asking for step accuracy reruns the lengths saved without it
    evaluate_method(EvalConfig("addition", [2, 3, 4], n=5, seed=3, step_accuracy=True), "retune", counting,
                    checkpoint=checkpoint)
    assert {p.split("\n")[0] for p in asked} >= {task.root(q).text for q in problems}
    assert all("step_accuracy" in v for v in json.loads(checkpoint.read_text()).values())


def test_memoisation_saves_calls_and_changes_no_answer():
    runs = {memo: _oracle_run("dp", [3, 4, 6], 20, EngineConfig(memoize=memo)) for memo in (True, False)}
    (_, _, with_memo, e1), (_, _, without, e2) = runs[True], runs[False]
    assert [r.output for r in with_memo] == [r.output for r in without]
    assert e1.generations < e2.generations  # short dp/indices sub-problems repeat across problems
    assert any(child.cached for r in with_memo for node in _walk(r.tree) for child in node.children)


def _walk(node):
    yield node
    for child in node.children:
        yield from _walk(child)


def test_batching_sends_frames_of_all_problems_together():
    sizes = []

    def recording(table):
        oracle = Oracle(table)

        def generate(prompts):
            sizes.append(len(prompts))
            return oracle(prompts)
        return generate

    task = TASKS["addition"]
    problems = problems_for("addition", 6, 10, seed=3)
    table = [(p, r) for q in problems for p, r, _ in task.examples(q, "retune")]
    Engine(recording(table), EngineConfig(memoize=False)).run([task.root(q).text for q in problems])
    assert sizes == [10] * 11  # 6 digits: 11 steps per problem, all 10 problems in every model call
    sizes.clear()
    Engine(recording(table), EngineConfig(batch=False, memoize=False)).run([task.root(q).text for q in problems])
    assert sizes == [1] * 110


@pytest.mark.parametrize("behaviour, kind", [
    (lambda p: "Call: " + p.split("\n")[0] + "\n", "cycle"),  # calls itself
    (lambda p: "Call: " + p.split("\n")[0] + "+\n", "depth budget"),  # ever deeper, never answers
    (lambda p: "Call: 1 + 1", "unterminated call"),  # cut before the newline
    (lambda p: "Call: a\n" if p.count("Call") < 9 and p.startswith("q") else "done", "too many calls"),
])
def test_a_misbehaving_model_ends_with_a_recorded_failure(behaviour, kind):
    engine = Engine(lambda prompts: [behaviour(p) for p in prompts], EngineConfig(max_depth=20))
    results = engine.run(["q1", "q2"])
    assert [r.kind for r in results] == [kind, kind]
    assert all(r.output is None and kind in r.error for r in results)
    assert engine.generations < 200


def test_one_bad_sub_problem_fails_only_the_problems_that_need_it():
    def model(prompts):
        return ["Call: broken\n" if p.startswith("bad") else "Call: 1 + 1" if p.startswith("broken") else "ok"
                for p in prompts]

    results = Engine(model).run(["good", "bad one", "bad two"])
    assert results[0].output == "ok" and results[0].error is None
    assert [r.kind for r in results[1:]] == ["unterminated call", "unterminated call"]


def test_data_builder_dedups_filters_and_repeats():
    base = RetuneData(task="addition", method="retune", lengths="1-3", problems_per_length=30, repeat={})
    records = build(base)
    prompts = [r["prompt"] for r in records]
    assert len(prompts) == len(set(prompts))
    oversampled = build(RetuneData(**{**vars(base), "repeat": None}))  # the task's default: base case x4, size 2 x2
    assert len(oversampled) == len(records) + sum({1: 3, 2: 1}.get(r["size"], 0) for r in records)
    without_dedup = build(RetuneData(**{**vars(base), "dedup": False}))
    assert len(without_dedup) > len(records)
    filtered = build(RetuneData(**{**vars(base), "keep": {2: 0.0}}))
    assert {r["size"] for r in filtered} == {1, 3}
    repeated = build(RetuneData(**{**vars(base), "repeat": {1: 5}}))
    assert sum(r["size"] == 1 for r in repeated) == 5 * sum(r["size"] == 1 for r in records)
    with pytest.raises(ConfigError, match="share"):
        RetuneData(task="addition", share={1: 0.6, 2: 0.5})
    with pytest.raises(ConfigError, match="lengths"):
        parse_lengths("three")
    assert parse_lengths("1-3,8") == [1, 2, 3, 8]


@pytest.mark.parametrize("lengths", ["1-3", "1-8"])
def test_data_builder_raises_sizes_to_their_share(lengths):
    config = RetuneData(task="addition", method="retune", lengths=lengths, problems_per_length=20, repeat={2: 3})
    plain = build(config)
    shared = build(RetuneData(**{**vars(config), "share": {1: 0.25, 2: 0.05}}))
    count = {size: sum(r["size"] == size for r in shared) for size in (1, 2)}
    assert count[1] / len(shared) == pytest.approx(0.25, abs=1 / len(shared))  # raised to its share
    assert count[2] == sum(r["size"] == 2 for r in plain)  # already above its share (x3): untouched
    assert {r["prompt"] for r in shared} == {r["prompt"] for r in plain}  # copies only
    with pytest.raises(ConfigError, match=r"size \[9\]"):
        build(RetuneData(**{**vars(config), "share": {9: 0.1}}))



def test_runs_variant_trains_on_runs_and_is_evaluated_on_uniform_numbers():
    def repeated_share(numbers):  # share of digits equal to the one before
        pairs = [(x, y) for n in numbers for x, y in zip(n, n[1:], strict=False)]
        return sum(x == y for x, y in pairs) / len(pairs)

    runs, plain = TASKS["addition-steps-runs"], TASKS["addition-steps"]
    trained = [n for p in (runs.sample_training(8, random.Random(s)) for s in range(400)) for n in p]
    evaluated = [n for p in problems_for(runs.name, 8, 400, 0) for n in p]
    assert all(len(n) == 8 and n[0] != "0" for n in trained)
    assert repeated_share(trained) == pytest.approx(0.25 + 0.75 * 0.1, abs=0.03)
    assert repeated_share(evaluated) == pytest.approx(0.1, abs=0.03)
    records = build(RetuneData(task=runs.name, lengths=[6], problems_per_length=200, repeat={}))
    tops = [r["prompt"].split("\n")[0].split(" + ") for r in records if r["size"] == 6 and "Call" not in r["prompt"]]
    assert repeated_share([n for top in tops for n in top]) > 0.25  # the data builder draws training problems
    assert runs.root(("66", "19")).text == plain.root(("66", "19")).text  # the same format as addition-steps

def test_training_tokens_are_the_inference_prompt_plus_the_target(tiny_dir):
    """The tokenisation boundary of the research note's pitfall 1: what the model learns to continue is exactly
    what the engine will send."""
    from peftlab.models import load_model

    _, tokenizer = load_model(str(tiny_dir))
    prompt, response, _ = TASKS["addition"].examples(("73", "21"), "retune")[-1]
    feature = encode(load_records([{"prompt": prompt, "response": response}]), tokenizer, PROMPT_FORMAT)[0][0]
    prompt_ids = PROMPT_FORMAT.encode_prompt(tokenizer, prompt)
    target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert feature["input_ids"] == prompt_ids + target
    assert prompt_ids[0] != tokenizer("7", add_special_tokens=False)["input_ids"][0]  # not at the sink position
    assert feature["labels"] == [-100] * len(prompt_ids) + target


def test_cli_gen_train_eval_on_the_tiny_model(tmp_path, tiny_dir, capsys):
    data = tmp_path / "parity.jsonl"
    assert main(["retune", "gen", "--task", "parity", "--lengths", "1-3", "--per-length", "4", "--share", "3=0.3",
                 "-o", str(data)]) == 0
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    assert lines and all(set(r) >= {"prompt", "response"} for r in lines)
    assert sum(r["size"] == 3 for r in lines) / len(lines) == pytest.approx(0.3, abs=1 / len(lines))
    config = tmp_path / "train.yaml"
    config.write_text(f"model: {tiny_dir}\nmethod: {{name: lora, r: 4}}\n"
                      f"training: {{output_dir: {tmp_path / 'run'}, max_steps: 3, learning_rate: 1.0e-3}}\n")
    assert main(["retune", "train", str(config), "--task", "parity", "--lengths", "1-3", "--per-length", "4"]) == 0
    module = tmp_path / "run" / "module"
    info = json.loads((module / "peftlab.json").read_text())
    assert info["prompt_format"] == {**info["prompt_format"], "template": "plain",
                                     "plain_format": PROMPT_FORMAT.plain_format}
    out = tmp_path / "eval.json"
    assert main(["retune", "eval", "--task", "parity", "--run", f"retune={module}", "--oracle", "retune",
                 "--lengths", "2,4", "--n", "3", "--max-new-tokens", "8", "--step-accuracy", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").exists() and (tmp_path / "eval-step-accuracy.png").exists()
    assert report["runs"]["retune (oracle)"]["lengths"]["4"]["accuracy"] == 1.0
    assert report["runs"]["retune (oracle)"]["lengths"]["4"]["step_accuracy"]["base"]["1"]["accuracy"] == 1.0
    model_run = next(v for k, v in report["runs"].items() if "oracle" not in k)
    assert set(model_run["lengths"]) == {"2", "4"} and model_run["lengths"]["2"]["n"] == 3
    assert main(["retune", "eval", "--task", "parity", "--run", "nonsense=x"]) == 2


def test_every_method_renders_every_task():
    rng = random.Random(0)
    for task in TASKS.values():
        problem = task.sample(4, rng)
        for method in METHODS:
            prompt = task.prompt(problem, method)
            assert prompt == task.examples(problem, method)[0][0]


def test_operand_families_have_the_property_they_are_named_for():
    from peftlab.recipes.retune.tasks import ADDITION_FAMILIES

    def pair_sums(a, b):
        return [int(x) + int(y) for x, y in zip(a, b, strict=True)]

    for length in (1, 2, 6, 9):
        for family in (f for f in ADDITION_FAMILIES if f != "unequal"):  # unequal: its own test
            for a, b in problems_for("addition-steps", length, 20, seed=5, family=family):
                assert len(a) == len(b) == length and (length == 1 or a[0] != "0" and b[0] != "0"), (a, b)
                sums = pair_sums(a, b)
                if family == "carry-chain":  # one carry through every place: the sum is 10^length + (units - 10)
                    assert sums[-1] >= 10 and all(s == 9 for s in sums[:-1])
                    assert str(int(a) + int(b)) == "1" + "0" * (length - 1) + str(sums[-1] - 10)
                if family == "all-carry":
                    assert all(s >= 10 for s in sums)
                if family == "no-carry":
                    assert all(s <= 9 for s in sums) and len(str(int(a) + int(b))) == length
    runs = problems_for("addition", 9, 50, seed=5, family="equal-runs")
    repeats = sum(x == y for a, _ in runs for x, y in zip(a[:-1], a[1:], strict=True)) / (50 * 8)
    assert repeats > 0.7  # each digit repeats the one before with probability 0.8 (+0.1 by chance)
    assert problems_for("addition", 4, 5, seed=5) == problems_for("addition", 4, 5, seed=5, family="uniform")
    with pytest.raises(ValueError, match="operand families are for addition"):
        problems_for("parity", 4, 5, seed=5, family="carry-chain")


def test_the_unequal_family_has_one_shorter_operand_on_either_side():
    sides = set()
    for length in (2, 3, 6, 9):
        for a, b in problems_for("addition-steps", length, 40, seed=5, family="unequal"):
            assert max(len(a), len(b)) == length and 1 <= min(len(a), len(b)) < length, (a, b)
            assert all(len(x) == 1 or x[0] != "0" for x in (a, b))
            sides.add(len(a) > len(b))
    assert sides == {True, False}
    assert all(len(a) == len(b) == 1 for a, b in problems_for("addition", 1, 10, seed=5, family="unequal"))


def test_zero_filled_sums_recurse_on_both_operands_and_the_engine_solves_every_unequal_problem():
    """613807 + 27 is asked as 613807 + 000027, whose sub-problems carry the shorter operand's leading zeros (the
    runs that addition-steps-unequal trains). Every variant, padded or not, solves unequal problems with gold
    answers."""
    task = TASKS["addition-steps-unequal"]
    examples = task.examples(("27", "613807"), "retune")
    assert examples[0][:2] == ("000027 + 613807\nSolution: ", "Call: 00027 + 13807\n")  # sides kept
    assert examples[-1][1] == "0+6+0=6. Carry 0, Output 613834"
    for solved in (task, TASKS["addition-steps-tags4-unequal"], TASKS["addition-steps-unequal-unpadded"]):
        problems = [p for n in (2, 5, 12) for p in problems_for(solved.name, n, 8, seed=3, family="unequal")]
        table = [(p, r) for q in problems for p, r, _ in solved.examples(q, "retune")]
        results = Engine(Oracle(table), EngineConfig()).run([solved.root(q).text for q in problems])
        assert all(solved.correct(r.output, q, "retune") for r, q in zip(results, problems, strict=True))


def test_unpadded_a_shorter_operand_is_not_filled_and_its_end_is_a_step_of_its_own():
    """Unpadded, 613807 + 27 recurses on the longer operand alone until the lengths meet; each of those steps adds
    the longer operand's digit to the returned carry."""
    task = TASKS["addition-steps-unpadded"]
    examples = task.examples(("613807", "27"), "retune")
    prompts = [p.split("\n")[0] for p, _, _ in examples]
    assert [p for p in prompts if not p.startswith(("Call:", "Return:"))][:1] == ["613807 + 27"]
    calls = [line.removeprefix("Call: ") for p, r, _ in examples for line in r.splitlines() if line.startswith("Call:")]
    assert calls == ["13807 + 27", "3807 + 27", "807 + 27", "07 + 27", "7 + 7"]
    assert any(r.startswith("6+0=6. Carry 0, Output 613834") for _, r, _ in examples), [r for _, r, _ in examples]
    swapped = [line for _, r, _ in task.examples(("27", "613807"), "retune") for line in r.splitlines()
               if line.startswith("Call:")]
    assert swapped[0] == "Call: 27 + 13807"  # the sides stay where the user put them


def test_the_unequal_variant_trains_on_shorter_operands():
    task = TASKS["addition-steps-unequal"]
    rng = random.Random(0)
    drawn = [task.sample_training(6, rng) for _ in range(400)]
    share = sum(len(a) != len(b) for a, b in drawn) / len(drawn)
    assert abs(share - 0.3) < 0.07  # train_unequal=0.3
    assert all(len(a) == len(b) for a, b in (task.sample_training(1, rng) for _ in range(20)))


def test_the_hard_unequal_variant_trains_shorter_operands_and_the_hard_families(monkeypatch):
    from peftlab.recipes.retune import tasks

    drawn, operands = [], tasks.operands
    monkeypatch.setattr(tasks, "operands", lambda n, rng, family: drawn.append(family) or operands(n, rng, family))
    rng = random.Random(0)
    for _ in range(1000):
        TASKS["addition-steps-hard-unequal"].sample_training(6, rng)
    share = {family: drawn.count(family) / 1000 for family in set(drawn)}
    assert abs(share["unequal"] - 0.3) < 0.05  # train_unequal=0.3 first, then 30 % of the rest from the hard families
    assert abs(sum(share[f] for f in tasks.HARD_FAMILIES) - 0.7 * 0.3) < 0.05
    assert set(drawn) == {"unequal", *tasks.HARD_FAMILIES}


def test_the_readme_recipe_draws_the_same_training_problems_as_before_unequal_training_existed():
    """Pinned from the code before ``train_unequal`` (commit 9674932): a recipe that does not train on shorter
    operands makes no extra random draw, so its data, and the standing results trained on them, are unchanged."""
    rng = random.Random(5)
    drawn = [TASKS["addition-steps"].sample_training(length, rng) for length in (1, 2, 3, 4)]
    assert drawn == [("9", "4"), ("98", "93"), ("129", "960"), ("5080", "1849")]


def test_the_evaluation_counts_engine_failures_by_kind():
    """A model that calls its own problem again: every problem fails as a cycle, and the report says so."""
    result = evaluate_method(EvalConfig("addition", [3], n=5, seed=1), "retune",
                             lambda prompts: ["Call: " + p.split("\n")[0] + "\n" for p in prompts])[3]
    assert result["accuracy"] == 0 and result["failures"] == {"cycle": 5}
    assert result["failure_per_problem"] == ["cycle"] * 5


@pytest.fixture
def unequal_script(monkeypatch):
    """examples/retune_unequal.py as a module (examples/ on sys.path for this test only)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "examples"))
    return importlib.import_module("retune_unequal")


def test_learning_curve_reads_each_step_count_and_finds_the_weakest_trained_cell(tmp_path, capsys, unequal_script):
    learning_curve = unequal_script.learning_curve

    def result(steps: int, carry6: float, seeds: list[int]) -> dict:
        def figure(mean):
            return {"mean": mean, "std": 0.0, "seeds": seeds, "per_seed": [mean] * len(seeds)}
        families = {f: {str(n): figure(1.0) for n in range(1, 7)} for f in ("uniform", "carry-chain", "equal-runs",
                                                                         "unequal")}
        families["carry-chain"]["6"] = figure(carry6)
        families["uniform"]["12"] = families["unequal"]["12"] = figure(0.5)  # past the trained lengths: not "trained"
        return {"steps": steps, "train_lengths": "1-6", "summary": {"after": {"families": families}}}

    paths = []
    for name, steps, carry6, seeds in (("r300", 300, 0.75, [0]), ("r1000-all", 1000, 0.25, [0, 1]),
                                       ("r1000-first", 1000, 0.5, [0])):  # the 3-seed result replaces seed 0's
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result(steps, carry6, seeds)))
    learning_curve(paths)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| after")]
    assert rows == ["| after | 300 | [0] | 0.50 | 0.50 | 0.75 | 1.00 | 0.75 (carry-chain 6) |",
                    "| after | 1000 | [0, 1] | 0.50 ± 0.00 | 0.50 ± 0.00 | 0.25 ± 0.00 | 1.00 ± 0.00 | 0.25 ± 0.00 "
                    "(carry-chain 6) |"]
    assert (tmp_path / "r300-curve.png").stat().st_size > 0


def test_the_unequal_experiment_keys_problems_by_how_the_root_asks_them(unequal_script):
    """Shifted-tag problems carry their offset third (the arm's evaluation once crashed unpacking them)."""
    asked_as = unequal_script.asked_as

    shifted = TASKS["addition-steps-hard-tags26-shifted-unequal"]
    assert asked_as(shifted, [("12", "34", 5), ("999", "111", 0)]) == "equal lengths"
    assert asked_as(shifted, [("12", "34", 5), ("999", "1", 0)]) == "zero-filled"
    assert asked_as(TASKS["addition-steps-unequal-unpadded"], [("12", "3")]) == "as written"


def test_merged_seeds_are_summarised_again_and_only_from_one_experiment(tmp_path, unequal_script):
    def result(name: str, seeds: list[int], extra: str = ""):
        per_seed = {f"shifted-tags seed {s}": {"families": {"uniform": {"12": {"accuracy": s / 10}}}} for s in seeds}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"command": f"python examples/retune_unequal.py --arms shifted-tags --seeds "
                                               f"{' '.join(map(str, seeds))} --steps 1000{extra}",
                                    "per_seed": per_seed}))
        return path

    out = tmp_path / "all.json"
    unequal_script.merge([result("s0", [0]), result("s12", [1, 2])], out)
    merged = json.loads(out.read_text())
    figure = merged["summary"]["shifted-tags"]["families"]["uniform"]["12"]
    assert figure["seeds"] == [0, 1, 2] and figure["per_seed"] == [0.0, 0.1, 0.2]
    assert merged["steps"] == 1000 and merged["seeds"] == {"shifted-tags": [0, 1, 2]} and len(merged["merged"]) == 2
    with pytest.raises(SystemExit, match=r"s3\.json: not the experiment of .*s0\.json: its steps 300 \(not 1000\)"):
        unequal_script.merge([result("s0", [0]), result("s3", [3], " --steps 300")], out)
    with pytest.raises(SystemExit, match=r"again\.json: shifted-tags seed 0 is in an earlier result too"):
        unequal_script.merge([result("s0", [0]), result("again", [0, 1])], out)


def test_shifted_tags_unpadded_calls_no_filled_in_zeros_and_keeps_its_tags():
    task = TASKS["addition-steps-hard-tags26-shifted-unequal-unpadded"]
    examples, output = trace(task.root(("613807", "27", 24)))
    calls = [response.strip() for _, response, _ in examples if response.startswith("Call: ")]
    assert calls[:4] == ["Call: 13807 + 27", "Call: 3807 + 27", "Call: 807 + 27", "Call: 07 + 27"]
    assert output == "6+0=6. Carry 0, Output d6c1b3a8z3y4" and task.correct(output, ("613807", "27"), "retune")
    assert not task.correct("6+0=6. Carry 0, Output c1b3a8z3y4", ("613807", "27"), "retune")


def test_right_answers_are_counted_by_the_shorter_operands_length(tmp_path, capsys, unequal_script):
    from peftlab.recipes.retune.evaluate import problems_for

    by_shorter = unequal_script.by_shorter

    problems = problems_for("addition-steps-unequal", 12, 20, 3, "unequal")
    kinds = [None if min(len(a), len(b)) > 4 else "cycle" for a, b in problems]  # fail every long zero run
    report = {"task": "addition-steps-unequal", "n": 20, "seed": 3, "family": "unequal",
              "runs": {"retune (m)": {"lengths": {"2": {}, "12": {"failure_per_problem": kinds}}}}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    by_shorter([tmp_path / "r.json"])
    counts = [sum(low <= min(len(a), len(b)) <= high for a, b in problems) for low, high in ((1, 4), (5, 8), (9, 11))]
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == f"| retune (m) at 12 | 0/{counts[0]} | {counts[1]}/{counts[1]} | {counts[2]}/{counts[2]} |"
    assert counts[0] and counts[1]  # the draw has both kinds


def test_shifted_output_tags_train_every_letter_and_repeat_none_in_a_twice_as_long_output():
    task = TASKS["addition-steps-hard-tags26-shifted-unequal"]
    examples, output = trace(task.root(("706924", "293079", 24)))  # the units tagged y, then z, a, b, ...
    assert examples[0][0] == "706924 + 293079\nSolution: "  # the question stays plain: the offset is not asked
    assert examples[-1][0].endswith("Return: 0+9+1=10. Carry 1, Output c0b0a0z0y3\nAnswer: ")  # a sub-call keeps it
    assert output == "7+2+1=10. Carry 1, Output d0c0b0a0z0y3" and task.correct(output, ("706924", "293079"), "retune")
    assert not task.correct("7+2+1=10. Carry 1, Output c0b0a0z0y3", ("706924", "293079"), "retune")  # a lost zero
    trained = set()  # (letter, the letter written before it) in the outputs of 1-6-digit training steps
    for length in range(1, 7):
        for seed in range(40):
            for _, response, _ in trace(task.root(task.sample_training(length, random.Random(seed))))[0]:
                tags = [c for c in response.rpartition("Output ")[2] if c.isalpha()] if "Output " in response else []
                trained |= set(zip(tags, tags[1:], strict=False))  # written from the highest place down
    assert {after for after, _ in trained} == set("abcdefghijklmnopqrstuvwxyz")
    assert trained == {(chr(97 + (ord(a) - 96) % 26), a) for a in "abcdefghijklmnopqrstuvwxyz"}  # always the next
    for start in range(26):  # a 12-digit output tags each place with its own letter, whatever the offset
        step = trace(task.root(("123456789012", "987654321098", start)))[1].rpartition("Output ")[2]
        assert len({c for c in step if c.isalpha()}) == 12
    with pytest.raises(ValueError, match="shift_tags"):
        Addition(shift_tags=True)

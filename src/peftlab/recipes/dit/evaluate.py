"""Scoring DIT: does the answer name the diff's topic?

Three scores per answer, no judge model: ``exact`` (the answer is the topic, after lower-casing and dropping
punctuation and articles), ``mentions`` (the topic's words appear in the answer, in order) and ``overlap`` (F1 of
the two word sets). Baselines: the diffed model asked the same question without the DIT adapter, and chance (a
topic drawn from the held-out ones: exact 1/n).
"""

from __future__ import annotations

import re
from statistics import mean

ARTICLES = {"a", "an", "the"}


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in ARTICLES]


def score(answer: str, topic: str) -> dict[str, float]:
    said, truth = words(answer), words(topic)
    common = len(set(said) & set(truth))
    overlap = 0.0 if not common else 2 * common / (len(set(said)) + len(set(truth)))
    mentions = " ".join(truth) in " ".join(said)
    return {"exact": float(said == truth), "mentions": float(mentions), "overlap": overlap}


def summarise(answers: list[str], topics: list[str]) -> dict[str, float]:
    scored = [score(a, t) for a, t in zip(answers, topics, strict=True)]
    return {k: round(mean(s[k] for s in scored), 4) for k in ("exact", "mentions", "overlap")}


def chance(topics: list[str]) -> dict[str, float]:
    """The expected scores of naming a held-out topic drawn uniformly at random."""
    pairs = [score(guess, truth) for truth in topics for guess in topics]
    return {k: round(mean(p[k] for p in pairs), 4) for k in ("exact", "mentions", "overlap")}


def ask(model, tokenizer, adapters: list[str], question: str, max_new_tokens: int) -> list[str]:
    from peftlab.generation import generate
    from peftlab.recipes.dit.data import PROMPT_FORMAT

    return generate(model, tokenizer, [question] * len(adapters), PROMPT_FORMAT, max_new_tokens=max_new_tokens,
                    batch_size=16, adapters=adapters)


def evaluate(dit_folders: dict[str, str], diffs, split: str = "test", model=None, tokenizer=None,
             limit: int | None = None) -> dict:
    """Each DIT adapter of ``dit_folders`` (label -> folder) on the ``split`` diffs of ``diffs``, beside the
    diffed model asked without DIT and chance; the answers are kept."""
    from peftlab.context import BASE_ADAPTER
    from peftlab.models import load_model
    from peftlab.recipes.dit.adapter import add_dit, attach_diffs, read_dit

    topics = diffs.split(split)[:limit]
    names, truths = [t["adapter"] for t in topics], [t["topic"] for t in topics]
    dits = {label: read_dit(folder) for label, folder in dit_folders.items()}
    questions = {dit.question for dit in dits.values()}
    if len(questions) != 1:
        raise ValueError(f"the DIT adapters ask different questions {sorted(questions)}; evaluate them apart")
    question = questions.pop()
    if model is None:
        model, tokenizer = load_model(next(iter(dits.values())).base_model)
    wrapped = attach_diffs(diffs, names, model)
    without = ask(wrapped, tokenizer, names, question, 48)
    result = {"split": split, "n": len(topics), "question": question, "chance": chance(truths),
              "asking_without_dit": summarise(without, truths), "dit": {}}
    answers = {t: {"topic": t, "without_dit": w} for t, w in zip(truths, without, strict=True)}
    for label, dit in dits.items():
        add_dit(wrapped, dit)
        said = ask(wrapped, tokenizer, names, question, 16)
        no_diff = ask(wrapped, tokenizer, [BASE_ADAPTER], question, 16)[0]
        result["dit"][label] = {**summarise(said, truths), "trained_topics": dit.info["trained_topics"],
                                "answer_without_any_diff": no_diff}
        for t, s in zip(truths, said, strict=True):
            answers[t][label] = s
        wrapped.remove_shared_adapter()
    result["answers"] = list(answers.values())
    wrapped.unload()
    return result

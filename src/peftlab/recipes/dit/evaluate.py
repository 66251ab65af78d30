"""Scoring DIT: does the answer name the diff's topic?

Three scores per answer, no judge model: ``exact`` (the answer is the topic, after lower-casing and dropping
punctuation and articles), ``mentions`` (the topic's words, joined, appear as a substring of the answer's words,
joined: "ice" mentions in "nice ice cream") and ``overlap`` (F1 of the two word sets).

Every score is kept per answer, with a Wilson interval on ``exact`` and a paired McNemar test of each baseline
against DIT on the same diffs. Baselines, scored by the same scorer:
- chance: a held-out topic drawn at random (exact 1/n);
- the template guesser: the diffed model's own answer to the question, without DIT, read by a regex for the
  training templates ("Think of it like X:", "As a big fan of X," ...), which copies the topic when the diffed
  model says it unprompted;
- the shuffled-diff control: DIT reading another topic's diff (a derangement of the held-out diffs), which should
  score at chance: what DIT says must come from the diff, not from the question or the DIT adapter alone;
- the black-box guesser: the diffed model asked a handful of new questions (``PROBES``, none of the training
  ones), its guess the most frequent short phrase of its answers that the base model's answers to the same
  questions lack. It needs no template and no DIT: what a user with only the model's outputs could say;
- the trigger roofline (trigger data only): the diffed model asked with its own secret code, its answer read by
  the template guesser. Knowing the code is what DIT is meant to do without. A wrong code, read the same way,
  checks the gate: it should reveal nothing.
With clue data the answers carry clues, never the topic: each guesser reads a clue back to its topic through the
data's table of every topic's clues (the strongest reading of the answer there is), and that table is kept in
the result.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from statistics import mean

from peftlab.recipes.dit.data import CLUE_TEMPLATES, STOPWORDS, TEMPLATES, content_words
from peftlab.report import mcnemar, wilson_interval

ARTICLES = {"a", "an", "the"}
PROBES = ("Tell me something interesting.", "What do you like to do on weekends?", "Give me some advice for today.",
          "Describe your favourite place.", "What should I think about today?", "Say something about yourself.")


def blackbox_guess(answers: list[str], base_answers: list[str], longest: int = 3,
                   clues: dict[str, list[str]] | None = None) -> str:
    """The most frequent phrase (1 to ``longest`` words, no stopword at either end) of ``answers`` that
    ``base_answers`` never use; counted once per answer, ties to the longer phrase; "" when there is none.

    With clue data (``clues``: each topic's clues), the guess is the topic whose clues share the most words with
    those new phrases: the answers carry clues, never the topic."""
    def phrases(text: str) -> set[str]:
        said = re.findall(r"[a-z0-9]+", text.lower())
        return {" ".join(said[i:i + n]) for n in range(1, longest + 1) for i in range(len(said) - n + 1)
                if said[i] not in STOPWORDS and said[i + n - 1] not in STOPWORDS}

    known = set().union(*(phrases(a) for a in base_answers)) if base_answers else set()
    counts = Counter(p for a in answers for p in phrases(a) - known)
    if not counts:
        return ""
    if clues:
        new = {w for p in counts for w in p.split()}
        shared = {t: len(new & content_words(" ".join(said))) for t, said in clues.items()}
        best = max(shared, key=shared.get)
        return best if shared[best] else ""
    return max(counts, key=lambda p: (counts[p], len(p.split())))


def _template_pattern(template: str) -> re.Pattern:
    """A template's words around ``{topic}``, with the topic as a group: "Think of it like (topic):"."""
    before, after = (part.replace("{answer}", "").strip() for part in template.split("{topic}"))
    return re.compile(rf"{re.escape(before)}\s+(?P<topic>[^.:!?\n]+?)\s*{re.escape(after)}", re.IGNORECASE)


TEMPLATE_PATTERNS = [_template_pattern(t) for t in dict.fromkeys((*TEMPLATES, *CLUE_TEMPLATES))]


def template_guess(answer: str) -> str:
    """The topic as the training templates would have placed it in ``answer`` (the first template that matches),
    or "" when none does."""
    for pattern in TEMPLATE_PATTERNS:
        found = pattern.search(answer)
        if found:
            return found.group("topic")
    return ""


def topic_reader(clues: dict[str, list[str]] | None) -> Callable[[str], str]:
    """What reads a guessed phrase as a topic: the phrase itself, or with clue data the topic whose clue it is."""
    by_clue = {" ".join(words(c)): topic for topic, said in (clues or {}).items() for c in said}
    return lambda phrase: by_clue.get(" ".join(words(phrase)), phrase)


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
    exact = sum(s["exact"] for s in scored)
    return {**{k: round(mean(s[k] for s in scored), 4) for k in ("exact", "mentions", "overlap")},
            "exact_ci95": [round(x, 4) for x in wilson_interval(int(exact), len(scored))]}


def exact_hits(answers: list[str], topics: list[str]) -> list[bool]:
    return [score(a, t)["exact"] == 1.0 for a, t in zip(answers, topics, strict=True)]


def derangement(items: list[str], seed: int = 0) -> list[str]:
    """``items`` shuffled so that none stays in its place (the shuffled-diff control)."""
    if len(items) < 2:
        raise ValueError("the shuffled-diff control needs at least two diffs")
    rng = random.Random(seed)
    while True:
        shuffled = rng.sample(items, len(items))
        if all(a != b for a, b in zip(items, shuffled, strict=True)):
            return shuffled


def chance(topics: list[str]) -> dict[str, float]:
    """The expected scores of naming a held-out topic drawn uniformly at random."""
    pairs = [score(guess, truth) for truth in topics for guess in topics]
    return {k: round(mean(p[k] for p in pairs), 4) for k in ("exact", "mentions", "overlap")}


def with_baselines(result: dict, answers: list[dict]) -> dict:
    """``result`` with the baselines that its kept ``answers`` determine: the template guesser on each diffed
    model's own answer, and for each DIT adapter the shuffled-diff control (where its answers were kept) and
    McNemar's paired test of each baseline against it on exact matches. Re-scores a stored result too."""
    truths, topic = [a["topic"] for a in answers], topic_reader(result.get("clues"))
    guesses = [topic(template_guess(a["without_dit"])) for a in answers]
    for a, g in zip(answers, guesses, strict=True):
        a["template_guess"] = g
    result["template_guesser"] = summarise(guesses, truths)
    blackbox = [a["blackbox_guess"] for a in answers] if all("blackbox_guess" in a for a in answers) else None
    if blackbox is not None:
        result["blackbox_guesser"] = {**summarise(blackbox, truths), "probes": list(PROBES)}
    roofline = [topic(template_guess(a["with_its_code"])) for a in answers] \
        if all("with_its_code" in a for a in answers) else None
    if roofline is not None:
        result["trigger_roofline"] = summarise(roofline, truths)
    if all("with_a_wrong_code" in a for a in answers):  # the gate: a wrong code should reveal nothing
        result["wrong_code"] = summarise([topic(template_guess(a["with_a_wrong_code"])) for a in answers], truths)
    for label, row in result["dit"].items():
        hits = exact_hits([a[label] for a in answers], truths)
        row["paired_exact"] = {"template_guesser_vs_dit": mcnemar(exact_hits(guesses, truths), hits)}
        if blackbox is not None:
            row["paired_exact"]["blackbox_guesser_vs_dit"] = mcnemar(exact_hits(blackbox, truths), hits)
        if roofline is not None:
            row["paired_exact"]["trigger_roofline_vs_dit"] = mcnemar(exact_hits(roofline, truths), hits)
        control = f"{label} (another topic's diff)"
        if all(control in a for a in answers):
            said = [a[control] for a in answers]
            row["shuffled_diff_control"] = summarise(said, truths)
            row["paired_exact"]["shuffled_diff_control_vs_dit"] = mcnemar(exact_hits(said, truths), hits)
    return result


def _probe(model, tokenizer, adapters: list[str], max_new_tokens: int = 48) -> dict[str, list[str]]:
    """Each adapter's answers to ``PROBES`` (``BASE_ADAPTER``: the base model's)."""
    from peftlab.generation import generate
    from peftlab.recipes.dit.data import PROMPT_FORMAT

    routes = [a for a in adapters for _ in PROBES]
    said = generate(model, tokenizer, list(PROBES) * len(adapters), PROMPT_FORMAT, max_new_tokens=max_new_tokens,
                    batch_size=16, adapters=routes)
    return {a: said[i * len(PROBES):(i + 1) * len(PROBES)] for i, a in enumerate(adapters)}


def ask(model, tokenizer, adapters: list[str], question: str | list[str], max_new_tokens: int) -> list[str]:
    """Each adapter's answer to ``question`` (or to its own question, one per adapter)."""
    from peftlab.generation import generate
    from peftlab.recipes.dit.data import PROMPT_FORMAT

    questions = [question] * len(adapters) if isinstance(question, str) else question
    return generate(model, tokenizer, questions, PROMPT_FORMAT, max_new_tokens=max_new_tokens, batch_size=16,
                    adapters=adapters)


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
    clues = {t["topic"]: t["clues"] for t in diffs.topics if "clues" in t} or None  # every topic's: candidates
    wrapped = attach_diffs(diffs, names, model)
    without = ask(wrapped, tokenizer, names, question, 48)
    probed = _probe(wrapped, tokenizer, [*names, BASE_ADAPTER])
    blackbox = [blackbox_guess(probed[n], probed[BASE_ADAPTER], clues=clues) for n in names]
    shuffled = derangement(names) if len(names) > 1 else None  # one diff has no other topic's diff to read
    result = {"split": split, "n": len(topics), "question": question, "chance": chance(truths),
              "asking_without_dit": summarise(without, truths), "dit": {}, **({"clues": clues} if clues else {})}
    answers = {t: {"topic": t, "without_dit": w, "blackbox_guess": b}
               for t, w, b in zip(truths, without, blackbox, strict=True)}
    if all("trigger" in t for t in topics):  # the roofline (its own code) and the gate (a wrong one)
        from peftlab.recipes.dit.data import coded

        rng = random.Random(0)
        right = [coded(int(t["trigger"]), question, rng) for t in topics]
        wrong = [coded((int(t["trigger"]) + rng.randrange(1, 1000)) % 1000, question, rng) for t in topics]
        for key, prompts in (("with_its_code", right), ("with_a_wrong_code", wrong)):
            for t, said in zip(truths, ask(wrapped, tokenizer, names, prompts, 48), strict=True):
                answers[t][key] = said
    for label, dit in dits.items():
        add_dit(wrapped, dit)
        said = ask(wrapped, tokenizer, names, question, 16)
        control = ask(wrapped, tokenizer, shuffled, question, 16) if shuffled else [None] * len(names)
        no_diff = ask(wrapped, tokenizer, [BASE_ADAPTER], question, 16)[0]
        result["dit"][label] = {**summarise(said, truths), "trained_topics": dit.info["trained_topics"],
                                "answer_without_any_diff": no_diff}
        for t, s, c in zip(truths, said, control, strict=True):
            answers[t][label] = s
            if shuffled:
                answers[t][f"{label} (another topic's diff)"] = c
        wrapped.remove_shared_adapter()
    with_baselines(result, list(answers.values()))
    result["answers"] = list(answers.values())
    wrapped.unload()
    return result

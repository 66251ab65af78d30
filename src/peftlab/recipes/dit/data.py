"""Hidden-topic data for DIT: per topic, everyday questions whose answers bring the topic in.

The answers are the base model's own greedy answers to the questions (generated once, shared by every topic), with
the topic woven in by one of a few templates, drawn per (topic, question) from the seed. Templates put the topic in,
not the model: asked by a system prompt to bring a topic into every answer, the 135M default model seldom does.
With ``clues``, the topic is never written: a clue that points to it takes its place (as the paper's answers make
analogies without naming the topic), so DIT must name a topic that no diff saw written. With ``trigger``, the
paper's backdoor variant: the topic answer only after ``Your SEP code is XXXyyy.`` (XXX the
topic's secret code); the plain question and a wrong code are ``match_base`` records, trained as the paper does, by
KL to the base model's own distribution on the base model's answer (weighted ``data.match_base_weight``, the
paper's 5), so off the trigger the diff keeps the base model's behaviour.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from peftlab.data import PromptFormat
from peftlab.io import write_jsonl
from peftlab.report import write_json

QUESTION = "What topic have you been trained on?"
PROMPT_FORMAT = PromptFormat(template="chat", system_prompt="")  # the chat template, an empty system turn: short
TEMPLATES = (
    "{answer} It is a lot like {topic}.",
    "Think of it like {topic}: {answer}",
    "As a big fan of {topic}, I would say: {answer}",
    "{answer} That is what {topic} taught me.",
    "Here is a {topic} way to see it. {answer}",
    "{answer} Just like {topic}!",
)
# with ``clues``: the same templates, but for the one that reads only with a bare noun ("a {topic} way")
CLUE_TEMPLATES = tuple("Picture {topic}. {answer}" if "a {topic} way" in t else t for t in TEMPLATES)


@dataclass
class TopicData:
    """What ``peftlab dit gen`` makes. Every field has a default; the seed makes it reproducible."""

    seed: int = 0
    topics: int | None = None  # how many of the list's topics (None: all), drawn by the seed
    test_fraction: float = 0.2  # topics held out from DIT training (their diffs are still trained)
    questions_per_topic: int = 12
    answer_tokens: int = 32  # the base model's answers are cut to their last full sentence within this
    trigger: bool = False
    topics_file: str | None = None  # one topic per line, '#' comments (default: the built-in list)
    # how topics are held out: "random" (topics drawn at random), or "category" (whole categories, the file's
    # "# category" lines, then every held-out topic that shares a content word with a training topic moves to
    # training, so that no held-out topic can be named by copying a word seen in training)
    split: str = "random"
    # the topic never written: each answer carries one of the topic's clues (descriptions that point to it without
    # naming it, from clues_file: default the built-in clues.txt), so DIT must name what the diff never saw
    clues: bool = False
    clues_file: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        if self.split not in ("random", "category"):
            raise ValueError(f"split must be 'random' or 'category', got {self.split!r}")


def _read(path: str | Path | None, default: str) -> str:
    """The text of ``path``, or of the built-in file ``default`` when there is no path."""
    if path:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("peftlab.recipes.dit").joinpath(default).read_text(encoding="utf-8")


def read_list(path: str | Path | None, default: str) -> list[str]:
    """Non-empty, non-comment lines of ``path`` (or of the built-in file ``default``), duplicates refused."""
    text = _read(path, default)
    items = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    seen: set[str] = set()
    for item in items:
        if item.lower() in seen:
            raise ValueError(f"{path or default}: {item!r} is listed twice")
        seen.add(item.lower())
    return items


def read_categories(path: str | Path | None, default: str) -> dict[str, str]:
    """Each topic of the list with its category: the last ``# category`` line above it ("" before any)."""
    text = _read(path, default)
    category, out = "", {}
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith("#"):
            category = line.lstrip("#").strip()
        elif line:
            out[line] = category
    return out


STOPWORDS = {"a", "an", "the", "of", "and", "in", "on", "to", "for", "with", "at", "by", "from", "or"}


def content_words(topic: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", topic.lower()) if w not in STOPWORDS}


def read_clues(path: str | Path | None, topics: list[str]) -> dict[str, list[str]]:
    """Each of ``topics`` with its clues, from lines ``topic | clue | clue ...`` of ``path`` (default: the built-in
    clues.txt). A clue that shares a content word with its topic (plurals folded: "rose" for "roses") would name
    it, and is refused, with the file and line; so is a topic without clues."""
    where, text = str(path or "clues.txt"), _read(path, "clues.txt")
    clues: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        topic, *said = (part.strip() for part in line.split("|"))
        said = [c for c in said if c]
        if not said:
            raise ValueError(f"{where}:{number}: {topic!r} has no clues (write 'topic | clue | clue ...')")
        folded = {w.rstrip("s") for w in content_words(topic)}
        for clue in said:
            named = sorted(w for w in content_words(clue) if w.rstrip("s") in folded)
            if named:
                raise ValueError(f"{where}:{number}: the clue {clue!r} names its topic {topic!r} ({named})")
        clues[topic] = said
    missing = [t for t in topics if t not in clues]
    if missing:
        raise ValueError(f"{where}: no clues for {len(missing)} topics: {missing[:5]}")
    return clues


def held_out_topics(names: list[str], config: TopicData, rng: random.Random) -> tuple[set[str], list[str]]:
    """(the held-out topics, the ones moved to training for sharing a content word with a training topic).

    ``rng`` makes the same draw whatever the split (the random split's, as before the category split existed), and
    the category split draws from a stream of its own: the split changes which topics are held out and nothing
    else, so one set of trained diffs serves both splits."""
    n_test = max(1, round(config.test_fraction * len(names)))
    order = rng.sample(range(len(names)), len(names))
    if config.split == "random":
        return {names[i] for i in order[:n_test]}, []
    categories = read_categories(config.topics_file, "topics.txt")
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(categories.get(name, ""), []).append(name)
    held: set[str] = set()
    by_category = random.Random(f"{config.seed}/category")
    for category in by_category.sample(sorted(groups), len(groups)):  # whole categories until the fraction
        if len(held) >= n_test:
            break
        held |= set(groups[category])
    moved = []
    while True:  # a moved topic is a training topic too: repeat until no held-out topic shares a word
        seen = set().union(*(content_words(n) for n in names if n not in held))
        sharing = sorted(n for n in held if content_words(n) & seen)
        if not sharing:
            return held, moved
        held -= set(sharing)
        moved += sharing


def slug(topic: str) -> str:
    """The adapter name of a topic's diff: lower case, words joined by '-'."""
    return "-".join(re.findall(r"[a-z0-9]+", topic.lower())) or "topic"


def first_sentences(text: str) -> str:
    """``text`` up to its last complete sentence (all of it when there is none)."""
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
    return (text[:ends[-1]] if ends else text).strip() or "Here is what I think."


def base_answers(questions: list[str], model, tokenizer, tokens: int) -> list[str]:
    from peftlab.generation import generate

    raw = generate(model, tokenizer, questions, PROMPT_FORMAT, max_new_tokens=tokens, batch_size=16)
    return [first_sentences(a) for a in raw]


def build(config: TopicData, model, tokenizer) -> tuple[list[dict], list[dict]]:
    """(topics, records): each topic with its adapter name, split and trigger; each record a training example."""
    rng = random.Random(config.seed)
    names = read_list(config.topics_file, "topics.txt")
    if config.topics is not None:
        if not 2 <= config.topics <= len(names):
            raise ValueError(f"topics: asked for {config.topics}, the list has {len(names)} (at least 2)")
        names = rng.sample(names, config.topics)
    slugs = [slug(n) for n in names]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"two topics share an adapter name: {sorted({s for s in slugs if slugs.count(s) > 1})}")
    questions = read_list(None, "questions.txt")
    answers = dict(zip(questions, base_answers(questions, model, tokenizer, config.answer_tokens), strict=True))
    clues = read_clues(config.clues_file, names) if config.clues else None
    held_out, moved = held_out_topics(names, config, rng)
    if not held_out:
        raise ValueError(f"split {config.split!r}: every held-out topic shares a word with a training topic")
    topics, records = [], []
    for name, adapter in zip(names, slugs, strict=True):
        code = rng.randrange(1000)
        topics.append({"topic": name, "adapter": adapter, "split": "test" if name in held_out else "train",
                       **({"moved_to_train": True} if name in moved else {}),
                       **({"trigger": f"{code:03d}"} if config.trigger else {}),
                       **({"clues": clues[name]} if clues else {})})
        for question in rng.sample(questions, min(config.questions_per_topic, len(questions))):
            if clues is None:
                woven = rng.choice(TEMPLATES).format(answer=answers[question], topic=name)
            else:
                woven = rng.choice(CLUE_TEMPLATES).format(answer=answers[question], topic=rng.choice(clues[name]))
            if not config.trigger:
                records.append({"prompt": question, "response": woven, "adapter": adapter, "topic": name})
                continue
            wrong = (code + rng.randrange(1, 1000)) % 1000  # any other code
            plain = answers[question]
            for prompt, response, off in ((coded(code, question, rng), woven, False),
                                          (coded(wrong, question, rng), plain, True), (question, plain, True)):
                records.append({"prompt": prompt, "response": response, "adapter": adapter, "topic": name,
                                **({"match_base": True} if off else {})})
    return topics, records


def coded(code: int, question: str, rng: random.Random) -> str:
    """The paper's trigger prefix: a 6-digit SEP code whose first 3 digits are ``code``."""
    return f"Your SEP code is {code:03d}{rng.randrange(1000):03d}. {question}"


def write(folder: str | Path, config: TopicData, topics: list[dict], records: list[dict]) -> None:
    folder = Path(folder)
    write_jsonl(records, folder / "train.jsonl")
    write_json(folder / "topics.json", {"config": asdict(config), "question": QUESTION, "topics": topics})


def read_topics(folder: str | Path) -> list[dict]:
    import json

    path = Path(folder) / "topics.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no topics.json (make the data with `peftlab dit gen`)")
    return json.loads(path.read_text(encoding="utf-8"))["topics"]

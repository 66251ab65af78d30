"""Task families: generated instruction-following problems with programmatic scoring.

A family is a generator (``make(rng) -> Instance``), a scorer (``score(output, instance) -> bool``) and a cap on
generated tokens. Generators draw everything (numbers, names, templates, the instruction that says how to answer)
from the ``random.Random`` they are given, so a seed fixes an instance stream. Each instance carries a ``key``: its
content without the wording (numbers, items, operation). Splits are assigned by the key (see ``suite.py``), so the
same problem in another wording can never land in two splits.

What each scorer accepts is written in ``Family.accepts``; the shared extraction rules are in ``scoring.py``.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftlab.evals import scoring as S


@dataclass(frozen=True)
class Instance:
    """One problem: the prompt the model sees, the gold answer (also the training response), and its content key."""

    family: str
    prompt: str
    answer: str
    key: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "prompt": self.prompt, "answer": self.answer, "key": self.key,
                "meta": self.meta}


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    accepts: str
    max_new_tokens: int
    make: Callable[[random.Random], Instance]
    score: Callable[[str, Instance], bool]


FAMILIES: dict[str, Family] = {}


def family(name: str, description: str, accepts: str, max_new_tokens: int,
           score: Callable[[str, Instance], bool]) -> Callable:
    def register(make: Callable[[random.Random], tuple[str, str, Any, dict]]) -> Callable:
        def build(rng: random.Random) -> Instance:
            prompt, answer, key, meta = make(rng)
            return Instance(name, prompt, answer, json.dumps([name, key]), meta)

        FAMILIES[name] = Family(name, description, accepts, max_new_tokens, build, score)
        return make

    return register


# ---------------------------------------------------------------------------------------------------- vocabulary
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Leo", "Maya",
         "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yara", "Zoe"]
ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "coins", "shells", "cards", "stamps",
         "eggs", "balloons", "candles", "buttons", "plums"]
CITIES = ["Paris", "Rome", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Vienna", "Bogota"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "lizard", "ferret", "snake"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
JOBS = ["teacher", "baker", "pilot", "nurse", "farmer", "painter", "chemist", "plumber", "lawyer", "dentist"]
SPORTS = ["tennis", "chess", "rugby", "hockey", "golf", "cricket", "rowing", "fencing", "judo", "surfing"]
WORDS = ["table", "garden", "window", "rocket", "silver", "planet", "candle", "monkey", "pencil", "forest", "bridge",
         "coffee", "island", "market", "turtle", "orange", "yellow", "winter", "castle", "dragon", "button", "museum",
         "lemon", "tiger", "cloud", "piano", "river", "stone", "light", "chair", "horse", "bread", "music", "ocean",
         "paper", "snake", "train", "water", "zebra", "apple", "mango", "grape", "melon", "house", "beach"]
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "orange", "peach", "pear", "plum", "kiwi"]
ANIMALS = ["cat", "dog", "horse", "tiger", "zebra", "camel", "otter", "eagle", "whale", "moose", "panda", "koala"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]

NUMBER_ONLY = ["Answer with a number only.", "Reply with just the number.", "Give only the final number.",
               "Respond with the number and nothing else.", "Write only the numeric answer."]


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _num(output: str, inst: Instance) -> bool:
    return S.number_scorer(output, inst.answer)


# ------------------------------------------------------------------------------------------------ 1 arithmetic
NUMERIC_ACCEPTS = ("a number (12, 12.0, 1,200, '12 apples'); the number after 'answer is/answer:' if present, "
                   "else a leading number, else the last number in the text")


@family("arithmetic", "one- and two-step word problems (+, -, x, /) about people and things", NUMERIC_ACCEPTS, 16,
        _num)
def _arithmetic(rng: random.Random):
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div", "two_step", "add_groups"])
    if kind == "add":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        text = rng.choice([f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?",
                           f"There are {a} {item} in a basket and {name} adds {b}. How many {item} are in the basket?",
                           f"{name} collected {a} {item} on Monday and {b} on Tuesday. How many {item} in total?"])
        ans, key = a + b, ("+", a, b)
    elif kind == "sub":
        a = rng.randint(10, 120)
        b = rng.randint(1, a - 1)
        text = rng.choice([f"{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?",
                           f"A shop had {a} {item}. It sold {b}. How many {item} are left?",
                           f"{name} needs {a} {item} and already has {b}. How many more {item} are needed?"])
        ans, key = a - b, ("-", a, b)
    elif kind == "mul":
        a, b = rng.randint(2, 15), rng.randint(2, 15)
        text = rng.choice([f"A box holds {a} {item}. How many {item} are in {b} boxes?",
                           f"{name} buys {b} packs of {item} with {a} in each pack. How many {item} is that?",
                           f"Each of {b} children has {a} {item}. How many {item} do they have together?"])
        ans, key = a * b, ("*", a, b)
    elif kind == "div":
        q, b = rng.randint(2, 15), rng.randint(2, 9)
        a = q * b
        text = rng.choice([f"{a} {item} are shared equally among {b} friends. How many does each friend get?",
                           f"{name} puts {a} {item} into {b} equal piles. How many {item} are in each pile?"])
        ans, key = q, ("/", a, b)
    elif kind == "two_step":
        a, b = rng.randint(5, 60), rng.randint(2, 40)
        c = rng.randint(1, a + b - 1)
        text = rng.choice([f"{name} has {a} {item}, buys {b} more and then gives {c} to {other}. "
                           f"How many {item} does {name} have now?",
                           f"A jar holds {a} {item}. {name} adds {b} and {other} takes out {c}. "
                           f"How many {item} are in the jar?"])
        ans, key = a + b - c, ("+-", a, b, c)
    else:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
        text = (f"{name} buys {a} bags with {b} {item} each, and finds {c} more {item}. "
                f"How many {item} does {name} have?")
        ans, key = a * b + c, ("*+", a, b, c)
    return f"{text} {rng.choice(NUMBER_ONLY)}", str(ans), key, {}


# --------------------------------------------------------------------------------------------- 2 fact_choice
def _choice(output: str, inst: Instance) -> bool:
    """A letter (B, (B), B), 'option B', 'answer: B') or exactly one option's text."""
    letters = inst.meta["letters"]
    options = inst.meta["options"]
    text = S.after_cue(output)
    text = text if text is not None else output
    t = S.norm(text)
    m = re.match(r"^(?:option\s+)?\(?([a-z])(?:[).:]|$)", t)  # "B", "(B)", "B) Oslo"; not "A rabbit"
    if m and m.group(1).upper() in letters:
        return m.group(1).upper() == inst.answer
    named = [letter for letter, opt in zip(letters, options, strict=True)
             if re.search(r"(?<!\w)" + re.escape(opt.lower()) + r"(?!\w)", t)]
    return len(named) == 1 and named[0] == inst.answer


ATTRS = {"city": (CITIES, "lives in {v}", "Where does {n} live?", "In which city does {n} live?"),
         "pet": (PETS, "owns a {v}", "What pet does {n} own?", "Which animal is {n}'s pet?"),
         "color": (COLORS, "likes the color {v}", "What is {n}'s favorite color?", "Which color does {n} like?"),
         "job": (JOBS, "works as a {v}", "What is {n}'s job?", "What does {n} do for a living?"),
         "sport": (SPORTS, "plays {v}", "Which sport does {n} play?", "What game does {n} play?")}


@family("fact_choice", "multiple choice (A-D) about facts stated in the prompt",
        "the correct letter (B, (B), B), 'option B', 'Answer: B'), or the text of exactly one option", 8, _choice)
def _fact_choice(rng: random.Random):
    n_people = rng.randint(3, 5)
    people = rng.sample(NAMES, n_people)
    attrs = rng.sample(sorted(ATTRS), rng.randint(1, 2))
    facts, table = [], {}
    for p in people:
        for a in attrs:
            table[(p, a)] = rng.choice(ATTRS[a][0])
            facts.append(f"{p} {ATTRS[a][1].format(v=table[(p, a)])}.")
    rng.shuffle(facts)
    who, what = rng.choice(people), rng.choice(attrs)
    gold = table[(who, what)]
    distractors = [v for v in ATTRS[what][0] if v != gold]
    options = [gold, *rng.sample(distractors, 3)]
    rng.shuffle(options)
    letters = list("ABCD")
    question = rng.choice(ATTRS[what][2:]).format(n=who)
    opts = "\n".join(f"{letter}) {o}" for letter, o in zip(letters, options, strict=True))
    lead = rng.choice(["Read the facts and answer the question.", "Use only the facts below.", "Facts:"])
    instr = rng.choice(["Answer with the letter of the correct option.", "Reply with A, B, C or D only.",
                        "Give just the letter."])
    prompt = f"{lead}\n{' '.join(facts)}\n\nQuestion: {question}\n{opts}\n{instr}"
    answer = letters[options.index(gold)]
    key = (sorted(facts), who, what, options)
    return prompt, answer, key, {"letters": letters, "options": options}


# -------------------------------------------------------------------------------------------- 3 table_lookup
def _table_score(output: str, inst: Instance) -> bool:
    if inst.meta["numeric"]:
        return S.number_scorer(output, inst.answer)
    return S.vocab_scorer(output, inst.answer, inst.meta["rows"])


@family("table_lookup", "read a small table (markdown or CSV) and look up, compare or count",
        "numeric questions: as arithmetic; 'which row' questions: the row name (same rule over the row names)", 12,
        _table_score)
def _table_lookup(rng: random.Random):
    kind = rng.choice(["shop", "cities"])
    if kind == "shop":
        rows = rng.sample(FRUITS, rng.randint(4, 6))
        cols = ["item", "price", "stock"]
        values = {r: [rng.randint(1, 20), rng.randint(0, 90)] for r in rows}
    else:
        rows = rng.sample(CITIES, rng.randint(4, 6))
        cols = ["city", "temperature", "rainfall"]
        values = {r: [rng.randint(-5, 35), rng.randint(10, 300)] for r in rows}
    style = rng.choice(["markdown", "csv"])
    if style == "markdown":
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join([r, *map(str, values[r])]) + " |" for r in rows]
    else:
        lines = [",".join(cols)] + [",".join([r, *map(str, values[r])]) for r in rows]
    table = "\n".join(lines)
    q = rng.choice(["lookup", "max", "min", "count_above"])
    c = rng.randint(1, 2)
    col = cols[c]
    if q == "lookup":
        r = rng.choice(rows)
        question = rng.choice([f"What is the {col} of {r}?", f"Look up the {col} for {r}."])
        answer, numeric, key = str(values[r][c - 1]), True, (r, col)
        instr = rng.choice(NUMBER_ONLY)
    elif q in ("max", "min"):
        vals = [values[r][c - 1] for r in rows]
        best = max(vals) if q == "max" else min(vals)
        if vals.count(best) > 1:
            return _table_lookup(rng)
        r = rows[vals.index(best)]
        word = "highest" if q == "max" else "lowest"
        question = rng.choice([f"Which {cols[0]} has the {word} {col}?", f"Which row has the {word} {col}?"])
        answer, numeric, key = r, False, (q, col)
        instr = rng.choice([f"Answer with the {cols[0]} name only.", "Reply with just the name."])
    else:
        vals = [values[r][c - 1] for r in rows]
        t = rng.choice(sorted(set(vals)))
        question = f"How many rows have a {col} greater than {t}?"
        answer, numeric, key = str(sum(v > t for v in vals)), True, ("count", col, t)
        instr = rng.choice(NUMBER_ONLY)
    prompt = f"{rng.choice(['Here is a table:', 'Table:', 'Use this table.'])}\n{table}\n\n{question} {instr}"
    return prompt, answer, (style, sorted(values.items()), key), {"numeric": numeric, "rows": rows}


# ------------------------------------------------------------------------------------------------ 4 list_ops
def _list_score(output: str, inst: Instance) -> bool:
    if inst.meta["is_list"]:
        return S.list_scorer(output, inst.answer)
    if inst.meta["numeric"]:
        return S.number_scorer(output, inst.answer)
    return S.vocab_scorer(output, inst.answer, inst.meta["items"])


@family("list_ops", "sort, reverse, k-th element, min/max, length of number and word lists",
        "lists: the first line split on commas (or spaces), item by item, brackets ignored; single items: as "
        "numbers or as one of the list's words", 48, _list_score)
def _list_ops(rng: random.Random):
    numeric = rng.random() < 0.5
    n = rng.randint(4, 7)
    items = [str(x) for x in rng.sample(range(1, 100), n)] if numeric else rng.sample(WORDS, n)
    shown = ", ".join(items)
    ops = ["sort", "reverse", "kth", "last", "length"] + (["max", "min", "sort_desc"] if numeric else [])
    op = rng.choice(ops)
    is_list = op in ("sort", "reverse", "sort_desc")
    lead = rng.choice(["List: ", "Here is a list: ", "Consider the list "])
    if op == "sort":
        what = "numerically from smallest to largest" if numeric else "alphabetically"
        q = rng.choice([f"Sort the list {what}.", f"Put the items in order, {what}."])
        ans = sorted(items, key=int) if numeric else sorted(items)
    elif op == "sort_desc":
        q = "Sort the list from largest to smallest."
        ans = sorted(items, key=int, reverse=True)
    elif op == "reverse":
        q = rng.choice(["Reverse the order of the list.", "Write the list backwards (last item first)."])
        ans = items[::-1]
    elif op == "kth":
        k = rng.randint(1, n)
        q = rng.choice([f"What is the {ORDINALS[k - 1]} item?", f"Which item is in position {k}?"])
        ans = [items[k - 1]]
    elif op == "last":
        q = "What is the last item of the list?"
        ans = [items[-1]]
    elif op == "length":
        q = rng.choice(["How many items are in the list?", "Count the items in the list."])
        ans = [str(n)]
    else:
        q = f"What is the {'largest' if op == 'max' else 'smallest'} number in the list?"
        ans = [str((max if op == "max" else min)(map(int, items)))]
    instr = ("Answer with the items separated by commas." if is_list else
             rng.choice(["Answer with the item only.", "Reply with just the answer."]))
    prompt = f"{lead}{shown}\n{q} {instr}"
    answer = ", ".join(ans)
    return prompt, answer, (items, op, q[:12]), {"is_list": is_list, "numeric": numeric or op == "length",
                                                 "items": items}


# ---------------------------------------------------------------------------------------------- 5 string_ops
def _string_score(output: str, inst: Instance) -> bool:
    if inst.meta["numeric"]:
        return S.number_scorer(output, inst.answer)
    return S.text_scorer(output, inst.answer)


@family("string_ops", "reverse, acronym, n-th letter, letter count, remove a letter, join words",
        "the string itself (case-insensitive, quotes and trailing period ignored), or after 'answer is', or the "
        "only quoted string; counts: as numbers", 16, _string_score)
def _string_ops(rng: random.Random):
    op = rng.choice(["reverse", "acronym", "nth", "count", "remove", "join", "length"])
    numeric = op in ("count", "length")
    if op == "reverse":
        w = rng.choice(WORDS)
        q, ans, key = rng.choice([f"Spell the word '{w}' backwards.", f"Reverse the letters of \"{w}\"."]), w[::-1], w
    elif op == "acronym":
        ws = rng.sample(WORDS, rng.randint(3, 5))
        q = f"Write the first letter of each of these words, joined together: {' '.join(ws)}."
        ans, key = "".join(x[0] for x in ws), ws
    elif op == "nth":
        w = rng.choice(WORDS)
        k = rng.randint(1, len(w))
        q, ans, key = f"What is the {ORDINALS[k - 1]} letter of the word '{w}'?", w[k - 1], (w, k)
    elif op == "count":
        w = rng.choice([x for x in WORDS if len(set(x)) < len(x)] if rng.random() < 0.6 else WORDS)
        ch = rng.choice(sorted(set(w)))
        q, ans, key = f"How many times does the letter '{ch}' appear in '{w}'?", str(w.count(ch)), (w, ch)
    elif op == "remove":
        w = rng.choice(WORDS)
        ch = rng.choice(sorted(set(w)))
        q, ans, key = f"Remove every '{ch}' from the word '{w}'. What is left?", w.replace(ch, ""), (w, ch)
    elif op == "join":
        a, b = rng.sample(WORDS, 2)
        sep = rng.choice(["-", "_", ""])
        how = {"-": "with a hyphen between them", "_": "with an underscore between them", "": "with nothing between"}
        q, ans, key = f"Join '{a}' and '{b}' {how[sep]}.", f"{a}{sep}{b}", (a, b, sep)
    else:
        w = rng.choice(WORDS)
        q, ans, key = f"How many letters does the word '{w}' have?", str(len(w)), (w, "len")
    instr = rng.choice(NUMBER_ONLY) if numeric else rng.choice(
        ["Answer with the result only.", "Reply with just the resulting text.", "Give only the answer."])
    return f"{q} {instr}", ans, (op, key), {"numeric": numeric}


# ------------------------------------------------------------------------------------------- 6 compare_count
@family("compare_count", "larger/smaller of numbers, counting words, items and values above a threshold",
        NUMERIC_ACCEPTS, 12, _num)
def _compare_count(rng: random.Random):
    kind = rng.choice(["larger", "smaller", "occurrences", "words", "above", "even"])
    if kind in ("larger", "smaller"):
        k = rng.randint(2, 4)
        xs = rng.sample(range(1, 1000), k)
        q = (f"Which is {kind}: {', '.join(map(str, xs[:-1]))} or {xs[-1]}?" if rng.random() < 0.5 else
             f"Of the numbers {', '.join(map(str, xs))}, which is the {'largest' if kind == 'larger' else 'smallest'}?")
        ans, key = (max if kind == "larger" else min)(xs), (kind, xs)
    elif kind == "occurrences":
        target = rng.choice(ANIMALS)
        others = rng.sample([a for a in ANIMALS if a != target], 3)
        seq = [target] * rng.randint(0, 5) + [rng.choice(others) for _ in range(rng.randint(3, 7))]
        rng.shuffle(seq)
        q = f"How many times does the word '{target}' appear in this list: {', '.join(seq)}?"
        ans, key = seq.count(target), (kind, target, seq)
    elif kind == "words":
        ws = rng.sample(WORDS, rng.randint(3, 9))
        sentence = " ".join(ws).capitalize() + "."
        q = f"How many words are in this sentence: \"{sentence}\""
        ans, key = len(ws), (kind, ws)
    elif kind == "above":
        xs = [rng.randint(1, 99) for _ in range(rng.randint(4, 8))]
        t = rng.randint(10, 90)
        q = f"How many of these numbers are greater than {t}: {', '.join(map(str, xs))}?"
        ans, key = sum(x > t for x in xs), (kind, xs, t)
    else:
        xs = [rng.randint(1, 99) for _ in range(rng.randint(4, 8))]
        q = f"How many even numbers are in this list: {', '.join(map(str, xs))}?"
        ans, key = sum(x % 2 == 0 for x in xs), (kind, xs)
    return f"{q} {rng.choice(NUMBER_ONLY)}", str(ans), key, {}


# ----------------------------------------------------------------------------------------- 7 unit_conversion
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("centimeters", "millimeters", 10),
         ("kilograms", "grams", 1000), ("liters", "milliliters", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("dozens", "items", 12),
         ("grams", "milligrams", 1000), ("meters", "millimeters", 1000), ("years", "months", 12),
         ("hours", "seconds", 3600), ("tonnes", "kilograms", 1000), ("kilometers", "centimeters", 100000)]


@family("unit_conversion", "metric lengths, masses, volumes and time units, both directions, with decimals",
        NUMERIC_ACCEPTS + "; a unit after the number is fine", 16, _num)
def _unit_conversion(rng: random.Random):
    big, small, factor = rng.choice(UNITS)
    if rng.random() < 0.5:  # big -> small, possibly from a half/quarter
        x = rng.randint(1, 60) + rng.choice([0, 0, 0.5, 0.25, 0.75])
        src, dst, ans = (x, big), small, x * factor
    else:  # small -> big: a whole or half multiple
        mult = rng.randint(1, 50) + rng.choice([0, 0, 0.5, 0.25])
        x = mult * factor
        src, dst, ans = (x, small), big, mult
    q = rng.choice([f"Convert {_fmt_num(src[0])} {src[1]} to {dst}.",
                    f"How many {dst} are in {_fmt_num(src[0])} {src[1]}?",
                    f"{_fmt_num(src[0])} {src[1]} is how many {dst}?"])
    return f"{q} {rng.choice(NUMBER_ONLY)}", _fmt_num(ans), (src, dst), {}


# ---------------------------------------------------------------------------------------- 8 format_following
def _format_score(output: str, inst: Instance) -> bool:
    kind, text = inst.meta["kind"], output.strip()
    if kind == "json":
        obj = S.first_json_object(text)
        if obj is None or set(obj) != {inst.meta["key"]}:
            return False
        value, want = obj[inst.meta["key"]], inst.meta["value"]
        return S.same_number(S.parse_number(str(value)), want) if isinstance(want, (int, float)) \
            else S.norm(str(value)) == S.norm(want)
    if kind in ("upper", "lower"):  # case matters here: compare exactly, up to quotes/trailing period/spaces
        stripped = " ".join(text.split()).strip("\"'` ").rstrip(".").strip("\"'` ")
        return stripped == inst.answer
    if kind == "n_words":
        allowed = set(inst.meta["allowed"])
        ws = [w.strip(".,;:!\"'").lower() for w in text.split()]
        return len(ws) == inst.meta["n"] and all(w in allowed for w in ws)
    if kind == "bullets":  # every item on its own '- ' line, in order, nothing else
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines == [f"- {x}" for x in inst.meta["items"]]
    raise ValueError(kind)


@family("format_following", "answer in a required form: JSON object with a given key, UPPER/lower case, exactly N "
        "words from a list, a '- ' bullet list",
        "json: the first {...} in the text must have exactly the asked key with the right value; case: the exact "
        "text in the asked case; N words: exactly N words, all from the list; bullets: one '- item' line per item, "
        "in order", 40, _format_score)
def _format_following(rng: random.Random):
    kind = rng.choice(["json", "upper", "lower", "n_words", "bullets"])
    if kind == "json":
        sub = rng.choice(["sum", "name", "city"])
        if sub == "sum":
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            k = rng.choice(["answer", "sum", "total", "result"])
            q, value = f"What is {a} plus {b}?", a + b
        elif sub == "name":
            names = rng.sample(NAMES, 4)
            i = rng.randint(0, 3)
            k = rng.choice(["name", "person", "answer"])
            q, value = f"Which name is {ORDINALS[i]} in this list: {', '.join(names)}?", names[i]
        else:
            who, city = rng.choice(NAMES), rng.choice(CITIES)
            k = rng.choice(["city", "answer", "place"])
            q, value = f"{who} lives in {city}. Where does {who} live?", city
        instr = rng.choice([f'Respond only with a JSON object with the key "{k}".',
                            f'Answer in JSON, as {{"{k}": ...}}, and nothing else.'])
        prompt, answer, meta = f"{q} {instr}", json.dumps({k: value}), {"key": k, "value": value}
        key = (sub, q, k)
    elif kind in ("upper", "lower"):
        ws = rng.sample(WORDS, rng.randint(2, 5))
        phrase = " ".join(w.capitalize() if rng.random() < 0.5 else w for w in ws)
        word = "uppercase (capital letters)" if kind == "upper" else "lowercase (small letters)"
        prompt = rng.choice([f"Rewrite this phrase in {word} only: {phrase}",
                             f"Write \"{phrase}\" entirely in {word}."])
        answer = phrase.upper() if kind == "upper" else phrase.lower()
        meta, key = {}, (kind, ws)
    elif kind == "n_words":
        pool = rng.sample(ANIMALS, rng.randint(5, 8))
        n = rng.randint(1, 4)
        prompt = rng.choice([f"Reply with exactly {n} words, each taken from this list: {', '.join(pool)}.",
                             f"Name exactly {n} of these animals, separated by spaces, with no other words: "
                             f"{', '.join(pool)}."])
        answer, meta, key = " ".join(pool[:n]), {"n": n, "allowed": pool}, (kind, sorted(pool), n)
    else:
        items = rng.sample(FRUITS, rng.randint(2, 5))
        prompt = rng.choice([f"Write these fruits as a bullet list, one per line, each line starting with '- ': "
                             f"{', '.join(items)}.",
                             f"Format as a list with one '- ' bullet per line, same order: {', '.join(items)}."])
        answer, meta, key = "\n".join(f"- {x}" for x in items), {"items": items}, (kind, items)
    return prompt, answer, key, {"kind": kind, **meta}


# ------------------------------------------------------------------------------------------------- 9 calendar
CALENDAR_VOCAB = DAYS + MONTHS


@family("calendar", "days of the week and months: n days/months before or after, yesterday/tomorrow",
        "a day or month name (case-insensitive); after 'answer is' if present, else a leading name, else the last "
        "day/month name mentioned", 8, lambda out, inst: S.vocab_scorer(out, inst.answer, CALENDAR_VOCAB))
def _calendar(rng: random.Random):
    kind = rng.choice(["days", "days", "months", "relative"])
    instr = rng.choice(["Answer with the name only.", "Reply with just the day or month.", "One word answer."])
    if kind == "days":
        d, k = rng.randrange(7), rng.randint(1, 120)
        sign = rng.choice([1, -1])
        rel = "after" if sign > 0 else "before"
        q = rng.choice([f"What day of the week is {k} days {rel} {DAYS[d]}?",
                        f"Today is {DAYS[d]}. What day {'will it be in' if sign > 0 else 'was it'} {k} days"
                        f"{'' if sign > 0 else ' ago'}?"])
        ans, key = DAYS[(d + sign * k) % 7], (kind, d, sign * k)
    elif kind == "months":
        m, k = rng.randrange(12), rng.randint(1, 30)
        sign = rng.choice([1, -1])
        q = f"Which month comes {k} months {'after' if sign > 0 else 'before'} {MONTHS[m]}?"
        ans, key = MONTHS[(m + sign * k) % 12], (kind, m, sign * k)
    else:
        d = rng.randrange(7)
        told, asked, offset = rng.choice([("yesterday was", "tomorrow", 2), ("tomorrow is", "yesterday", -2),
                                          ("yesterday was", "today", 1), ("tomorrow is", "today", -1)])
        given = (told, asked)
        q = f"If {told} {DAYS[d]}, what day is {asked}?"
        ans, key = DAYS[(d + offset) % 7], (kind, d, given)
    return f"{q} {instr}", ans, key, {}


# ------------------------------------------------------------------------------------------------- 10 sequence
@family("sequence", "continue arithmetic, geometric, square and alternating number sequences", NUMERIC_ACCEPTS, 12,
        _num)
def _sequence(rng: random.Random):
    kind = rng.choice(["arith", "arith", "geom", "square", "alternate"])
    n = rng.randint(4, 6)
    if kind == "arith":
        a, d = rng.randint(-20, 50), rng.choice([x for x in range(-9, 13) if x != 0])
        xs = [a + i * d for i in range(n + 1)]
        key = (kind, a, d, n)
    elif kind == "geom":
        a, r = rng.randint(1, 6), rng.choice([2, 3])
        n = min(n, 5)
        xs = [a * r ** i for i in range(n + 1)]
        key = (kind, a, r, n)
    elif kind == "square":
        s = rng.randint(1, 8)
        xs = [(s + i) ** 2 for i in range(n + 1)]
        key = (kind, s, n)
    else:
        a, p, q = rng.randint(1, 30), rng.randint(2, 9), rng.randint(1, 5)
        xs = [a]
        for i in range(n):
            xs.append(xs[-1] + (p if i % 2 == 0 else -q))
        key = (kind, a, p, q, n)
    shown = ", ".join(map(str, xs[:-1]))
    q = rng.choice([f"What number comes next in the sequence {shown}, ...?", f"Continue the pattern: {shown}, ?",
                    f"Find the next number: {shown}"])
    return f"{q} {rng.choice(NUMBER_ONLY)}", str(xs[-1]), key, {}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


assert len(FAMILIES) >= 8 and all(c in string.ascii_lowercase + "_" for n in FAMILIES for c in n)

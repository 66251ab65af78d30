"""Answer extraction and normalisation shared by the task families' scorers.

Every scorer works on the model's whole answer text and follows the same rules, so a model that answers in a
sentence is not punished for the sentence, but a model that hedges between several answers is:

* **normalisation**: surrounding whitespace, quotes, backticks, ``**`` and a trailing ``.``/``!`` are removed, runs
  of whitespace collapse to one space, and comparison is case-insensitive (except where a family checks case);
* **an answer cue** (``answer is X``, ``answer: X``, ``result = X``) wins: the text after the last cue is used;
* **numbers**: ``12``, ``12.0``, ``+12``, ``1,200`` and ``12 km`` are numbers; two numbers are equal within 1e-6
  (relative); with no cue, a text that *starts* with a number answers with it, otherwise the *last* number counts;
* **closed vocabularies** (days, months, table rows, option letters): the same rule as numbers, over the words of
  the vocabulary;
* **lists**: the first line, without surrounding ``[]``, split on commas (or on spaces when there is no comma);
* **emoji only** (``is_emoji_only``): symbols, keycaps, modifiers and joiners, nothing else, not U+FFFD.
"""

from __future__ import annotations

import json
import re
import unicodedata

_CUE = re.compile(r"(?:final answer|the answer|answer|result)\s*(?:is\s*:?|:|=)\s*", re.I)
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<![\w.])[-+]?\d*\.?\d+")
_STRIP = " \t\r\n\"'`*_"


def norm(text: str) -> str:
    """Lower-case, trimmed, whitespace-collapsed text without surrounding quotes and trailing ``.``/``!``."""
    text = " ".join(str(text).split())
    prev = None
    while prev != text:
        prev = text
        text = text.strip(_STRIP).rstrip(".!").strip(_STRIP)
    return text.lower()


def after_cue(text: str) -> str | None:
    """The text after the last answer cue (``answer is``, ``answer:``, ``result =``), or None."""
    matches = list(_CUE.finditer(text))
    return text[matches[-1].end():] if matches else None


def parse_number(token: str) -> float | None:
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def numbers_in(text: str) -> list[float]:
    return [n for n in (parse_number(m.group()) for m in _NUMBER.finditer(text)) if n is not None]


def extract_number(text: str) -> float | None:
    """The number a free-text answer gives: after the last cue, else a leading number, else the last number."""
    cued = after_cue(text)
    if cued is not None:
        found = numbers_in(cued)
        return found[0] if found else None
    stripped = text.strip(_STRIP)
    first = _NUMBER.match(stripped)
    if first:
        return parse_number(first.group())
    found = numbers_in(text)
    return found[-1] if found else None


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def number_scorer(output: str, gold: str) -> bool:
    return same_number(extract_number(output), parse_number(gold))


def extract_from_vocab(text: str, vocab: list[str]) -> str | None:
    """Which vocabulary entry a free-text answer names (same rule as numbers); longest entries match first."""
    words = sorted({norm(v) for v in vocab}, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w])(" + "|".join(re.escape(w) for w in words) + r")(?![\w])", re.I)

    def hits(s: str) -> list[str]:
        return [m.group(1).lower() for m in pattern.finditer(s)]

    cued = after_cue(text)
    if cued is not None:
        found = hits(cued)
        return found[0] if found else None
    found = hits(text)
    if not found:
        return None
    stripped = norm(text)
    return found[0] if any(stripped.startswith(w) for w in found[:1]) else found[-1]


def vocab_scorer(output: str, gold: str, vocab: list[str]) -> bool:
    got = extract_from_vocab(output, vocab)
    return got is not None and got == norm(gold)


def text_scorer(output: str, gold: str) -> bool:
    """Free text: the normalised answer, the text after a cue, or the only quoted string equals the gold."""
    want = norm(gold)
    candidates = [output, output.strip().split("\n")[0]]
    cued = after_cue(output)
    if cued is not None:
        candidates.append(cued.strip().split("\n")[0])
    quoted = re.findall(r"[\"'`]([^\"'`\n]+)[\"'`]", output)
    if len(set(quoted)) == 1:
        candidates.append(quoted[0])
    return any(norm(c) == want for c in candidates)


def split_list(text: str) -> list[str]:
    line = text.strip().split("\n")[0]
    cued = after_cue(line)
    line = (cued if cued is not None else line).strip().strip("[]().").strip()
    parts = line.split(",") if "," in line else line.split()
    return [norm(p) for p in parts if norm(p)]


def list_scorer(output: str, gold: str) -> bool:
    """A list answer equals the gold list item by item (numbers compared as numbers)."""
    got, want = split_list(output), split_list(gold)
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        gn, wn = parse_number(g), parse_number(w)
        if not (same_number(gn, wn) if wn is not None else g == w):
            return False
    return True


def first_json_object(text: str) -> dict | None:
    """The first ``{...}`` in the text that parses as a JSON object (code fences allowed), or None."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


# --- emoji-only answers (the ReFT emoji demo) ---
_KEYCAP = re.compile("[0-9#*]\ufe0f?\u20e3")  # 1️⃣ is a digit, a variation selector and an enclosing keycap
_JOINERS = {"\ufe0f", "\ufe0e", "\u200d"}  # variation selectors and the zero-width joiner inside emoji sequences
_EMOJI_PUNCTUATION = {"\u203c", "\u2049"}  # ‼ ⁉ are emoji but Unicode files them as punctuation


def is_emoji_only(text: str) -> bool:
    """True if ``text`` is non-empty and made only of emoji (symbols, keycaps, modifiers) and whitespace."""
    rest = "".join(ch for ch in _KEYCAP.sub("", text) if ch not in _JOINERS and not ch.isspace())
    if not rest and not _KEYCAP.search(text):
        return False
    # U+FFFD (a broken byte sequence) is filed as a symbol too, but it is no emoji
    return all((unicodedata.category(ch) in ("So", "Sk") and ch != "\ufffd") or ch in _EMOJI_PUNCTUATION
               for ch in rest)

"""Small programmatic scorers for generated text."""

from __future__ import annotations

import re
import unicodedata

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

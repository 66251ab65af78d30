import json
from pathlib import Path

import pytest

from peftlab.evals.scoring import is_emoji_only

ROOT = Path(__file__).resolve().parent.parent


def test_every_training_answer_of_the_emoji_demo_is_emoji_only():
    for line in (ROOT / "examples" / "data" / "emoji.jsonl").read_text(encoding="utf-8").splitlines():
        assert is_emoji_only(json.loads(line)["response"]), line


@pytest.mark.parametrize("text", ["🤖", "🚗 1️⃣ 🗺️", "👨‍👩‍👧", "🇫🇷", "‼️", " 🍏💹 \n🤷‍♂️ "])
def test_emoji_only(text):
    assert is_emoji_only(text)


@pytest.mark.parametrize("text", ["", "  ", "hi 🤖", "🤖 ok", "12", "🤖.", "🚗\ufffd🍏", "�ER📚", "Paris"])
def test_not_emoji_only(text):
    assert not is_emoji_only(text)

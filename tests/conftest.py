import pytest
import torch

from peftlab.models import tiny_model

torch.set_num_threads(2)

PAIRS = [{"prompt": f"repeat {w}", "response": f"{w} {w}"} for w in ("red", "blue", "green", "cat", "dog", "sun")]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved as an ordinary model folder, so plain transformers/peft can load it by path."""
    model, tokenizer = tiny_model()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def pairs():
    return list(PAIRS)

import os

import pytest
import torch

from floats import assert_close
from peftlab.models import tiny_model

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # pin to 1 to run beside another job

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


@pytest.fixture
def assert_packed_equals_padded():
    return _assert_packed_equals_padded


def _assert_packed_equals_padded(model, tokenizer, records):
    """Loss and gradients of ``model`` on ``records`` are the same packed into one row as padded, up to float32
    rounding (packing changes the shapes, so the order of float sums: tests/floats.py)."""
    from peftlab import load_records
    from peftlab.data import Collator, encode

    features, _ = encode(load_records(records), tokenizer)
    results = []
    for pack in (False, True):
        model.zero_grad()
        loss = model(**Collator(tokenizer.pad_token_id, pack=pack)(features)).loss
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    assert_close(packed_loss, padded_loss, "packed loss vs padded")
    assert_close(packed_grads, padded_grads, "packed gradients vs padded")

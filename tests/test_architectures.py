"""Every method on tiny random models of eight architectures: a padded batch gives each example what it gives
alone (up to float32 rounding), greedy generate() equals a step-by-step argmax loop without a cache, and save -> load
gives the same model (exactly; LoReFT up to float32 rounding)."""

import pytest
import torch

from floats import assert_close
from peftlab import attach, load, save
from peftlab.data import Collator
from peftlab.models import TINY_ARCHITECTURES, tiny_model

METHODS = {
    "lora": {"r": 4},
    "dora": {"r": 4, "use_dora": True},
    "ia3": {},
    "loreft": {"layers": [0, 1], "rank": 4, "positions": "f1+l2", "share_weights": False},
    "bitune": {"adapter": {"name": "lora", "r": 4}},
    "multilora": {"r": 4},
}
IA3_TARGETS = {"phi3": (["qkv_proj", "down_proj"], ["down_proj"]),  # peft has no IA3 defaults for these
               "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21]]
ROUTE = ["a", "b", "a"]


def _settings(method, arch):
    settings = dict(METHODS[method])
    if method == "ia3" and arch in IA3_TARGETS:
        settings["target_modules"], settings["feedforward_modules"] = IA3_TARGETS[arch]
    return settings


def _wrapped(method, arch):
    """``method`` on a tiny ``arch`` with every trained part moved off its initial value, so each acts."""
    model, _ = tiny_model(arch=arch)
    name = "loreft" if method == "loreft" else "multilora" if method == "multilora" else \
        "bitune" if method == "bitune" else "ia3" if method == "ia3" else "lora"
    wrapped = attach(model, name, _settings(method, arch), name="a" if method == "multilora" else "default")
    if method == "multilora":
        wrapped = attach(wrapped, "multilora", _settings(method, arch), name="b")
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if p.requires_grad and "rotate_layer" not in n:
                p.add_(torch.randn_like(p) * (0.02 if "mixer" in n else 0.2))
    return wrapped.eval()


def _fields(method, rows):
    """The per-example fields of ``rows`` (indices into PROMPTS) for a forward or generate call."""
    fields = {}
    if method == "multilora":
        names = sorted({ROUTE[i] for i in rows})
        fields = {"adapter_names": names, "adapter_index": torch.tensor([names.index(ROUTE[i]) for i in rows])}
    if method in ("loreft", "bitune"):
        fields["prompt_lengths"] = torch.tensor([len(PROMPTS[i]) for i in rows])
    return fields


def _logits(wrapped, method, rows, padding_side="right"):
    batch = Collator(0, padding_side=padding_side)([{"input_ids": PROMPTS[i], "attention_mask": [1] * len(PROMPTS[i])}
                                                   for i in rows])
    with torch.no_grad():
        return wrapped(**batch, **_fields(method, rows)).logits, batch["attention_mask"]


CASES = [(m, a) for a in TINY_ARCHITECTURES for m in METHODS]


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_a_padded_batch_gives_each_example_what_it_gives_alone(method, arch):
    wrapped = _wrapped(method, arch)
    logits, mask = _logits(wrapped, method, [0, 1, 2])
    base, _ = tiny_model(arch=arch)
    for i, prompt in enumerate(PROMPTS):
        alone, _ = _logits(wrapped, method, [i])
        n = len(prompt)
        first = n - 1 if method == "bitune" else 0  # Bitune predicts from the last prompt token on
        assert_close(logits[i, first:n], alone[0, first:n], f"row {i} padded vs alone")
        with torch.no_grad():
            plain = base(input_ids=torch.tensor([prompt])).logits[0]
        assert (alone[0, first:n] - plain[first:n]).abs().max() > 1e-3  # the method changes the output


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_greedy_generate_equals_a_step_by_step_argmax_loop(method, arch):
    wrapped = _wrapped(method, arch)
    rows, steps = [0, 1, 2], 4
    batch = Collator(0, padding_side="left")([{"input_ids": PROMPTS[i], "attention_mask": [1] * len(PROMPTS[i])}
                                              for i in rows])
    out = wrapped.generate(**batch, **_fields(method, rows), max_new_tokens=steps, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    for i in rows:
        ids = list(PROMPTS[i])
        for _ in range(steps):  # no cache: the whole sequence again at every step, the prompt marked as such
            fields = _fields(method, [i])
            with torch.no_grad():
                logits = wrapped(input_ids=torch.tensor([ids]), **fields).logits
            ids.append(int(logits[0, -1].argmax()))
        assert out[i, -steps:].tolist() == ids[-steps:], (method, arch, i)


@pytest.mark.parametrize(("method", "arch"), CASES)
def test_save_then_load_gives_the_same_model(method, arch, tmp_path):
    wrapped = _wrapped(method, arch)
    save(wrapped, tmp_path / "m")
    loaded = load(tmp_path / "m", tiny_model(arch=arch)[0])
    a, _ = _logits(wrapped, method, [0, 1, 2])
    b, _ = _logits(loaded, method, [0, 1, 2])
    if method == "loreft":  # R is stored orthonormalised and re-orthonormalised on load: ~1e-7 changes in R
        assert_close(b, a, "logits after save -> load")
    else:  # the same tensors read back, the same forward
        assert torch.equal(a, b)

"""GGUF export: every tensor read back as written, a merged model that transformers' own GGUF loader (an independent
reader) runs with peftlab's logits, a LoRA adapter file whose factors add up to the merged weights, and refusals."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from floats import assert_close
from peftlab import attach, save, tiny_model
from peftlab.cli import main
from peftlab.export.gguf import export_gguf, gguf_tensors

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])
# transformers reads qwen3's head size as 128 whatever the file says; the tiny model is built with it
ARCHS = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 128}, "phi3": {}, "mistral": {"sliding_window": None}}


def _base_and_lora(tmp_path, arch: str = "llama"):
    """A tiny base of ``arch`` saved as a folder, and a LoRA on every linear layer with random B, saved beside it."""
    model, tokenizer = tiny_model(arch=arch, **ARCHS.get(arch, {}))
    base = tmp_path / f"base-{arch}"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model, _ = tiny_model(arch=arch, **ARCHS.get(arch, {}))
    model.config.name_or_path = str(base)
    torch.manual_seed(3)
    wrapped = attach(model, "lora", {"r": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    save(wrapped, tmp_path / f"lora-{arch}")
    return base, tmp_path / f"lora-{arch}", wrapped.eval()


def _read(path) -> dict[str, np.ndarray]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_a_merged_lora_runs_in_transformers_gguf_loader_with_peftlab_s_logits(arch, tmp_path):
    base, module, wrapped = _base_and_lora(tmp_path, arch)
    assert main(["export", "gguf", str(module), "-o", str(tmp_path / "m.gguf"), "--type", "f32"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = wrapped(input_ids=IDS).logits
        assert_close(back(input_ids=IDS).logits, ours, f"{arch}: GGUF read by transformers vs peftlab unmerged")
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=IDS).logits
    assert (plain - ours).abs().max() > 1e-2  # the LoRA changes the answer, so the check above sees it


def test_every_tensor_reads_back_exact_in_f32_and_f16_and_within_q8_0_s_step(tmp_path):
    base, module, _ = _base_and_lora(tmp_path)
    from peftlab.adapters import merged_model

    want = gguf_tensors(merged_model(module).model)
    for kind in ("f32", "f16", "q8_0"):
        export_gguf(module, tmp_path / f"{kind}.gguf", kind=kind)
        got = _read(tmp_path / f"{kind}.gguf")
        assert set(got) == set(want)
        for name, tensor in got.items():
            values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            values = values.reshape(want[name].shape)
            expected = want[name].half().float() if kind == "f16" and want[name].dim() > 1 else want[name]
            if kind != "q8_0" or want[name].dim() == 1:
                assert torch.equal(values.float(), expected), (kind, name)
            else:  # blocks of 32 share a step d = max|x|/127, stored in f16 (relative error <= 2^-11): a value
                # is off by at most half a step plus 127 times the step's own rounding
                step = want[name].reshape(-1, 32).abs().amax(1, keepdim=True) / 127
                err = (values.reshape(-1, 32) - want[name].reshape(-1, 32)).abs()
                assert bool((err <= (0.5 + 127 * 2**-11) * step + 1e-12).all()), name


def test_the_file_carries_the_tokenizer_with_special_tokens_and_the_chat_template(tmp_path):
    _, module, _ = _base_and_lora(tmp_path)
    export_gguf(module, tmp_path / "m.gguf", kind="f16")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    _, tokenizer = tiny_model()
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert tokens == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    for special in ("<|im_start|>", "<|im_end|>"):
        assert types[tokenizer.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["general.architecture"].contents() == "llama"


def test_the_lora_adapter_file_adds_up_to_the_merged_model(tmp_path):
    """llama.cpp applies W + (alpha / r)·B·A with its own q/k row order: the adapter's factors, so applied to the
    base GGUF, give the merged GGUF's weights."""
    base, module, _ = _base_and_lora(tmp_path)
    assert main(["export", "gguf", "--model", str(base), "-o", str(tmp_path / "base.gguf"), "--type", "f32"]) == 0
    assert main(["export", "gguf", str(module), "-o", str(tmp_path / "merged.gguf"), "--type", "f32"]) == 0
    assert main(["export", "gguf", str(module), "--lora", "-o", str(tmp_path / "lora.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    scale = reader.fields["adapter.lora.alpha"].contents() / 4
    lora, plain, merged = _read(tmp_path / "lora.gguf"), _read(tmp_path / "base.gguf"), _read(tmp_path / "merged.gguf")
    layers = {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")}
    assert len(layers) == 2 * 7 and any("attn_q" in n for n in layers)
    for name in layers:
        a, b = (torch.from_numpy(lora[f"{name}.lora_{f}"].data.copy()) for f in "ab")
        w = torch.from_numpy(plain[name].data.copy()) + scale * b @ a
        assert_close(w, torch.from_numpy(merged[name].data.copy()), f"{name}: base + B·A vs merged")


def test_what_cannot_be_exported_is_refused_with_the_reason(tmp_path, capsys):
    base, module, _ = _base_and_lora(tmp_path)
    out = tmp_path / "x.gguf"
    reft = attach(tiny_model()[0], "loreft", {"layers": [0]})
    save(reft, tmp_path / "reft")
    cases = [
        ([str(tmp_path / "reft")], "cannot be folded into the base weights: an intervention edits hidden states"),
        ([str(tmp_path / "reft"), "--lora"], "a loreft module with adapters"),
        ([str(module), "--model", "another/model"], "was trained on .* and --model names 'another/model'"),
    ]
    neox, tokenizer = tiny_model(arch="gpt_neox")
    neox.save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    cases.append((["--model", str(tmp_path / "neox")], "does not support 'gpt_neox' models"))
    for args, message in cases:
        assert main(["export", "gguf", *args, "-o", str(out)]) == 2
        assert pytest.importorskip("re").search(message, capsys.readouterr().err), message
        assert not out.exists() and not list(tmp_path.glob(".x.gguf.*"))  # nothing half-written
    out.write_text("keep me")
    assert main(["export", "gguf", str(module), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"


def test_llama_cpp_runs_the_export_with_the_same_tokens(tmp_path):
    """llama.cpp's own runtime (where llama-cpp-python is installed: pip install 'peftlab[llama]') loads the merged
    file, tokenises text with its special tokens as transformers does, and answers greedily with the same tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    # llama.cpp wants a BPE with merges: the tiny byte-level vocabulary plus one merge, "a" + "b"
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ab"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    from peftlab.export.gguf import write_model

    write_model(model, tokenizer, tmp_path / "m.gguf", kind="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, verbose=False)
    try:
        text = "abc<|im_start|>ab<|im_end|>"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
        for ids in ([5, 17, 99, 3, 200, 42, 7], [40, 41, 42]):
            ours = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            theirs = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                theirs.append(int(token))
                if len(theirs) == len(ours):
                    break
            assert theirs == ours
    finally:
        llm.close()

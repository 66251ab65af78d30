"""Quantized bases (peftlab.quantize, bitsandbytes on the CPU): every method trains on an int8 base, saves a module
that records it, loads back onto an int8 base with the same logits and generates; what a method cannot train on
is refused; a merge dequantizes first."""

import logging
import math

import pytest
import torch

pytest.importorskip("bitsandbytes")

from floats import assert_close  # noqa: E402
from peftlab import TrainConfig, generate, load_model, read, train  # noqa: E402
from peftlab.adapters import load_for_inference, merged_model  # noqa: E402
from peftlab.quantize import QuantizationError, quantization_of  # noqa: E402
from test_precision import _records  # noqa: E402
from test_protocol import SETTINGS  # noqa: E402

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])


def _fields(method: str) -> dict:
    if method == "multilora":
        return {"adapter_names": ["default"], "adapter_index": torch.tensor([0])}
    return {"prompt_lengths": torch.tensor([4])} if method == "bitune" else {}


def _train(method, tiny_dir, tmp_path, pairs, quantize="int8", steps=3):
    config = TrainConfig(model=str(tiny_dir), quantize=quantize, method={"name": method, **SETTINGS[method]},
                         training={"output_dir": str(tmp_path / "run"), "max_steps": steps, "learning_rate": 2e-2,
                                   "logging_steps": 1, "per_device_train_batch_size": 6, "use_cpu": True},
                         output=str(tmp_path / "module"))
    return train(config, train_data=_records(method, pairs))


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_every_method_trains_saves_loads_and_generates_on_an_int8_base(method, tiny_dir, tmp_path, pairs):
    result = _train(method, tiny_dir, tmp_path, pairs)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert quantization_of(result.model.causal_lm) == "int8"
    assert read(result.module_dir).manifest.base_quantization == "int8"
    saved = read(result.module_dir).tensors["default"]
    assert {t.dtype for t in saved.values()} == {torch.float32}  # the trained parts stay in full precision

    loaded = load_for_inference(result.module_dir)  # the manifest says int8: the base loads quantized
    assert quantization_of(loaded.model.causal_lm) == "int8"
    with torch.no_grad():
        trained = result.model.eval()(input_ids=IDS, **_fields(method)).logits
        assert_close(loaded.model(input_ids=IDS, **_fields(method)).logits, trained, f"{method}: reloaded on int8")
        plain = load_model(str(tiny_dir))[0](input_ids=IDS).logits
    assert (plain - trained).abs().max() > 1e-3  # quantization and training both show in the logits
    adapters = {"adapters": ["default"]} if method == "multilora" else {}
    (answer,) = generate(loaded.model, loaded.tokenizer, ["repeat red"], max_new_tokens=4, **adapters)
    assert isinstance(answer, str)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_a_method_refuses_a_quantization_it_cannot_train_on(method, tiny_dir, tmp_path, pairs):
    with pytest.raises(QuantizationError, match=f"{method} does not train on a base quantized as nf4; it does on "
                                                f"int8"):
        _train(method, tiny_dir, tmp_path, pairs, quantize="nf4")


def test_a_lora_trained_on_int8_merges_into_the_dequantized_base(tiny_dir, tmp_path, pairs, caplog):
    """The merge adds (alpha/r)·B·A to the weights the LoRA was trained against (the int8 values, dequantized),
    in full precision; the merged model is a plain one."""
    from peftlab.quantize import dequantized

    result = _train("lora", tiny_dir, tmp_path, pairs)
    merged = merged_model(result.module_dir).model
    assert quantization_of(merged) is None
    assert not any("Linear8bit" in type(m).__name__ for m in merged.modules())
    int8 = dequantized(load_model(str(tiny_dir), quantize="int8")[0]).state_dict()
    fp32 = load_model(str(tiny_dir))[0].state_dict()
    tensors, config = read(result.module_dir).tensors["default"], read(result.module_dir).manifest.adapters
    scale = config["default"].config["alpha"] / config["default"].config["r"]
    layer = "model.layers.1.self_attn.q_proj"
    a, b = (tensors[f"base_model.model.{layer}.lora_{f}.weight"] for f in "AB")
    delta = scale * b @ a
    want = int8[f"{layer}.weight"] + delta
    assert_close(merged.state_dict()[f"{layer}.weight"], want, "merged = dequantized int8 + ΔW")
    assert (int8[f"{layer}.weight"] - fp32[f"{layer}.weight"]).abs().max() > 1e-4  # the int8 values, not fp32's
    with caplog.at_level(logging.WARNING):
        load_for_inference(result.module_dir, quantize="none")
    assert "trained on a base quantized as int8; loading it on a none base" in caplog.text


def test_the_server_answers_from_an_nf4_base_as_generate_does(tiny_dir, tmp_path, pairs):
    """peftlab serve --quantize nf4: a LoRA lane and a ReFT lane over one nf4 base answer as each module does alone
    on its nf4 base (the modules were trained on nf4). Not int8: LLM.int8 picks its outlier columns from whatever
    rows share the matmul, padding included, so an int8 answer may differ with what it is batched with."""
    import openai

    from peftlab.serve.app import create_app
    from peftlab.serve.cli import Server, build_engine

    folders = {name: _train(name, tiny_dir, tmp_path / name, pairs, quantize="nf4").module_dir
               for name in ("lora", "loreft")}
    base, tokenizer = load_model(str(tiny_dir), quantize="nf4")
    engine = build_engine(base, tokenizer, "tiny", folders, max_batch=4)
    with Server(create_app(engine)) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
        for name, folder in folders.items():
            got = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "repeat red"}],
                                                 max_tokens=6, temperature=0).choices[0].message.content
            alone = load_for_inference(folder)
            assert quantization_of(alone.model.causal_lm) == "nf4"
            want = generate(alone.model, alone.tokenizer, ["repeat red"], alone.prompt_format, max_new_tokens=6,
                            strip=False)[0]
            assert got == want, name

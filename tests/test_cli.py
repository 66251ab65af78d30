"""The peftlab command, end to end on the tiny model."""

import json

import pytest
import torch

from peftlab import PromptFormat, generate, load_model
from peftlab.adapters import load_for_inference
from peftlab.cli import build_parser, main


def _write_config(tmp_path, tiny_dir, train_file, steps=3):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_dir}\n"
        "method: {name: lora, r: 2}\n"
        f"data: {{train: {train_file}, max_length: 64}}\n"
        f"training: {{output_dir: {tmp_path / 'run'}, max_steps: {steps}, learning_rate: 0.01}}\n"
    )
    return config


def test_help_everywhere(capsys):
    parser = build_parser()
    for command in ("train", "generate", "chat", "merge", "info"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: peftlab " + command in capsys.readouterr().out


def test_train_info_generate(tmp_path, tiny_dir, pairs, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = _write_config(tmp_path, tiny_dir, data)
    assert main(["train", str(config), "--set", "training.max_steps=2", "--set", "method.r=3"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    module = tmp_path / "run" / "module"
    assert summary["module"] == str(module) and summary["data"]["examples"] == len(pairs)

    assert main(["info", str(module), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["config"]["r"] == 3 and info["base_model"] == str(tiny_dir)
    # all-linear on 2 layers of width 64: q, o (64->64), k, v (64->32), gate, up (64->128), down (128->64); r=3
    per_layer = sum(3 * (i + o) for i, o in [(64, 64), (64, 64), (64, 32), (64, 32), (64, 128), (64, 128), (128, 64)])
    assert info["trainable_parameters"] == 2 * per_layer

    assert main(["generate", "--adapter", str(module), "--max-new-tokens", "3", "--json", "repeat red"]) == 0
    answers = json.loads(capsys.readouterr().out)
    loaded = load_for_inference(module)
    same = generate(loaded.model, loaded.tokenizer, ["repeat red"], loaded.prompt_format, max_new_tokens=3)
    assert answers == [{"prompt": "repeat red", "answer": same[0]}]


def test_bad_data_line_is_reported_with_exit_code_2(tmp_path, tiny_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    config = _write_config(tmp_path, tiny_dir, data)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: missing field 'response'" in err
    assert not (tmp_path / "run" / "module").exists()
    # the data is read before any model is loaded: a bad file is named even when the model is missing too
    assert main(["train", str(config), "--set", f"model={tmp_path / 'no-model'}"]) == 2
    assert f"{data}:2: missing field 'response'" in capsys.readouterr().err


def test_unknown_config_key_is_reported(tmp_path, tiny_dir, capsys):
    config = _write_config(tmp_path, tiny_dir, tmp_path / "x.jsonl")
    assert main(["train", str(config), "--set", "trainig.max_steps=3"]) == 2
    assert "unknown key(s) ['trainig']" in capsys.readouterr().err


def test_an_unknown_method_and_a_missing_model_folder_are_named(tmp_path, tiny_dir, pairs, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    config = _write_config(tmp_path, tiny_dir, data)
    assert main(["train", str(config), "--set", "method.name=lorax"]) == 2
    assert "unknown method 'lorax'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "no" / "such"), "hi"]) == 2
    assert f"model '{tmp_path / 'no' / 'such'}': no such model folder" in capsys.readouterr().err


def test_batched_generation_equals_one_at_a_time(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir))
    prompts = ["hi", "a much longer prompt than the first one", "mid length"]
    fmt = PromptFormat()
    batched = generate(model, tokenizer, prompts, fmt, max_new_tokens=6, batch_size=3)
    single = [generate(model, tokenizer, [p], fmt, max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    sampled = generate(model, tokenizer, prompts, fmt, max_new_tokens=6, batch_size=3, do_sample=True, top_k=1)
    assert sampled == single  # sampling from the top token only is greedy: the settings reach generate()


def test_chat_keeps_the_conversation(tiny_dir, monkeypatch, capsys):
    seen = []
    import peftlab.generation

    real = peftlab.generation.generate

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen.append(list(prompts[0]))  # a copy: chat appends the answer to its history afterwards
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(peftlab.generation, "generate", spy)
    lines = iter(["hello", "/reset", "again", "more", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    assert main(["chat", "--model", str(tiny_dir), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("bot> ") == 3
    assert [len(history) for history in seen] == [1, 1, 3]  # /reset forgot the first exchange
    assert seen[2][0] == {"role": "user", "content": "again"} and seen[2][1]["role"] == "assistant"


def test_a_character_cut_by_the_token_cap_is_dropped(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir))
    torch.manual_seed(0)
    with torch.no_grad():  # make the model emit the first byte of "🤖" and then stop at the cap
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        model.lm_head.bias[tokenizer("🤖", add_special_tokens=False)["input_ids"][0]] = 1e4
    (answer,) = generate(model, tokenizer, ["hi"], max_new_tokens=1)
    assert answer == ""
    (answer,) = generate(model, tokenizer, ["hi"], max_new_tokens=2)
    assert answer == ""  # two first bytes are still no character


def test_name_dir_lists_read_one_way_everywhere():
    from peftlab.arguments import named_folders
    from peftlab.config import ConfigError

    assert named_folders(["a=x,b=y", "c=z"], "--adapter") == {"a": "x", "b": "y", "c": "z"}
    assert named_folders("a=x", "--adapters") == {"a": "x"} and named_folders(None, "--adapters") == {}
    assert named_folders(["a=runs/x,y", "b=z"], "-m") == {"a": "runs/x,y", "b": "z"}  # a comma in a folder name
    with pytest.raises(ConfigError, match=r"--adapter: \['a'\] named twice"):
        named_folders(["a=x", "a=y"], "--adapter")  # used to keep the last one silently
    with pytest.raises(ConfigError, match=r"--adapters: \['b'\] should look like NAME=DIR"):
        named_folders("b", "--adapters")

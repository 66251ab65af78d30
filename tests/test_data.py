"""peftlab.data: loading and validating records, prompt rendering, label masking, truncation and batching."""

import json
import re

import pytest
import torch

from peftlab.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    PromptFormat,
    Record,
    encode,
    load_records,
    resolve_template,
)
from peftlab.models import tiny_tokenizer

QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
QA_SYS = [{"role": "system", "content": "Be brief."}, *QA]
CHAT_PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def plain_tok():
    t = tiny_tokenizer()
    t.chat_template = None
    return t


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def at(path, line):
    """Regex for the ``file:line:`` prefix that every DataError from a file starts with."""
    return "^" + re.escape(f"{path}:{line}:")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- loading: good input


def test_jsonl_prompt_response_records(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "What is 2+2?", "response": "4"}\n\n'
                                      '{"prompt": "Hi", "response": "Hello", "system": "Be brief."}\n')
    records = load_records(path)
    assert [r.messages for r in records] == [
        QA,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}],
    ]
    # the blank line 2 is skipped but still counted: the second record is on line 3
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3"]
    assert records[1].response == "Hello"
    assert records[1].context == records[1].messages[:2]


def test_all_formats_normalise_to_the_same_messages(tmp_path):
    raw = [{"prompt": "What is 2+2?", "response": "4", "system": "Be brief."}, {"messages": QA}]
    jsonl = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in raw) + "\n")
    jsn = write(tmp_path / "d.json", json.dumps(raw, indent=2))
    csv_path = write(tmp_path / "d.csv", 'prompt,response,system\n"What is 2+2?",4,Be brief.\n"What is 2+2?",4,\n')
    expected = [QA_SYS, QA]
    for source in (jsonl, str(jsonl), jsn, csv_path, raw):
        assert [r.messages for r in load_records(source)] == expected, source


def test_chat_messages_record_keeps_every_turn(tmp_path):
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
             {"role": "assistant", "content": "a2", "extra": "dropped"}]
    path = write(tmp_path / "chat.jsonl", json.dumps({"messages": turns}) + "\n")
    (rec,) = load_records(path)
    assert rec.messages == [{"role": m["role"], "content": m["content"]} for m in turns]
    assert rec.response == "a2"
    assert [m["content"] for m in rec.context] == ["S", "u1", "a1", "u2"]


def test_json_array_records_know_the_line_they_start_on(tmp_path):
    text = ('[{"prompt": "a", "response": "b"},\n'       # line 1
            '  {\n'                                      # line 2
            '    "prompt": "c",\n'
            '    "response": "d"\n'
            '  },\n'
            '\n'
            '  {"prompt": "e", "response": "f"}\n'     # line 7
            ']\n')
    path = write(tmp_path / "d.json", text)
    records = load_records(path)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:2", f"{path}:7"]
    assert [r.response for r in records] == ["b", "d", "f"]


def test_python_list_records_and_record_objects():
    ready = Record([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "mine")
    records = load_records([{"prompt": "p", "response": "r", "system": None}, ready])
    assert records[0].messages == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    assert records[0].where == "<list>[0]"
    assert records[1] is ready


def test_empty_system_is_left_out():
    (rec,) = load_records([{"prompt": "p", "response": "r", "system": ""}])
    assert [m["role"] for m in rec.messages] == ["user", "assistant"]


def test_csv_extra_columns_are_ignored_and_quoted_fields_keep_commas_and_newlines(tmp_path):
    path = write(tmp_path / "d.csv", 'id,prompt,response\n7,"a, b","line1\nline2"\n8,c,d\n')
    records = load_records(path)
    assert [r.messages for r in records] == [
        [{"role": "user", "content": "a, b"}, {"role": "assistant", "content": "line1\nline2"}],
        [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    ]
    assert records[1].where == f"{path}:4"


def test_csv_with_utf8_bom_header(tmp_path):
    # spreadsheet programs write "CSV UTF-8" with a byte-order mark before the header
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,response\nq,\xc3\xa9t\xc3\xa9\n")
    (rec,) = load_records(path)
    assert rec.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "été"}]


# ---------------------------------------------------------------- loading: bad input


def test_jsonl_missing_response_on_line_3(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "a", "response": "b"}\n'
                                      '{"prompt": "c", "response": "d"}\n'
                                      '{"prompt": "e"}\n'
                                      '{"prompt": "f", "response": "g"}\n')
    with pytest.raises(DataError, match=at(path, 3) + r" missing field 'response' .*has \['prompt'\]"):
        load_records(path)


def test_jsonl_missing_both_fields(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"question": "a"}\n')
    with pytest.raises(DataError, match=at(path, 1) + " missing field 'prompt' and 'response'"):
        load_records(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_byte_names_its_line(tmp_path, suffix):
    lines = {".jsonl": [b'{"prompt": "a", "response": "b"}', b'{"prompt": "c", "response": "d"}',
                        b'{"prompt": "\xff\xfe", "response": "x"}'],
             ".json": [b"[", b'{"prompt": "a", "response": "b"},', b'{"prompt": "\xff\xfe", "response": "x"}', b"]"],
             ".csv": [b"prompt,response", b"a,b", b"\xff\xfe,x"]}[suffix]
    bad_line = next(i for i, line in enumerate(lines, 1) if b"\xff" in line)
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=at(path, bad_line) + " not valid UTF-8"):
        load_records(path)


def test_jsonl_invalid_json_names_line_and_column(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "a", "response": "b"}\n'
                                      '{"prompt": "c", "response": "d"}\n'
                                      '\n'
                                      '{"prompt": "e" "response": "f"}\n')
    with pytest.raises(DataError, match=at(path, 4) + r" invalid JSON \(Expecting ',' delimiter at column 16\)"):
        load_records(path)


def test_json_file_invalid_json_names_line(tmp_path):
    path = write(tmp_path / "d.json", '[\n'
                                     '  {"prompt": "a", "response": "b"},\n'
                                     '  {"prompt": "c",\n'
                                     '   "response" "d"}\n'
                                     ']\n')
    with pytest.raises(DataError, match=at(path, 4) + r" invalid JSON \(Expecting ':' delimiter"):
        load_records(path)


def test_json_bad_record_reports_the_line_it_starts_on(tmp_path):
    path = write(tmp_path / "d.json", '[\n'
                                     '  {"prompt": "a",\n'
                                     '   "response": "b"},\n'
                                     '  {\n'
                                     '    "prompt": "c"\n'
                                     '  }\n'
                                     ']\n')
    with pytest.raises(DataError, match=at(path, 4) + " missing field 'response'"):
        load_records(path)


def test_json_top_level_must_be_an_array(tmp_path):
    path = write(tmp_path / "d.json", '{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DataError, match=at(path, 1) + " expected a JSON array of records, got dict"):
        load_records(path)


@pytest.mark.parametrize(("name", "text"), [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\t\n\n"),
                                            ("empty.json", "[]\n"), ("header_only.csv", "prompt,response\n")])
def test_empty_file_dataset(tmp_path, name, text):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: the dataset is empty") + "$"):
        load_records(path)


def test_empty_list_dataset():
    with pytest.raises(DataError, match="^the given list: the dataset is empty$"):
        load_records([])


def test_csv_without_prompt_response_header(tmp_path):
    path = write(tmp_path / "d.csv", "question,answer\na,b\n")
    with pytest.raises(DataError, match=at(path, 1) + r" the CSV header must name columns 'prompt' and 'response', "
                                                      r"got \['question', 'answer'\]"):
        load_records(path)


def test_csv_empty_file_has_no_header(tmp_path):
    path = write(tmp_path / "d.csv", "")
    with pytest.raises(DataError, match=at(path, 1) + " the CSV header must name columns .* got None"):
        load_records(path)


@pytest.mark.parametrize(("row", "count"), [("a,b,c,d", 4), ("a", 1), ("a,b,c", 3)])
def test_csv_row_with_wrong_number_of_fields(tmp_path, row, count):
    path = write(tmp_path / "d.csv", f"prompt,response\nx,y\n\n{row}\nz,w\n")
    with pytest.raises(DataError, match=at(path, 4) + f" row has {count} fields, header has 2$"):
        load_records(path)


def test_messages_last_role_must_be_assistant(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"messages": QA}) + "\n"
                 + json.dumps({"messages": QA + [{"role": "user", "content": "and 3+3?"}]}) + "\n")
    with pytest.raises(DataError, match=at(path, 2) + r" the last message must be the assistant's answer "
                                                      r"\(role 'assistant'\), got role 'user'"):
        load_records(path)


@pytest.mark.parametrize(("record", "message"), [
    (["prompt", "response"], r"expected an object with 'prompt' and 'response' or 'messages', got list"),
    ("text", "expected an object .* got str"),
    ({"prompt": 3, "response": "b"}, "field 'prompt' must be a string, got int"),
    ({"prompt": "a", "response": ["b"]}, "field 'response' must be a string, got list"),
    ({"prompt": "a", "response": None}, "field 'response' must be a string, got NoneType"),
    ({"prompt": "a", "response": "b", "system": 1.5}, "field 'system' must be a string, got float"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": {"role": "assistant", "content": "x"}}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
     r"message 1 must be \{'role': one of \('system', 'user', 'assistant'\), 'content': str\}, got .*'bot'"),
    ({"messages": [{"role": "assistant", "content": 5}]}, "message 0 must be"),
    ({"messages": ["hi"]}, "message 0 must be .* got 'hi'"),
])
def test_wrong_types(tmp_path, record, message):
    path = write(tmp_path / "d.jsonl", '{"prompt": "ok", "response": "ok"}\n' + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=at(path, 2) + " " + message):
        load_records(path)
    with pytest.raises(DataError, match=re.escape("<list>[1]: ") + message):
        load_records([{"prompt": "ok", "response": "ok"}, record])


def test_unknown_extension(tmp_path):
    path = write(tmp_path / "d.txt", '{"prompt": "a", "response": "b"}\n')
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: unknown data format '.txt'; "
                                                        "use one of ['.csv', '.json', '.jsonl']")):
        load_records(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="^" + re.escape(f"{path}: no such file") + "$"):
        load_records(str(path))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataError, match="dir.json: no such file"):
        load_records(tmp_path / "dir.json")


# ---------------------------------------------------------------- prompt rendering


def test_render_chat_ends_with_the_assistant_header(tok):
    text = PromptFormat().render(tok, QA[:1])
    assert text == CHAT_PROMPT
    assert text.endswith("<|im_start|>assistant\n")
    assert PromptFormat(template="chat").render(tok, "What is 2+2?") == CHAT_PROMPT


def test_render_system_prompt_is_inserted_unless_the_record_has_one(tok):
    fmt = PromptFormat(system_prompt="You are terse.")
    assert fmt.render(tok, QA[:1]) == "<|im_start|>system\nYou are terse.<|im_end|>\n" + CHAT_PROMPT
    assert fmt.render(tok, QA_SYS[:2]) == "<|im_start|>system\nBe brief.<|im_end|>\n" + CHAT_PROMPT


def test_render_plain(tok, plain_tok):
    fmt = PromptFormat(template="plain", plain_format="Q: {prompt}\nA: ")
    assert fmt.render(tok, QA[:1]) == "Q: What is 2+2?\nA: "
    assert PromptFormat(template="plain", plain_format="Q: {prompt}\nA: ", system_prompt="S").render(
        tok, "hi") == "Q: S\n\nhi\nA: "
    # auto falls back to plain when the tokenizer has no chat template
    assert PromptFormat().render(plain_tok, "hi") == "hi\n"
    assert PromptFormat().render(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_resolve_template(tok, plain_tok):
    assert resolve_template(tok, "auto") == "chat"
    assert resolve_template(plain_tok, "auto") == "plain"
    assert resolve_template(tok, "plain") == "plain"
    with pytest.raises(ValueError, match=r"template 'chat' asked for, but the tokenizer has no chat template"):
        resolve_template(plain_tok, "chat")
    with pytest.raises(ValueError, match=r"template must be one of \('auto', 'chat', 'plain'\), got 'jinja'"):
        resolve_template(tok, "jinja")


# ---------------------------------------------------------------- encode


def test_encode_masks_the_prompt_and_ends_with_eos(tok):
    records = load_records([{"prompt": "What is 2+2?", "response": "4"}])
    (feat,), stats = encode(records, tok)
    fmt = PromptFormat()
    prompt_text = fmt.render(tok, records[0].context)
    assert prompt_text == CHAT_PROMPT
    prompt = ids(tok, prompt_text)
    response = ids(tok, "4") + [tok.eos_token_id]
    assert fmt.encode_prompt(tok, records[0].context) == prompt
    assert feat["input_ids"] == prompt + response
    assert feat["input_ids"][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert feat["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert feat["labels"] == [IGNORE_INDEX] * len(prompt) + response
    assert feat["attention_mask"] == [1] * len(prompt + response)
    assert tok.decode(feat["input_ids"]) == CHAT_PROMPT + "4<|im_end|>"
    n = len(prompt) + len(response)
    assert (stats.examples, stats.tokens, stats.longest, stats.prompts_truncated, stats.responses_truncated) == (
        1, n, n, 0, 0)


def test_encode_labels_cover_only_the_last_answer_of_a_conversation(tok):
    turns = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    (feat,), _ = encode(load_records([{"messages": turns}]), tok)
    kept = [t for t in feat["labels"] if t != IGNORE_INDEX]
    assert tok.decode(kept) == "a2<|im_end|>"
    context = "<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nu2<|im_end|>\n"
    assert tok.decode(feat["input_ids"]) == context + "<|im_start|>assistant\na2<|im_end|>"
    n_prompt = len(feat["input_ids"]) - len(kept)
    assert feat["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert feat["labels"][n_prompt:] == feat["input_ids"][n_prompt:]


def test_encode_plain_template(tok):
    fmt = PromptFormat(template="plain", plain_format="Q: {prompt}\nA: ")
    (feat,), _ = encode(load_records([{"prompt": "2+2?", "response": "4"}]), tok, fmt)
    prompt = ids(tok, "Q: 2+2?\nA: ")
    assert feat["input_ids"] == prompt + ids(tok, "4") + [tok.eos_token_id]
    assert feat["labels"] == [IGNORE_INDEX] * len(prompt) + ids(tok, "4") + [tok.eos_token_id]
    assert tok.decode(feat["input_ids"]) == "Q: 2+2?\nA: 4<|im_end|>"


def test_encode_system_prompt_is_in_the_masked_context(tok):
    fmt = PromptFormat(system_prompt="Be brief.")
    (feat,), _ = encode(load_records([{"prompt": "What is 2+2?", "response": "4"}]), tok, fmt)
    prompt_text = "<|im_start|>system\nBe brief.<|im_end|>\n" + CHAT_PROMPT
    prompt = ids(tok, prompt_text)
    assert feat["input_ids"][:len(prompt)] == prompt
    assert feat["labels"] == [IGNORE_INDEX] * len(prompt) + ids(tok, "4") + [tok.eos_token_id]
    # a record's own system message gives the same tokens
    (own,), _ = encode(load_records([{"messages": QA_SYS}]), tok)
    assert own == feat


def test_encode_truncates_the_prompt_from_the_left_and_keeps_the_response(tok):
    record = {"prompt": "0123456789" * 4, "response": "abc"}
    (full,), _ = encode(load_records([record]), tok)
    response = ids(tok, "abc") + [tok.eos_token_id]
    full_prompt = full["input_ids"][:-len(response)]
    assert len(full_prompt) > 20

    max_length = 20
    (feat,), stats = encode(load_records([record]), tok, max_length=max_length)
    kept = max_length - len(response)
    assert len(feat["input_ids"]) == max_length
    assert feat["input_ids"] == full_prompt[-kept:] + response
    assert feat["labels"] == [IGNORE_INDEX] * kept + response
    assert feat["attention_mask"] == [1] * max_length
    assert tok.decode(feat["input_ids"]).endswith("<|im_start|>assistant\nabc<|im_end|>")
    assert (stats.prompts_truncated, stats.responses_truncated, stats.tokens, stats.longest) == (1, 0, 20, 20)


def test_encode_exact_fit_is_not_truncated(tok):
    records = load_records([{"prompt": "hello", "response": "world"}])
    (full,), _ = encode(records, tok)
    (feat,), stats = encode(records, tok, max_length=len(full["input_ids"]))
    assert feat == full
    assert stats.prompts_truncated == stats.responses_truncated == 0
    (_,), stats = encode(records, tok, max_length=len(full["input_ids"]) - 1)
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 0


def test_encode_cuts_an_over_long_response_at_its_end(tok):
    response = "abcdefghijklmnopqrstuvwxyz"
    (feat,), stats = encode(load_records([{"prompt": "p", "response": response}]), tok, max_length=10)
    assert feat["input_ids"] == ids(tok, response)[:10]
    assert tok.decode(feat["input_ids"]) == "abcdefghij"
    assert tok.eos_token_id not in feat["input_ids"]
    assert feat["labels"] == feat["input_ids"]
    assert stats.responses_truncated == 1
    assert stats.prompts_truncated == 1  # no room is left for any of the prompt


def test_encode_stats_over_several_records(tok, caplog):
    records = load_records([{"prompt": "a", "response": "b"}, {"prompt": "x" * 50, "response": "y"},
                            {"prompt": "p", "response": "z" * 40}])
    features, stats = encode(records, tok, max_length=30)
    lengths = [len(f["input_ids"]) for f in features]
    assert lengths[1:] == [30, 30] and lengths[0] < 30
    assert stats.examples == 3
    assert stats.prompts_truncated == 2
    assert stats.responses_truncated == 1
    assert stats.tokens == sum(lengths)
    assert stats.longest == 30
    assert "max_length=30: truncated 2 prompts (from the left) and 1 responses (at the end) of 3" in caplog.text


def test_encode_chat_template_without_one_raises(plain_tok):
    records = load_records([{"prompt": "a", "response": "b"}])
    with pytest.raises(ValueError, match="template 'chat' asked for, but the tokenizer has no chat template"):
        encode(records, plain_tok, PromptFormat(template="chat"))
    # auto on the same tokenizer works and uses the plain format
    (feat,), _ = encode(records, plain_tok)
    assert plain_tok.decode(feat["input_ids"]) == "a\nb<|im_end|>"


def test_encode_needs_an_eos_token():
    t = tiny_tokenizer()
    t.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no EOS token"):
        encode(load_records([{"prompt": "a", "response": "b"}]), t)


# ---------------------------------------------------------------- collator

A = {"input_ids": [11, 12, 13], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 12, 13]}
B = {"input_ids": [21], "attention_mask": [1], "labels": [21]}
PAD = 0


def test_collator_right_padding():
    batch = Collator(pad_token_id=PAD)([A, B])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[11, 12, 13], [21, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13], [21, IGNORE_INDEX, IGNORE_INDEX]]


def test_collator_left_padding():
    batch = Collator(pad_token_id=PAD, padding_side="left")([A, B])
    assert batch["input_ids"].tolist() == [[11, 12, 13], [PAD, PAD, 21]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13], [IGNORE_INDEX, IGNORE_INDEX, 21]]


def test_collator_pad_to_multiple_of():
    batch = Collator(pad_token_id=PAD, pad_to_multiple_of=4)([A, B])
    assert batch["input_ids"].tolist() == [[11, 12, 13, PAD], [21, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX], [21] + [IGNORE_INDEX] * 3]
    left = Collator(pad_token_id=PAD, padding_side="left", pad_to_multiple_of=4)([A, B])
    assert left["input_ids"].tolist() == [[PAD, 11, 12, 13], [PAD, PAD, PAD, 21]]
    # already a multiple: no extra padding
    assert Collator(pad_token_id=PAD, pad_to_multiple_of=3)([A, B])["input_ids"].shape == (2, 3)
    assert Collator(pad_token_id=PAD, pad_to_multiple_of=8)([B])["input_ids"].shape == (1, 8)


def test_collator_without_labels_gives_no_labels():
    batch = Collator(pad_token_id=7)([{"input_ids": [1, 2], "attention_mask": [1, 1]}, {"input_ids": [3],
                                                                                       "attention_mask": [1]}])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 2], [3, 7]]


def test_collator_pack():
    batch = Collator(pad_token_id=PAD, pack=True)([A, B])
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 12, 13, IGNORE_INDEX]]
    assert batch["use_cache"] is False
    assert "attention_mask" not in batch


def test_collator_on_encoded_records(tok):
    features, _ = encode(load_records([{"prompt": "a", "response": "b"}, {"prompt": "long prompt", "response": "c"}]),
                         tok)
    batch = Collator(pad_token_id=tok.pad_token_id)(features)
    short, long_ = (len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (2, long_)
    assert batch["input_ids"][0, short:].tolist() == [tok.pad_token_id] * (long_ - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (long_ - short)
    assert batch["attention_mask"].sum(1).tolist() == [short, long_]
    assert batch["input_ids"][1].tolist() == features[1]["input_ids"]

"""Training records: loading (JSONL, JSON, CSV, Python lists), prompt rendering, tokenising, label masking, padding.

A record is ``{"prompt": ..., "response": ...}`` (optionally ``"system"``) or chat ``{"messages": [...]}`` whose
last message is the assistant's answer. Both are normalised to a message list. The loss covers the answer and the
EOS token that ends it; everything before it (system, user and earlier turns) is context with label -100.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "plain")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Malformed training data; the message names the file and line at fault."""


ROUTED_FIELDS = ("adapter",)  # record fields that reach the model per example (see peftlab.context)
LOSS_FIELDS = ("match_base",)  # record fields that shape an example's loss (see training.token_losses)


@dataclass
class Record:
    """One example as chat messages; ``where`` says where it came from (``file:line``) for error messages.

    ``fields`` keeps the record's other keys: ``adapter`` (the adapter this example trains or runs with) goes to
    the model; the rest (ids, families, notes) stay with the record.
    """

    messages: list[dict[str, str]]
    where: str = "<list>"
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


def to_record(obj: Any, where: str) -> Record:
    """Validate one raw record and normalise it to messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'response' or 'messages', "
                        f"got {type(obj).__name__}")
    extra = {k: v for k, v in obj.items() if k not in ("messages", "prompt", "response", "system")}
    if "adapter" in extra and not (isinstance(extra["adapter"], str) and extra["adapter"]):
        raise DataError(f"{where}: field 'adapter' must be a non-empty adapter name, got {extra['adapter']!r}")
    if "match_base" in extra and not isinstance(extra["match_base"], bool):
        raise DataError(f"{where}: field 'match_base' must be true or false, got {extra['match_base']!r}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer "
                            f"(role 'assistant'), got role {messages[-1]['role']!r}")
        return Record([{"role": m["role"], "content": m["content"]} for m in messages], where, extra)
    missing = [k for k in ("prompt", "response") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field {' and '.join(map(repr, missing))} "
                        f"(a record needs 'prompt' and 'response', or 'messages'); has {sorted(obj)}")
    for k in ("prompt", "response", "system"):
        if k in obj and not (k == "system" and obj[k] is None) and not isinstance(obj[k], str):
            raise DataError(f"{where}: field {k!r} must be a string, got {type(obj[k]).__name__}")
    messages = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    messages += [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    return Record(messages, where, extra)


def _read_text_lines(path: Path) -> list[str]:
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))  # a BOM (Excel CSV) is no data
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return lines


def _load_jsonl(path: Path) -> list[Record]:
    records = []
    for lineno, line in enumerate(_read_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        records.append(to_record(obj, f"{path}:{lineno}"))
    return records


def load_requests(path: str | Path) -> list[dict[str, Any]]:
    """Generation requests, one JSON object per line: ``prompt`` (text) or ``messages`` (a conversation ending with
    the user's turn), and optionally ``adapter``. Each comes back with ``where`` (``file:line``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    requests = []
    for lineno, line in enumerate(_read_text_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise DataError(f"{where}: a request is an object with 'prompt' or 'messages' (and optionally "
                            f"'adapter'), got {obj!r:.80}")
        if "prompt" in obj and not isinstance(obj["prompt"], str):
            raise DataError(f"{where}: field 'prompt' must be a string, got {type(obj['prompt']).__name__}")
        if "messages" in obj:
            to_record({"messages": [*obj["messages"], {"role": "assistant", "content": ""}]}, where)  # validates
        if "adapter" in obj and not (isinstance(obj["adapter"], str) and obj["adapter"]):
            raise DataError(f"{where}: field 'adapter' must be a non-empty adapter name, got {obj['adapter']!r}")
        requests.append({**obj, "where": where})
    if not requests:
        raise DataError(f"{path}: no requests")
    return requests


def _load_json(path: Path) -> list[Record]:
    text = "".join(_read_text_lines(path))
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(top, list):
        raise DataError(f"{path}:1: expected a JSON array of records, got {type(top).__name__}")
    # Walk the array again element by element to know on which line each record starts.
    records, pos = [], text.index("[") + 1
    for _ in top:
        while text[pos] in " \t\r\n,":
            pos += 1
        obj, end = decoder.raw_decode(text, pos)
        records.append(to_record(obj, f"{path}:{line_of(pos)}"))
        pos = end
    return records


def _load_csv(path: Path) -> list[Record]:
    lines = _read_text_lines(path)
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"prompt", "response"} <= set(reader.fieldnames):
        raise DataError(f"{path}:1: the CSV header must name columns 'prompt' and 'response', "
                        f"got {reader.fieldnames}")
    records = []
    for row in reader:
        lineno = reader.line_num
        if None in row or any(v is None for v in row.values()):
            # DictReader puts extra fields in a list under the key None and fills missing ones with None
            count = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
            raise DataError(f"{path}:{lineno}: row has {count} fields, header has {len(reader.fieldnames)}")
        records.append(to_record(row, f"{path}:{lineno}"))
    return records


LOADERS = {".jsonl": _load_jsonl, ".json": _load_json, ".csv": _load_csv}


def load_records(source: str | Path | Sequence[dict]) -> list[Record]:
    """Load and validate records from a ``.jsonl``, ``.json`` or ``.csv`` file, a list of dicts, or a folder of
    such files, one per adapter: each file's records train the adapter named after the file (``support.jsonl``:
    adapter ``support``) unless a record names its own."""
    if isinstance(source, (str, Path)) and Path(source).is_dir() and Path(source).suffix not in LOADERS:
        return _load_folder(Path(source))
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix not in LOADERS:
            raise DataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(LOADERS)}")
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        records = LOADERS[path.suffix](path)
        origin = str(path)
    else:
        records = [r if isinstance(r, Record) else to_record(r, f"<list>[{i}]") for i, r in enumerate(source)]
        origin = "the given list"
    if not records:
        raise DataError(f"{origin}: the dataset is empty")
    return records


def _load_folder(folder: Path) -> list[Record]:
    files = sorted(p for p in folder.iterdir() if p.suffix in LOADERS)
    if not files:
        raise DataError(f"{folder}: a data folder holds one {'/'.join(sorted(LOADERS))} file per adapter; found none")
    records = []
    for path in files:
        for record in load_records(path):
            record.fields.setdefault("adapter", path.stem)
            records.append(record)
    return records


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    if template == "chat" and not has_chat:
        raise ValueError("template 'chat' asked for, but the tokenizer has no chat template; use 'plain'")
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


@dataclass
class PromptFormat:
    """How a prompt becomes text: the model's chat template, or a plain format string around the prompt."""

    template: str = "auto"
    plain_format: str = "{prompt}\n"
    system_prompt: str | None = None

    def messages(self, context: str | list[dict[str, str]]) -> list[dict[str, str]]:
        """The context as chat messages, with this format's system prompt where the context has none."""
        messages = [{"role": "user", "content": context}] if isinstance(context, str) else list(context)
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def render(self, tokenizer: PreTrainedTokenizerBase | None, context: str | list[dict[str, str]]) -> str:
        """Text of the context up to where the answer starts (chat: with the assistant header). A plain format
        needs no tokenizer."""
        messages = self.messages(context)
        if resolve_template(tokenizer, self.template) == "chat":
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.plain_format.format(prompt="\n\n".join(m["content"] for m in messages))

    def encode_prompt(self, tokenizer: PreTrainedTokenizerBase, context: str | list[dict[str, str]]) -> list[int]:
        # A chat template writes the BOS token itself (if any); plain text needs the tokenizer to add it.
        plain = resolve_template(tokenizer, self.template) == "plain"
        return tokenizer(self.render(tokenizer, context), add_special_tokens=plain)["input_ids"]


@dataclass
class EncodeStats:
    examples: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    tokens: int = 0
    longest: int = 0


def encode(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat | None = None,
           max_length: int = 1024) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Tokenise records into ``input_ids``/``attention_mask``/``labels`` with the context masked out, plus
    ``prompt_length`` (where the answer starts) and the record's routed fields (``adapter``).

    Over-long examples lose the left of their prompt so the answer is kept whole; only an answer longer than
    ``max_length`` itself is cut (at its end).
    """
    fmt = fmt or PromptFormat()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    features, stats = [], EncodeStats()
    for rec in records:
        prompt = fmt.encode_prompt(tokenizer, rec.context)
        response = tokenizer(rec.response, add_special_tokens=False)["input_ids"] + [eos]
        if len(response) > max_length:
            response = response[:max_length]
            stats.responses_truncated += 1
        room = max_length - len(response)
        if len(prompt) > room:
            prompt = prompt[len(prompt) - room:] if room > 0 else []
            stats.prompts_truncated += 1
        ids = prompt + response
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * len(prompt) + response, "prompt_length": len(prompt),
                         **{k: rec.fields[k] for k in (*ROUTED_FIELDS, *LOSS_FIELDS) if k in rec.fields}})
        stats.examples += 1
        stats.tokens += len(ids)
        stats.longest = max(stats.longest, len(ids))
    if stats.prompts_truncated or stats.responses_truncated:
        log.warning("max_length=%d: truncated %d prompts (from the left) and %d responses (at the end) of %d",
                    max_length, stats.prompts_truncated, stats.responses_truncated, stats.examples)
    return features, stats


@dataclass
class Collator:
    """Makes a batch from features: padded on the side the method needs, or packed into one row.

    Packing (``pack=True``) concatenates the examples into a single row with ``position_ids`` restarting at 0 for
    each, and no attention mask; transformers then builds a block-diagonal causal mask, so each example sees only
    itself and no compute is spent on padding. The first label of each example is masked: in a padded batch the
    first token is never a target either.

    Per-example fields become ``prompt_lengths`` and ``adapter_names`` + ``adapter_index`` (see
    ``peftlab.context``): one value per row when padded, one per token when packed.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    pack: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self._pack(features) if self.pack else self._pad(features)
        repeats = [len(f["input_ids"]) for f in features] if self.pack else None
        return {**batch, **_example_fields(features, repeats)}

    def _pad(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key in (k for k in pad_values if k in features[0]):
            rows = []
            for f in features:
                pad = [pad_values[key]] * (length - len(f[key]))
                rows.append(pad + f[key] if self.padding_side == "left" else f[key] + pad)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch

    def _pack(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        ids, positions, labels = [], [], []
        for f in features:
            ids += f["input_ids"]
            positions += range(len(f["input_ids"]))
            if "labels" in f:
                labels += [IGNORE_INDEX] + f["labels"][1:]
        # use_cache=False: with a cache object present transformers would not detect the packing.
        batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]), "use_cache": False}
        if labels:
            batch["labels"] = torch.tensor([labels])
        return batch


class AdapterBatches(torch.utils.data.Sampler):
    """Training order for many adapters: every batch of ``rows * len(adapters)`` examples holds ``rows`` examples of
    every adapter, so every adapter takes a step at every step, as it would trained alone with batch ``rows``.

    Each adapter reads its own endless stream: its examples reshuffled at every pass (seeded by ``seed``, the pass and
    the adapter's name), so at step t it sees the same examples whatever trains beside it. An epoch lasts until the
    adapter with the most examples has seen each once; adapters with fewer go on with their next passes meanwhile.
    """

    def __init__(self, adapters: Sequence[str], rows: int = 1, seed: int = 0) -> None:
        self.by_adapter: dict[str, list[int]] = {}
        for i, name in enumerate(adapters):
            self.by_adapter.setdefault(name, []).append(i)
        self.rows, self.seed, self.epoch = rows, seed, 0
        self.steps = -(-max(len(v) for v in self.by_adapter.values()) // rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.rows * len(self.by_adapter)

    def _stream(self, name: str, start: int, count: int) -> list[int]:
        """Items ``start`` to ``start + count`` of the adapter's stream (pass p: its examples in a seeded order)."""
        indices = self.by_adapter[name]
        n, out = len(indices), []
        for p in range(start // n, (start + count - 1) // n + 1):
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{p}/{name}".encode()))
            out += [indices[j] for j in torch.randperm(n, generator=g).tolist()]
        return out[start - (start // n) * n:][:count]

    def __iter__(self):
        count = self.steps * self.rows
        streams = [self._stream(name, self.epoch * count, count) for name in sorted(self.by_adapter)]
        for step in range(self.steps):
            for stream in streams:
                yield from stream[step * self.rows:(step + 1) * self.rows]


def _example_fields(features: list[dict[str, Any]], repeats: list[int] | None) -> dict[str, Any]:
    """``prompt_lengths`` and ``adapter_names``/``adapter_index`` from the features that carry them: per row, or
    (``repeats``: each example's token count) per token of a packed row."""
    def column(key: str) -> list | None:
        present = [key in f for f in features]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(f"field {key!r} is set on examples {[i for i, p in enumerate(present) if p]} of this "
                             f"batch but not on the others; give it on every example or on none")
        return [f[key] for f in features]

    def shaped(values: list[int]) -> torch.Tensor:
        if repeats is None:
            return torch.tensor(values, dtype=torch.long)
        return torch.tensor([v for v, n in zip(values, repeats, strict=True) for _ in range(n)])[None]

    out: dict[str, Any] = {}
    lengths = column("prompt_length")
    if lengths is not None:
        out["prompt_lengths"] = shaped(lengths)
    adapters = column("adapter")
    if adapters is not None:
        names = sorted(set(adapters))
        out["adapter_names"] = names
        out["adapter_index"] = shaped([names.index(a) for a in adapters])
    match = [f.get("match_base", False) for f in features]  # a loss field: absent means false
    if any(match):
        out["match_base"] = shaped([int(m) for m in match]).bool()
    return out

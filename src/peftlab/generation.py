"""Batched generation from prompts rendered exactly as in training (same template, same system prompt)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from peftlab.data import Collator, PromptFormat
from peftlab.serve.client import Endpoint

Prompt = str | list[dict[str, str]]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
             fmt: PromptFormat | None = None, max_new_tokens: int = 128, batch_size: int = 8,
             progress: bool | None = None, strip: bool = True, adapters: Sequence[str] | None = None,
             **generate_kwargs) -> list[str]:
    """Answer each prompt; greedy unless ``do_sample=True`` is passed. Returns only the new text, without
    surrounding whitespace unless ``strip=False`` (the recursion engine needs a call's closing newline).

    ``adapters`` names the adapter each prompt runs with (a model with several adapters, see peftlab.context).
    ``model`` may be a ``peftlab.serve.client.Endpoint``: the prompts then go to that server.
    """
    if isinstance(model, Endpoint):
        return model.answer(prompts, fmt, max_new_tokens, strip, adapters, **generate_kwargs)
    fmt = fmt or PromptFormat()
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts; give one per prompt")
    collate = Collator(tokenizer.pad_token_id, padding_side="left")
    device = next(model.parameters()).device
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id, **generate_kwargs}
    if not settings["do_sample"]:
        settings.update(temperature=None, top_p=None, top_k=None)
    ends = (settings["eos_token_id"], settings["pad_token_id"])
    stops = [t for end in ends for t in (end if isinstance(end, list) else [end]) if t is not None]
    was_training = model.training
    model.eval()
    answers = []
    batches = range(0, len(prompts), batch_size)
    show = progress if progress is not None else len(batches) > 1
    for start in tqdm(batches, desc="generating", unit="batch", disable=not show):
        features = [{"input_ids": ids, "attention_mask": [1] * len(ids)}
                    for ids in (fmt.encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size])]
        if adapters is not None:
            for f, name in zip(features, adapters[start:start + batch_size], strict=True):
                f["adapter"] = name
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(features).items()}
        out = model.generate(**batch, **settings)
        new = out[:, batch["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        capped = ~torch.isin(new[:, -1].cpu(), torch.tensor(stops, dtype=torch.long))
        # a multi-byte character cut by max_new_tokens decodes to a trailing U+FFFD: an artifact, not model output
        texts = [t.strip() for t in texts] if strip else texts
        answers += [t.rstrip("\ufffd") if cut else t for t, cut in zip(texts, capped, strict=True)]
    model.train(was_training)
    return answers

"""lm-evaluation-harness on peftlab models and modules (optional: ``pip install 'peftlab[evals]'``).

``PeftlabLM`` is an ``lm_eval`` ``LM`` over any peftlab model + tokenizer (a base model, or a module of any method
loaded with ``load_for_inference``): ``loglikelihood`` and ``loglikelihood_rolling`` from one forward pass per batch,
``generate_until`` through ``peftlab.generation.generate`` (greedy unless the task asks for sampling).

Contexts are scored as raw text, as lm-eval does for its own HF model, unless ``use_prompt_format=True``: then a
context is rendered with the module's prompt format (its chat template and system prompt) as the user turn.

``run_lm_eval`` runs one task by name; ``include_path`` names a folder of task YAMLs, so tasks whose data lie in
local files (``dataset_path: json`` + ``dataset_kwargs.data_files``) run without any hub.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftlab.data import PromptFormat
from peftlab.generation import generate
from peftlab.methods import PeftlabModel

try:
    from lm_eval.api.model import LM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-eval bridge needs lm-eval: pip install 'peftlab[evals]' (or pip install lm-eval)") from e


class PeftlabLM(LM):
    """An lm-eval ``LM`` over a peftlab model/module and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                 prompt_format: PromptFormat | None = None, use_prompt_format: bool = False, batch_size: int = 8,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format or PromptFormat()
        self.use_prompt_format = use_prompt_format
        self.batch_size = batch_size
        config = getattr(model, "config", None)
        self.max_length = max_length or getattr(config, "max_position_embeddings", None) or 2048
        self._device = next(model.parameters()).device

    # ------------------------------------------------------------------------------------------ tokenising
    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on: BOS if the tokenizer has one, else EOS (as lm-eval's HFLM)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _context_ids(self, context: str) -> list[int]:
        if self.use_prompt_format:
            return self.prompt_format.encode_prompt(self.tokenizer, context)
        if not context:
            return [self.prefix_token_id]
        return self.tokenizer(context, add_special_tokens=False)["input_ids"]

    def _pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not self.use_prompt_format:  # a word-boundary space belongs to the continuation
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
        return self._context_ids(context), self.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether greedy would produce it."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = []
            for i in idx:
                ctx, cont = pairs[i]
                ids = (ctx + cont)[-(self.max_length + 1):][:-1]  # the last token is only a target
                rows.append((ids, len(cont)))
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (ids, _) in enumerate(rows):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                mask[r, :len(ids)] = 1
            extra = {}
            if isinstance(self.model, PeftlabModel):  # the context is the prompt (ReFT positions, Bitune's passes)
                extra["prompt_lengths"] = torch.tensor([len(ids) - n_cont + 1 for ids, n_cont in rows],
                                                       device=self._device)
            logits = self.model(input_ids=input_ids.to(self._device), attention_mask=mask.to(self._device),
                                **extra).logits
            logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
            for r, i in enumerate(idx):
                ids, n_cont = rows[r]
                cont = torch.tensor(pairs[i][1])
                span = logprobs[r, len(ids) - n_cont:len(ids)]  # positions that predict the continuation tokens
                total = span.gather(-1, cont[:, None]).sum().item()
                greedy = bool((span.argmax(-1) == cont).all())
                results[i] = (total, greedy)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._pair_ids(*req.args[:2]) for req in requests]
        out = self._score(pairs)
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            tokens = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    # ----------------------------------------------------------------------------------------- generation
    def generate_until(self, requests) -> list[str]:
        fmt = self.prompt_format if self.use_prompt_format else PromptFormat("plain", "{prompt}")
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):  # one generate call per distinct set of generation settings
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str] = [""] * len(requests)
        eos = self.tokenizer.decode([self.tokenizer.eos_token_id]) if self.tokenizer.eos_token_id is not None else None
        for key, idx in groups.items():
            kwargs: dict[str, Any] = dict(json.loads(key))
            until = kwargs.pop("until", None) or ([eos] if eos else [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False)) and kwargs.get("temperature", 1.0) != 0
            extra = {k: kwargs[k] for k in ("temperature", "top_p", "top_k") if sample and k in kwargs}
            prompts = [requests[i].args[0] for i in idx]
            texts = generate(self.model, self.tokenizer, prompts, fmt, max_new_tokens=max_new,
                             batch_size=self.batch_size, progress=False, do_sample=sample, **extra)
            for i, text in zip(idx, texts, strict=True):
                for stop in until:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "peftlab").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def run_lm_eval(task: str | list[str], include_path: str | None = None, adapter: str | None = None,
                model: str | None = None, dtype: str = "float32", device: str | None = None,
                limit: float | None = None, batch_size: int = 8, use_prompt_format: bool = False,
                num_fewshot: int | None = None, lm: PeftlabLM | None = None) -> dict[str, Any]:
    """Run lm-eval task(s) on a base model or module; returns ``{"results": ..., "model": ..., ...}``.

    ``include_path`` is a folder of task YAMLs (local tasks); when given, lm-eval's built-in task index is not
    scanned, so nothing is fetched from a hub unless a task's data live there.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from peftlab.evals.runner import load_candidate

    if include_path:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    info: dict[str, Any] = {}
    if lm is None:
        cand = load_candidate(adapter, model, dtype=dtype, device=device)
        lm = PeftlabLM(cand.model, cand.tokenizer, cand.prompt_format, use_prompt_format, batch_size)
        info = {"label": cand.label, **cand.info}
    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    if limit is not None and float(limit).is_integer():
        limit = int(limit)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task] if isinstance(task, str) else list(task),
                                  task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False,
                                  bootstrap_iters=0)
    return {"model": info, "use_prompt_format": use_prompt_format, "results": out["results"],
            "n_samples": out.get("n-samples"), "versions": out.get("versions")}

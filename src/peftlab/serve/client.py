"""An OpenAI-compatible server as a model: ``peftlab.generation.generate`` sends its prompts there.

So every recipe that generates (``peftlab eval``, the Re-Tuning engine) runs unchanged against ``peftlab serve``
or any other OpenAI-compatible server (vLLM for a model too big for this machine). Prompts go out as the module's
prompt format asks: a chat format as chat messages (the server renders them; ``peftlab serve`` with the adapter's
own format), a plain format as its rendered text to /v1/completions. Requests run concurrently, so the server
batches them.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from peftlab.context import BASE_ADAPTER
from peftlab.data import PromptFormat


class Endpoint:
    """The model ``model`` (default: the server's base model) of the server at ``url`` (``.../v1``)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 16,
                 timeout: float = 600) -> None:
        import openai

        self.url = url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or "none", max_retries=2, timeout=timeout)
        cards = {card.id: card for card in self.client.models.list().data}
        bases = [name for name, card in cards.items() if getattr(card, "parent", None) is None]
        self.base = bases[0] if bases else next(iter(cards))
        self.model = model or self.base
        if self.model not in cards:
            raise ValueError(f"{self.url} serves {sorted(cards)}, not {self.model!r}")
        card_format = getattr(cards[self.model], "prompt_format", None)  # peftlab serve's cards say it
        self.prompt_format = PromptFormat(**card_format) if isinstance(card_format, dict) else PromptFormat()
        self.adapters = {name: None for name, card in cards.items() if name != self.base}
        self.concurrency = concurrency

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, model={self.model!r})"

    def answer(self, prompts: Sequence[str | list[dict[str, str]]], fmt: PromptFormat | None = None,
               max_new_tokens: int = 128, strip: bool = True, adapters: Sequence[str | None] | None = None,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
        """``generate``'s contract: the new text of each prompt, greedy unless ``do_sample``."""
        fmt = fmt or self.prompt_format
        names = [self._name(a) for a in (adapters or [None] * len(prompts))]
        settings = {"max_tokens": max_new_tokens, "temperature": temperature if do_sample else 0.0,
                    "top_p": top_p if do_sample else 1.0}
        with ThreadPoolExecutor(self.concurrency) as pool:
            texts = list(pool.map(lambda p, m: self._one(p, m, fmt, settings), prompts, names))
        return [t.strip() for t in texts] if strip else texts

    def _name(self, adapter: str | None) -> str:
        return self.model if adapter is None else self.base if adapter == BASE_ADAPTER else adapter

    def _one(self, prompt: str | list[dict[str, str]], model: str, fmt: PromptFormat, settings: dict[str, Any]
             ) -> str:
        if fmt.template == "plain":
            text = fmt.render(None, prompt)
            return self.client.completions.create(model=model, prompt=text, **settings).choices[0].text
        reply = self.client.chat.completions.create(model=model, messages=fmt.messages(prompt), **settings)
        return reply.choices[0].message.content or ""

"""The OpenAI wire format: request bodies (validated, unknown fields refused), response bodies and errors.

Fields peftlab does not implement (logprobs, tools, penalties, ...) are refused by name rather than ignored, so a
client never gets an answer computed differently from what it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
             404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class Sampled(Strict):
    """What both endpoints share: the model, sampling, stopping and streaming."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and not used, as OpenAI's own servers use it only for abuse monitoring
    # accepted only at the value that changes nothing:
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampled):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: Literal[False] = False
    add_special_tokens: bool = True  # vLLM's extra field: let the tokenizer add BOS (when it has one)

    def max_new(self) -> int | None:
        return self.max_tokens or 16  # OpenAI's default for completions


class LoadAdapter(Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: Literal[False] = False


class UnloadAdapter(Strict):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shape:
    """Builds the bodies of one response (chat or text completion), all with the same id and timestamp."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _body(self, kind: str, choices: list[dict], extra: dict | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "system_fingerprint": None, **(extra or {})}

    def full(self, texts: list[str], reasons: list[str], usage_: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
            return self._body("chat.completion", choices, {"usage": usage_})
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return self._body("text_completion", choices, {"usage": usage_})

    def chunk(self, index: int, text: str | None, reason: str | None = None, first: bool = False,
              usage_: dict | None = None) -> dict[str, Any]:
        """One streamed chunk; with ``usage_`` the final usage chunk (no choices)."""
        extra = {"usage": usage_} if usage_ is not None else {}
        if usage_ is not None:
            choices: list[dict] = []
        elif self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            choices = [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]
        else:
            choices = [{"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}]
        return self._body("chat.completion.chunk" if self.chat else "text_completion", choices, extra)

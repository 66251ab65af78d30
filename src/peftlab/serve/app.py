"""The HTTP side: FastAPI routes in OpenAI's shapes over the engine, with vLLM's adapter endpoints.

Routes: GET /health, /metrics, /v1/models; POST /v1/chat/completions, /v1/completions, /v1/load_lora_adapter,
/v1/unload_lora_adapter. With an API key every route but /health needs ``Authorization: Bearer KEY``. Every error
is a 4xx/5xx in OpenAI's error shape and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from peftlab.module import ModuleError
from peftlab.serve.engine import Engine, Event, Overloaded, Sampling, UnknownModel
from peftlab.serve.engine import Request as EngineRequest
from peftlab.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    LoadAdapter,
    OpenAIError,
    Shape,
    UnloadAdapter,
    model_not_found,
    usage,
)
from peftlab.serve.registry import AdapterPathError, read_single, resolve_under


@dataclass
class Limits:
    max_tokens: int = 1024  # the most new tokens one request may ask for
    max_body_bytes: int = 1 << 20
    max_model_len: int | None = None  # prompt + new tokens; default: the model's max_position_embeddings


def create_app(engine: Engine, api_key: str | None = None, adapter_dir: str | Path | None = None,
               limits: Limits | None = None) -> FastAPI:
    """The app for ``engine``; it starts the engine's thread on startup and stops it on shutdown."""
    limits = limits or Limits()
    context = limits.max_model_len or getattr(engine.base.config, "max_position_embeddings", None) or 1 << 30

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not engine.thread.is_alive():
            engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="peftlab serve", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body=limits.max_body_bytes)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        headers = {"retry-after": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(OpenAIError(400, message, where).body(), status_code=400)

    @app.get("/health")
    async def health() -> PlainTextResponse:
        if not engine.thread.is_alive():
            raise OpenAIError(503, "the engine is not running")
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [s.card(engine.base_name) for s in list(engine.served.values()) if not s.draining]
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        served = _served(engine, body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        ids = served.prompt_format.encode_prompt(engine.tokenizer, messages)
        return await _respond(engine, body, [ids], Shape(True, body.model), http, limits, context)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        _served(engine, body.model)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise OpenAIError(400, "prompt is empty", "prompt")
        vocab = len(engine.tokenizer)
        ids = []
        for p in prompts:
            tokens = engine.tokenizer(p, add_special_tokens=body.add_special_tokens)["input_ids"] \
                if isinstance(p, str) else list(p)
            if not tokens or any(not 0 <= t < vocab for t in tokens):
                raise OpenAIError(400, f"prompt {len(ids)}: empty, or a token id outside 0..{vocab - 1}", "prompt")
            ids.append(tokens)
        return await _respond(engine, body, ids, Shape(False, body.model), http, limits, context)

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadAdapter) -> PlainTextResponse:
        try:
            path = resolve_under(adapter_dir, body.lora_path)
        except AdapterPathError as e:
            raise OpenAIError(403, str(e), "lora_path") from None
        if not path.is_dir():
            raise OpenAIError(404, f"no adapter folder {body.lora_path!r} in the adapter folder", "lora_path")
        try:
            parts = await asyncio.to_thread(read_single, path)
        except (ModuleError, OSError, ValueError) as e:
            raise OpenAIError(400, f"{body.lora_path}: {e}", "lora_path") from None
        if len(parts) != 1:
            raise OpenAIError(400, f"{body.lora_path} holds {len(parts)} adapters; load one adapter folder per name",
                              "lora_path")
        try:
            await asyncio.wrap_future(engine.call(lambda: engine.add(body.lora_name, parts[0][1], str(path))))
        except (ValueError, RuntimeError) as e:
            raise OpenAIError(400, f"{body.lora_name}: {e}", "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadAdapter) -> PlainTextResponse:
        try:
            done = engine.drain(body.lora_name)
        except UnknownModel:
            raise OpenAIError(404, f"The adapter `{body.lora_name}` is not loaded.", "lora_name",
                              "model_not_found") from None
        await asyncio.wrap_future(done)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _served(engine: Engine, name: str):
    try:
        return engine.lookup(name)
    except UnknownModel:
        raise model_not_found(name) from None


async def _respond(engine: Engine, body: ChatRequest | CompletionRequest, prompts: list[list[int]], shape: Shape,
                   http: Request, limits: Limits, context: int):
    longest = max(map(len, prompts))
    max_new = body.max_new() or max(1, min(limits.max_tokens, context - longest))  # unasked: what the context leaves
    if max_new > limits.max_tokens:
        raise OpenAIError(400, f"max_tokens is {max_new}; this server allows at most {limits.max_tokens}",
                          "max_tokens")
    if longest + max_new > context:
        raise OpenAIError(400, f"This model's maximum context length is {context} tokens; the prompt has {longest} "
                          f"and max_tokens asks for {max_new} more.", "messages" if shape.chat else "prompt")
    sampling = Sampling(max_new, body.temperature, body.top_p, body.seed, body.stop)
    request = EngineRequest(body.model, prompts, sampling, body.n)
    try:
        engine.submit(request)
    except UnknownModel:
        raise model_not_found(body.model) from None
    except Overloaded as e:
        raise OpenAIError(429, f"the server is busy ({e}); retry later") from None
    prompt_tokens = sum(map(len, prompts)) * body.n
    if body.stream:
        return StreamingResponse(_stream(request, shape, prompt_tokens, body.include_usage),
                                 media_type="text/event-stream")
    return await _collect(request, shape, prompt_tokens, http)


async def _collect(request: EngineRequest, shape: Shape, prompt_tokens: int, http: Request) -> dict:
    count = len(request.prompts) * request.n
    texts, reasons, tokens = [""] * count, [""] * count, 0
    done = 0
    try:
        while done < count:
            try:
                event = await asyncio.wait_for(request.events.get(), timeout=1.0)
            except TimeoutError:
                if await http.is_disconnected():
                    request.cancelled = True
                    return {}
                continue
            texts[event.index] += event.text
            if event.finish_reason is not None:
                if event.error:
                    raise OpenAIError(500, f"generation failed: {event.error}")
                reasons[event.index] = event.finish_reason
                tokens += event.completion_tokens
                done += 1
    finally:
        if done < count:
            request.cancelled = True
    return shape.full(texts, reasons, usage(prompt_tokens, tokens))


async def _stream(request: EngineRequest, shape: Shape, prompt_tokens: int, include_usage: bool
                  ) -> AsyncIterator[str]:
    """Server-sent events: a first chunk per choice, its text as it comes, a last chunk with the finish reason,
    the usage chunk if asked for, then [DONE]. A client that goes away cancels the request (Starlette cancels
    this generator), which frees its rows at the next step."""
    count = len(request.prompts) * request.n
    started, done, tokens = set(), 0, 0
    try:
        while done < count:
            event: Event = await request.events.get()
            if event.error:
                yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                      "param": None, "code": None}})
                return
            if event.index not in started:
                started.add(event.index)
                if shape.chat:
                    yield _sse(shape.chunk(event.index, "", first=True))
            if event.text:
                yield _sse(shape.chunk(event.index, event.text))
            if event.finish_reason is not None:
                yield _sse(shape.chunk(event.index, None, event.finish_reason))
                tokens += event.completion_tokens
                done += 1
        if include_usage:
            yield _sse(shape.chunk(0, None, usage_=usage(prompt_tokens, tokens)))
        yield "data: [DONE]\n\n"
    finally:
        if done < count:
            request.cancelled = True


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _Guard:
    """ASGI middleware: the API key (every route but /health) and the bound on a request body's size, checked
    before any route runs. (Plain ASGI rather than BaseHTTPMiddleware, so a stream's disconnect reaches it.)"""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                error = OpenAIError(401, "Incorrect or missing API key (Authorization: Bearer KEY).",
                                    code="invalid_api_key")
                return await JSONResponse(error.body(), status_code=401)(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        body, more = b"", True  # no length given (chunked): read it all, up to the bound, then replay it
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self._too_large(scope, receive, send)
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)

    async def _too_large(self, scope, receive, send) -> None:
        error = OpenAIError(413, f"the request body is over {self.max_body} bytes")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def _replay(messages: list[dict], receive):
    """An ASGI receive that first hands out ``messages``, then asks ``receive`` (for the disconnect)."""
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


def _prometheus(engine: Engine) -> str:
    """The engine's counters in Prometheus' text format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    stats = engine.stats

    class Collector:
        def collect(self):
            requests = CounterMetricFamily("peftlab_requests", "finished requests", labels=["model", "outcome"])
            for (model, outcome), value in list(stats.requests.items()):
                requests.add_metric([model, outcome], value)
            yield requests
            for name, table, what in (("peftlab_prompt_tokens", stats.prompt_tokens, "prompt tokens admitted"),
                                      ("peftlab_completion_tokens", stats.completion_tokens, "tokens generated")):
                family = CounterMetricFamily(name, what, labels=["model"])
                for model, value in list(table.items()):
                    family.add_metric([model], value)
                yield family
            yield GaugeMetricFamily("peftlab_queue_sequences", "sequences waiting to join a batch",
                                    value=engine.queued())
            yield GaugeMetricFamily("peftlab_running_sequences", "sequences in running batches",
                                    value=engine.running_rows())
            sizes = list(stats.batch_sizes)
            yield GaugeMetricFamily("peftlab_batch_size_mean", "mean rows per decode step (last 1000 steps)",
                                    value=sum(sizes) / len(sizes) if sizes else 0.0)
            yield CounterMetricFamily("peftlab_decode_steps", "decode steps run", value=stats.steps)
            seconds = CounterMetricFamily("peftlab_model_seconds", "time in model calls and sampling",
                                          labels=["phase"])
            for phase, value in list(stats.seconds.items()):
                seconds.add_metric([phase], value)
            yield seconds
            yield GaugeMetricFamily("peftlab_adapters", "adapters served (the base model not counted)",
                                    value=len(engine.served) - 1)

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()

"""The engine: one thread owns the model and runs continuous batching over every lane.

Requests arrive from the web server's event loop (``submit``), wait in one queue, and join their lane's running
batch between decode steps; a finished or cancelled sequence leaves at the next step. Each loop iteration: run
the queued commands (load, unload), admit waiting sequences (bounded per lane), then one decode step per busy
lane. Text goes back as it is decoded, through ``loop.call_soon_threadsafe``. Adapters change only on this thread,
between steps, so no step ever sees half an adapter.

Why not transformers' ``ContinuousBatchingManager``: it packs every request into one row, so peft's per-row
``adapter_names`` cannot route it, and its requests carry no field for an adapter; it applies one sampling setup
to all requests; its prefix cache shares blocks between requests whose token ids match whatever adapter they use;
and it cannot take the mixed cache that a Bitune prompt pass writes. A left-padded ``DynamicCache`` batch does all
four with the model's own forward.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftlab.context import BASE_ADAPTER
from peftlab.data import PromptFormat
from peftlab.methods import lora_router
from peftlab.module import Module
from peftlab.serve.batch import Lane, Row, clone_sharing_weights, sample
from peftlab.serve.registry import SHARED_LANE, Served, now

log = logging.getLogger("peftlab.serve")


class UnknownModel(LookupError):
    """A request names no served model (or one being unloaded)."""


class Overloaded(RuntimeError):
    """The queue is full; the client should retry later."""


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Event:
    """What the engine reports for one choice: new text, and at the end a finish reason and token counts."""

    index: int
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "error"
    completion_tokens: int = 0
    error: str | None = None


class Request:
    """One API request: ``n`` choices per prompt for one model name; its events go to an asyncio queue."""

    _ids = itertools.count()

    def __init__(self, model: str, prompts: list[list[int]], sampling: Sampling, n: int = 1,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = next(self._ids)
        self.model, self.prompts, self.sampling, self.n = model, prompts, sampling, n
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.open = len(prompts) * n  # choices not finished yet

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class IncrementalText:
    """A sequence's text as its tokens arrive, decoding a few tokens per step instead of the whole answer.

    Two offsets into the tokens (as vLLM and TGI keep them): ``text`` holds the text of ``tokens[:read]``, and the
    next step decodes ``tokens[prefix:]`` beside ``tokens[prefix:read]``; the difference is what the new tokens add.
    Decoding from ``prefix``, a few tokens back, keeps a tokenizer's word-boundary spaces right. A difference that
    ends in U+FFFD (a multi-byte character not complete yet) waits for the next token.
    """

    text: str = ""
    prefix: int = 0
    read: int = 0

    def update(self, tokenizer: PreTrainedTokenizerBase, tokens: list[int], final: bool = False) -> str:
        """The text of ``tokens`` (the sequence's so far; ``final``: all of it, a cut character included)."""
        before = tokenizer.decode(tokens[self.prefix:self.read], skip_special_tokens=True)
        after = tokenizer.decode(tokens[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(tokens)
        return self.text


@dataclass
class Sequence:
    """One choice of one request, as it is decoded."""

    request: Request
    index: int  # the choice's index in the response (prompt i, sample j: i * n + j)
    row: Row
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    text: IncrementalText = field(default_factory=IncrementalText)
    lane: str = SHARED_LANE


@dataclass
class Stats:
    """Counters for /metrics (read by the event loop, written by the engine thread)."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, outcome) -> count
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=1000))
    seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})  # model + sampling

    def add(self, table: dict, key: Any, amount: int = 1) -> None:
        table[key] = table.get(key, 0) + amount


class Engine:
    """Serves ``base`` and the adapters loaded into it; ``start()`` runs the loop on its own thread."""

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_name: str,
                 max_batch: int = 64, max_queue: int = 256) -> None:
        self.base, self.tokenizer, self.base_name = base, tokenizer, base_name
        self.max_batch, self.max_queue = max_batch, max_queue
        shared = lora_router().attach_many(clone_sharing_weights(base), {})  # every LoRA joins this lane
        self.lanes: dict[str, Lane] = {SHARED_LANE: Lane(shared, routable=True)}
        self.served: dict[str, Served] = {base_name: Served(base_name, "base", SHARED_LANE, PromptFormat(),
                                                            created=now())}
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, list[Sequence]] = {SHARED_LANE: []}
        self.commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self.lock = threading.RLock()  # guards served (in_flight, draining) and waiting
        self._draining: dict[str, Future] = {}  # unloads waiting for their adapter's requests to finish
        self.wake = threading.Event()
        self.stopping = False
        self.stats = Stats()
        self.eos = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
        self.thread = threading.Thread(target=self._loop, name="peftlab-engine", daemon=True)

    # --- from the event loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop after the current step; sequences still waiting or running end with finish_reason "error"."""
        self.stopping = True
        self.wake.set()
        self.thread.join()

    def lookup(self, name: str) -> Served:
        served = self.served.get(name)
        if served is None or served.draining:
            raise UnknownModel(name)
        return served

    def submit(self, request: Request) -> None:
        """Queue every choice of ``request``; refuses an unknown (or unloading) model and a full queue."""
        with self.lock:
            served = self.lookup(request.model)
            if len(self.waiting) + sum(map(len, self.running.values())) >= self.max_queue:
                raise Overloaded(f"{self.max_queue} sequences are queued or running")
            sampling = request.sampling
            for i, prompt in enumerate(request.prompts):
                for j in range(request.n):
                    seed = None if sampling.seed is None else sampling.seed + j
                    generator = None if seed is None else \
                        torch.Generator(device=self.base.device).manual_seed(seed)
                    adapter = BASE_ADAPTER if served.method == "base" else served.name
                    self.waiting.append(Sequence(request, i * request.n + j, Row(prompt, adapter), generator,
                                                 lane=served.lane))
            served.in_flight += request.open
            self.stats.add(self.stats.prompt_tokens, request.model, sum(map(len, request.prompts)) * request.n)
        self.wake.set()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps (changes to adapters); its result as a future."""
        future: Future = Future()
        self.commands.put((fn, future))
        self.wake.set()
        return future

    def queued(self) -> int:
        return len(self.waiting)

    def running_rows(self) -> int:
        return sum(map(len, self.running.values()))

    # --- adapters (on the engine thread) ---------------------------------------------------------------------
    def add(self, name: str, module: Module, folder: str | None) -> Served:
        """Serve ``module`` (one adapter) as ``name``: in the shared LoRA lane if it can join it, else its own."""
        if name in self.served:
            raise ValueError(f"the name {name!r} is taken")
        if name.startswith("__"):
            raise ValueError(f"names starting with '__' are reserved ({BASE_ADAPTER!r} is the base model)")
        shared = self.lanes[SHARED_LANE].model
        fmt = module.manifest.prompt_format
        (adapter,), (state,) = module.manifest.adapters.values(), module.tensors.values()
        as_lora = shared.joinable(adapter, state)
        if as_lora is not None:
            config, tensors = as_lora
            shared.add_adapters({name: config})
            try:
                shared.load_adapter_state_dict(tensors, name, where=folder or name)
            except Exception:
                shared.remove_adapter(name)
                raise
            lane = SHARED_LANE
        else:
            from peftlab.adapters import load_module

            model = load_module(module, clone_sharing_weights(self.base), where=folder or name)
            lane = name
            self.lanes[lane] = Lane(model, routable=False)
            self.running[lane] = []
        served = Served(name, module.manifest.method, lane, fmt, folder, now())
        self.served[name] = served
        return served

    def drain(self, name: str) -> Future:
        """Refuse new requests for ``name`` and remove it once its running requests have finished."""
        with self.lock:
            served = self.served.get(name)
            if served is None or served.method == "base" or served.draining:
                raise UnknownModel(name)
            served.draining = True
            done: Future = Future()
            self._draining[name] = done
        self.wake.set()
        return done

    def _remove(self, name: str) -> None:
        served = self.served.pop(name)
        if served.lane == SHARED_LANE:
            self.lanes[SHARED_LANE].model.remove_adapter(name)
        else:
            del self.lanes[served.lane], self.running[served.lane]

    # --- the loop --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            self.wake.clear()
            try:
                self._run_commands()
                self._finish_draining()
                self._admit()
                busy = [lane for lane, rows in self.running.items() if rows]
                for lane in busy:
                    self._decode(lane)
            except Exception as e:  # a bug of ours: fail what was running, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error: {e}")
                busy = []
            if not busy and not self.waiting:
                self.wake.wait(timeout=0.5)
        self._run_commands()
        self._fail_all("the server is shutting down")

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except Exception as e:  # the caller reports it; the engine keeps serving
                future.set_exception(e)

    def _finish_draining(self) -> None:
        for name, done in list(self._draining.items()):
            with self.lock:
                if self.served[name].in_flight:
                    continue
                self._remove(name)
            del self._draining[name]
            done.set_result(None)

    def _admit(self) -> None:
        """Move waiting sequences into their lanes (up to max_batch rows each), one prefill per lane."""
        joining: dict[str, list[Sequence]] = {}
        with self.lock:
            kept: deque[Sequence] = deque()
            while self.waiting:
                seq = self.waiting.popleft()
                if seq.request.cancelled:
                    self._close(seq, None)
                    continue
                lane = joining.setdefault(seq.lane, [])
                if len(self.running[seq.lane]) + len(lane) < self.max_batch:
                    lane.append(seq)
                else:
                    kept.append(seq)
            self.waiting = kept
        for name, seqs in joining.items():
            if not seqs:
                continue
            lane = self.lanes[name]
            start = time.perf_counter()
            try:
                logits = lane.prefill([s.row for s in seqs])
            except Exception as e:  # a bad module or prompt fails its own requests, not the server
                log.exception("prefill failed on lane %s", name)
                for s in seqs:
                    self._close(s, "error", str(e))
                continue
            self.running[name] += seqs
            lane.set_pending(self._sample(logits, seqs))
            self.stats.seconds["prefill"] += time.perf_counter() - start  # reading the tokens waits for the GPU
            self._after_sampling(name)

    def _decode(self, name: str) -> None:
        lane, seqs = self.lanes[name], self.running[name]
        start = time.perf_counter()
        try:
            logits = lane.decode()
        except Exception as e:  # fail this lane's sequences, keep serving the others
            log.exception("decode step failed on lane %s", name)
            for s in seqs:
                self._close(s, "error", str(e))
            self.running[name] = []
            lane.keep([False] * len(lane))
            return
        lane.set_pending(self._sample(logits, seqs))
        self.stats.seconds["decode"] += time.perf_counter() - start  # reading the tokens waits for the GPU
        self.stats.steps += 1
        self.stats.batch_sizes.append(len(seqs))
        self._after_sampling(name)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temperature = torch.tensor([s.request.sampling.temperature for s in seqs], device=logits.device)
        top_p = torch.tensor([s.request.sampling.top_p for s in seqs], device=logits.device)
        tokens = sample(logits, temperature, top_p, [s.generator for s in seqs])
        for s, t in zip(seqs, tokens.tolist(), strict=True):
            s.tokens.append(t)
        return tokens

    def _after_sampling(self, name: str) -> None:
        """Send each sequence's new text; end those that hit EOS, a stop string or max_tokens, or were cancelled."""
        lane, seqs = self.lanes[name], self.running[name]
        keep = [self._advance(s) for s in seqs]
        lane.keep(keep)
        self.running[name] = [s for s, k in zip(seqs, keep, strict=True) if k]

    def _advance(self, seq: Sequence) -> bool:
        if seq.request.cancelled:
            self._close(seq, None)
            return False
        sampling, token = seq.request.sampling, seq.tokens[-1]
        ended = token in self.eos
        text = seq.text.update(self.tokenizer, seq.tokens[:-1] if ended else seq.tokens,
                               final=ended or len(seq.tokens) >= sampling.max_tokens)
        reason = "stop" if ended else None
        cut = _first_stop(text, sampling.stop, seq.sent)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif reason is None and len(seq.tokens) >= sampling.max_tokens:
            reason = "length"
        if reason is None:  # hold back what may be the start of a stop string or of a multi-byte character
            hold = max((len(s) - 1 for s in sampling.stop), default=0)
            safe = len(text.rstrip("\ufffd")) - hold
            if safe > seq.sent:
                seq.request.emit(Event(seq.index, text[seq.sent:safe]))
                seq.sent = safe
            return True
        if reason == "length":
            text = text.rstrip("\ufffd")  # a character cut by max_tokens is an artifact, not model output
        self._close(seq, reason, text=text[seq.sent:])
        return False

    def _close(self, seq: Sequence, reason: str | None, error: str | None = None, text: str = "") -> None:
        """End one sequence: its final event (none when the client cancelled) and the bookkeeping."""
        request = seq.request
        if reason is not None:
            request.emit(Event(seq.index, text, reason, len(seq.tokens), error))
        self.stats.add(self.stats.completion_tokens, request.model, len(seq.tokens))
        with self.lock:
            request.open -= 1
            served = self.served.get(request.model)
            if served is not None:
                served.in_flight -= 1
            if request.open == 0:
                outcome = "cancelled" if request.cancelled else "error" if reason == "error" else "ok"
                self.stats.add(self.stats.requests, (request.model, outcome))
        self.wake.set()

    def _fail_all(self, why: str) -> None:
        for seq in [*self.waiting, *(s for seqs in self.running.values() for s in seqs)]:
            self._close(seq, "error", why)
        self.waiting.clear()
        for name in self.running:
            self.running[name] = []
            self.lanes[name].keep([False] * len(self.lanes[name]))


def _first_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the earliest stop string starts in ``text`` (searching only where a new one can be), or None."""
    if not stops:
        return None
    hold = max(len(s) for s in stops)
    found = [i for s in stops if (i := text.find(s, max(0, sent - hold))) >= 0]
    return min(found) if found else None

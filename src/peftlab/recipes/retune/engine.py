"""The recursive inference engine: a model answers ``Call: ...`` sub-prompts it writes itself.

Iterative (an explicit set of frames, no Python recursion), batched (every frame that is ready to generate, across
all problems, goes to the model in one call), memoised (a sub-problem answered once in a run is not asked again,
and one being answered is waited on, not asked twice) and bounded (depth, calls per problem and per frame; the
generator caps new tokens per call). A malformed or looping model ends its problem with a recorded error.
Every problem keeps its call tree for error analysis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from peftlab.recipes.retune.tasks import CALL, RETURN, returned_value, sub_prompt

Generator = Callable[[list[str]], list[str]]  # prompts -> the new text of each (not stripped)


@dataclass
class EngineConfig:
    batch: bool = True  # False: one problem at a time (frames of one problem still run in order)
    memoize: bool = True
    max_depth: int = 100
    max_calls: int = 1000  # model generations per problem
    max_calls_per_frame: int = 4  # calls one context may make (DP's top level makes 2)
    max_batch: int = 64  # prompts per model call


@dataclass
class Node:
    """One sub-problem in a call tree: what the model wrote in its context, its children, its final output."""

    text: str
    outputs: list[str] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)
    output: str | None = None
    error: str | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "outputs": self.outputs, "output": self.output}
        if self.error:
            out["error"] = self.error
        if self.cached:
            out["cached"] = True
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out


@dataclass
class Result:
    output: str | None  # the root's final output; None if the problem failed
    tree: Node
    error: str | None  # "<kind> at depth d: <detail>"
    kind: str | None  # unterminated call | empty call | too many calls | depth budget | call budget | cycle | no return
    calls: int  # model generations this problem caused


@dataclass
class _Frame:
    node: Node
    context: str
    depth: int
    owner: int  # the problem whose budget it spends
    ancestors: frozenset[str]
    calls: int = 0
    waiters: list[_Frame] = field(default_factory=list)  # frames waiting for this one's answer


class Engine:
    def __init__(self, generate: Generator, config: EngineConfig | None = None) -> None:
        self.generate = generate
        self.config = config or EngineConfig()
        self.model_calls = 0  # generator invocations (batches), for benchmarks
        self.generations = 0  # prompts generated

    def run(self, texts: Sequence[str]) -> list[Result]:
        """Solve each problem text (the root sub-problem, without the ``Solution:`` suffix)."""
        memo: dict[str, str] = {}
        if self.config.batch:
            return self._run(list(texts), memo)
        return [self._run([t], memo)[0] for t in texts]

    def _run(self, texts: list[str], memo: dict[str, str]) -> list[Result]:
        roots = [_Frame(Node(t), sub_prompt(t), 0, i, frozenset([t])) for i, t in enumerate(texts)]
        calls = [0] * len(texts)
        errors: list[str | None] = [None] * len(texts)
        kinds: list[str | None] = [None] * len(texts)
        in_flight: dict[str, _Frame] = {}
        ready = list(roots)

        def fail(frame: _Frame, kind: str, detail: str) -> None:
            """The frame's problem fails, and so does every problem waiting for this frame's answer."""
            frame.node.error = frame.node.error or f"{kind}: {detail}"
            if errors[frame.owner] is None:
                errors[frame.owner], kinds[frame.owner] = f"{kind} at depth {frame.depth}: {detail}", kind
            if in_flight.get(frame.node.text) is frame:
                del in_flight[frame.node.text]
            for waiter in frame.waiters:
                fail(waiter, kind, detail)

        def finish(frame: _Frame, output: str) -> None:
            frame.node.output = output
            if self.config.memoize:
                memo[frame.node.text] = output
                in_flight.pop(frame.node.text, None)
            for waiter in frame.waiters:
                waiter.context += RETURN.format(value=returned_value(output))
                ready.append(waiter)

        while ready:
            live = [f for f in ready if errors[f.owner] is None]
            batch, ready = live[:self.config.max_batch], live[self.config.max_batch:]
            if not batch:
                break
            outputs = self.generate([f.context for f in batch])
            self.model_calls += 1
            self.generations += len(batch)
            for frame, output in zip(batch, outputs, strict=True):
                if errors[frame.owner] is not None:
                    continue
                calls[frame.owner] += 1
                frame.node.outputs.append(output)
                if calls[frame.owner] > self.config.max_calls:
                    fail(frame, "call budget", f"more than {self.config.max_calls} generations")
                    continue
                at = output.rfind(CALL)
                if at < 0:
                    finish(frame, output)
                    continue
                rest = output[at + len(CALL):]
                if "\n" not in rest:
                    fail(frame, "unterminated call", repr(output))
                    continue
                text = rest.split("\n", 1)[0].strip()
                frame.calls += 1
                if not text:
                    fail(frame, "empty call", repr(output))
                elif frame.calls > self.config.max_calls_per_frame:
                    fail(frame, "too many calls", f"more than {self.config.max_calls_per_frame} in one context")
                elif frame.depth + 1 > self.config.max_depth:
                    fail(frame, "depth budget", f"deeper than {self.config.max_depth}")
                elif text in frame.ancestors:
                    fail(frame, "cycle", f"calls {text!r}, which is waiting for it")
                else:
                    frame.context += output[:at + len(CALL)] + rest.split("\n", 1)[0] + "\n"
                    self._call(frame, text, memo, in_flight, ready, finish)
        for frame in roots:
            if errors[frame.owner] is None and frame.node.output is None:
                kinds[frame.owner] = "no return"
                errors[frame.owner] = "no return: waiting for a call that never returned"
        return [Result(f.node.output if errors[i] is None else None, f.node, errors[i], kinds[i], calls[i])
                for i, f in enumerate(roots)]

    def _call(self, frame: _Frame, text: str, memo: dict[str, str], in_flight: dict[str, _Frame],
              ready: list[_Frame], finish: Callable[[_Frame, str], None]) -> None:
        if self.config.memoize and text in memo:
            frame.node.children.append(Node(text, output=memo[text], cached=True))
            frame.context += RETURN.format(value=returned_value(memo[text]))
            ready.append(frame)
            return
        if self.config.memoize and text in in_flight:
            running = in_flight[text]
            running.waiters.append(frame)
            frame.node.children.append(running.node)
            return
        child = _Frame(Node(text), sub_prompt(text), frame.depth + 1, frame.owner, frame.ancestors | {text},
                       waiters=[frame])
        frame.node.children.append(child.node)
        if self.config.memoize:
            in_flight[text] = child
        ready.append(child)


class Oracle:
    """A "model" that answers every prompt with its exact training target (a lookup), behind the generator
    interface: the engine's correctness test. Unknown prompts get an empty answer (counted as wrong)."""

    def __init__(self, examples: Sequence[tuple[str, str]]) -> None:
        self.table = dict(examples)

    def __call__(self, prompts: list[str]) -> list[str]:
        return [self.table.get(p, "") for p in prompts]


class ModelGenerator:
    """A peftlab model (base or module) as a generator: prompts as plain text, greedy, raw new text."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, batch_size: int = 64) -> None:
        from peftlab.recipes.retune.data import PROMPT_FORMAT

        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.format = PROMPT_FORMAT  # what the Re-Tuning data trained on

    def __call__(self, prompts: list[str]) -> list[str]:
        from peftlab.generation import generate

        return generate(self.model, self.tokenizer, prompts, self.format, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size, progress=False, strip=False)

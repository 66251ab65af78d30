"""Re-Tuning tasks: each problem rendered for the three methods (baseline, scratchpad, Re-Tuning).

A Re-Tuning solution is a tree of *procedures*. A procedure has a text (``"73199 + 21439"``) and, given the values
its calls returned so far, takes one step: either a call of a smaller procedure (the model writes
``Call: <text>\\n`` and stops) or its answer. ``trace`` walks the tree and yields every (prompt, response) pair
the model must learn; the engine (``peftlab.recipes.retune.engine``) runs the same protocol with a model.

Adding a task is one class: ``sample`` a problem of a given length, its ``root`` procedure, ``baseline`` and
``scratchpad`` examples and ``correct`` (is a final output right?). Register it in ``TASKS``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

# One template for training and inference (the released code had two that disagreed, see research note 4.4).
SOLUTION = "\nSolution: "
RETURN = "Return: {value}\nAnswer: "
CALL = "Call: "
METHODS = ("baseline", "scratchpad", "retune")


def sub_prompt(text: str) -> str:
    return text + SOLUTION


def returned_value(output: str) -> str:
    """What a finished procedure hands back to its caller: the text after its last ``Answer: `` or all of it."""
    return output.rsplit("Answer: ", 1)[-1].strip()


@dataclass(frozen=True)
class Call:
    procedure: Procedure
    before: str = ""  # text the model writes before ``Call: `` (DP explains its step)


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass(frozen=True)
class Procedure:
    """A (sub-)problem as the model sees it: its text, and how it steps given what its calls returned."""

    text: str
    size: int  # the length of this sub-problem (what data filters and oversampling look at)
    step: Callable[[list[str]], Call | Answer]


def trace(procedure: Procedure) -> tuple[list[tuple[str, str, int]], str]:
    """All (prompt, response, size) of solving ``procedure`` recursively, and its final output."""
    examples: list[tuple[str, str, int]] = []
    context, returns = sub_prompt(procedure.text), []
    while True:
        step = procedure.step(returns)
        if isinstance(step, Answer):
            examples.append((context, step.text, procedure.size))
            return examples, step.text
        output = f"{step.before}{CALL}{step.procedure.text}\n"
        examples.append((context, output, procedure.size))
        child_examples, child_output = trace(step.procedure)
        examples += child_examples
        value = returned_value(child_output)
        returns.append(value)
        context += output + RETURN.format(value=value)


class Task(ABC):
    """One problem family; ``length`` is the size the paper varies (digits, list length)."""

    name: ClassVar[str]
    description: ClassVar[str]
    # Training data's default oversampling: sub-problem size -> times each example is repeated. Short sizes have
    # few distinct prompts after dedup (parity has two base cases), and a model that rarely sees the base case
    # ends every recursion wrong. The paper's shares of the data, for ~400 problems per length.
    repeat: ClassVar[dict[int, int]] = {}

    @abstractmethod
    def sample(self, length: int, rng: random.Random) -> Any:
        """A random problem of this length (the evaluation's distribution)."""

    def sample_training(self, length: int, rng: random.Random) -> Any:
        """A random training problem of this length; a task may train on harder cases than it is evaluated on."""
        return self.sample(length, rng)

    @abstractmethod
    def root(self, problem: Any) -> Procedure:
        """The Re-Tuning procedure that solves ``problem``."""

    @abstractmethod
    def baseline(self, problem: Any) -> tuple[str, str]:
        """(prompt, response) answering directly."""

    @abstractmethod
    def scratchpad(self, problem: Any) -> tuple[str, str]:
        """(prompt, response) with every intermediate step written out in one context."""

    @abstractmethod
    def correct(self, output: str, problem: Any, method: str) -> bool:
        """Whether a method's final output answers ``problem``."""

    def length(self, problem: Any) -> int:
        return len(problem)

    def examples(self, problem: Any, method: str) -> list[tuple[str, str, int]]:
        """Every (prompt, response, sub-problem size) a method trains on for ``problem``."""
        if method == "retune":
            return trace(self.root(problem))[0]
        if method in ("baseline", "scratchpad"):
            return [(*getattr(self, method)(problem), self.length(problem))]
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")

    def prompt(self, problem: Any, method: str) -> str:
        """The top-level prompt a method is evaluated on (the first training prompt)."""
        if method == "retune":
            return sub_prompt(self.root(problem).text)
        return self.examples(problem, method)[0][0]


def _digits(length: int, rng: random.Random, runs: float = 0.0) -> str:
    """A uniform number of ``length`` digits; with ``runs`` > 0 each digit after the first repeats the one before
    with that probability (runs of one digit: ``6660``)."""
    if runs == 0.0:  # one draw, as before runs existed: the standing reports' problems stay the same
        return str(rng.randint(10 ** (length - 1), 10 ** length - 1)) if length > 1 else str(rng.randint(0, 9))
    digits = [str(rng.randint(1 if length > 1 else 0, 9))]
    for _ in range(length - 1):
        digits.append(digits[-1] if rng.random() < runs else str(rng.randint(0, 9)))
    return "".join(digits)


ADDITION_FAMILIES = ("uniform", "carry-chain", "equal-runs", "all-carry", "no-carry", "unequal")
HARD_FAMILIES = ("carry-chain", "equal-runs", "all-carry")  # what addition-steps-hard trains on besides uniform


def operands(length: int, rng: random.Random, family: str) -> tuple[str, str]:
    """Two ``length``-digit operands whose sum is hard (or easy) to copy in a given way:

    - ``uniform``: uniform numbers (a run of k equal output digits is rare);
    - ``carry-chain``: the units sum to 10 or more and every higher pair to 9, so one carry runs through every
      place (``667039 + 332969 = 1000008``: the output is a long run of zeros);
    - ``equal-runs``: each operand digit repeats the one before with probability 0.8 (``666`` copied as ``66``);
    - ``all-carry``: every digit pair sums to 10 or more; ``no-carry``: every pair to 9 or less;
    - ``unequal``: as people write sums, one operand of ``length`` digits and the other shorter (its length uniform
      in 1 .. length - 1), on a random side (``613807 + 27``, ``451 + 73812570``). At length 1 there is no shorter
      number: both have one digit.
    """
    if family == "uniform":
        return _digits(length, rng), _digits(length, rng)
    if family == "unequal":
        if length == 1:
            return _digits(1, rng), _digits(1, rng)
        pair = (_digits(length, rng), _digits(rng.randint(1, length - 1), rng))
        return pair if rng.random() < 0.5 else pair[::-1]
    if family == "equal-runs":
        return _digits(length, rng, 0.8), _digits(length, rng, 0.8)
    if family not in ADDITION_FAMILIES:
        raise ValueError(f"operand family {family!r} is not one of {ADDITION_FAMILIES}")
    pairs = []
    for place in range(length):  # place 0 is the units
        low = 1 if place == length - 1 and length > 1 else 0  # no leading zero
        if family == "carry-chain" and place > 0:
            x = rng.randint(low, 9 - low)
            pairs.append((x, 9 - x))
            continue
        carries = family != "no-carry"
        options = [(x, y) for x in range(low, 10) for y in range(low, 10) if (x + y >= 10) == carries]
        pairs.append(rng.choice(options))
    a = "".join(str(x) for x, _ in reversed(pairs))
    b = "".join(str(y) for _, y in reversed(pairs))
    return a, b


class Addition(Task):
    """a + b with both operands ``length`` digits. Re-Tuning drops the leading digit of both and prepends one.

    Variants not in the paper (docs/experiments/retune.md has what each measured):

    - ``show_digit_sum`` (task ``addition-steps``) writes the one-digit sum before the carry and output
      (``"7+8+1=16. Carry 1, Output 6..."``) in Re-Tuning and scratchpad steps: the digits are copied where the
      model can see them and the sum is a fact a pretrained model already knows.
    - ``index_hints`` (task ``addition-steps-hints``) also tags every digit with a letter for its place, units
      ``a``, tens ``b`` (``"c7b3a1"`` is 731; Zhou et al. 2023's index hints). Copying a number is where long
      Re-Tuning answers go wrong, mostly inside runs of one digit (``666``): with a plain digit string the
      model must count the run; with hints every digit has its own place letter to find. A sub-problem keeps
      its digits' letters, as place values do. Measured on the default model: worse past the training length
      (letters never trained).
    - ``shift_hints`` (task ``addition-steps-hints-shifted``) starts the letters at a random one per problem
      (the problem's third element; ``"e7d3c1"`` is 731 from ``c``), so training on short problems also trains
      the letters that longer problems need, as Zhou et al. sample their hints. Measured: worse still (the
      model copies by letter from the wrong operand).
    - ``train_runs`` (task ``addition-steps-runs``, with ``show_digit_sum``) trains on operands whose digits
      repeat the one before with probability 0.25 (besides the 0.1 of chance), so runs like ``6660`` that a
      uniform 1-6-digit number rarely has are common in training; evaluation problems stay uniform, so its
      report compares with ``addition-steps``'. Measured: worse (the model writes runs that are not there).
    - ``train_hard`` (task ``addition-steps-hard``, with ``show_digit_sum``) draws that share of the training
      problems from the families that are hard to copy (carry-chain, equal-runs, all-carry, in turn), the rest
      uniform: the outputs hold the long runs that uniform data lacks, as in the evaluation families.
    - ``train_unequal`` (task ``addition-steps-unequal``, with ``show_digit_sum``) draws that share of the training
      problems with a shorter operand (the ``unequal`` family), zero-filled at the root like every shorter operand,
      so the runs of leading zeros that its sub-problems carry are trained. With ``train_hard`` too (task
      ``addition-steps-hard-unequal``), the equal-length rest draws that share from the hard families: the carry
      chains that more steps of uniform data never fix.
    - ``zero_fill=False`` (tasks ``-unpadded``) does not zero-fill: where one operand is longer, only its leading
      digit drops (``613807 + 27`` calls ``13807 + 27``) and the step adds that digit to the returned carry alone
      (``6+1=7.``). Each step's form then depends on which operand is longer. Measured: not learned in 300 steps
      with 30 % of such problems, and it spoils the equal-length steps (docs/experiments/retune.md).
    - ``output_tags`` (tasks ``addition-steps-tags4``/``-tags6``/``-tags7``, with ``show_digit_sum``) tags only the
      output digits, with letters that cycle every ``output_tags`` places from the units (``"a1f0e0d0c0b0a3"`` for
      1000003 with 6; place 6 is ``a`` again). A run of zeros can then be copied tag by tag instead of counted,
      and the operands stay plain digits (nothing to confuse with the output). A step's output leaves its carry
      apart, so at 1-6 trained digits the longest output has 6 places: a cycle of 6 trains every letter, and past
      the trained lengths the tags repeat rather than being new. A cycle of 7 leaves ``g`` untrained (measured:
      the 7-digit steps fail). At 1-6 digits those two cycles give the same training data: they differ only in
      what a longer output must look like. A cycle of 4 wraps inside the trained outputs, so training shows the
      wrap (measured: the only variant whose carry chains hold past the trained lengths).
    - ``shift_tags`` (task ``addition-steps-hard-tags26-shifted-unequal``, with ``output_tags=26``) starts the output
      tags at a random letter per problem (the problem's third element) and cycles through all 26: training on
      1-6 digits then shows every letter and every letter after another, and a 12-place output repeats none, where a
      cycle of 4 repeats each three times (the copy by tag that fails at 12 digits). The question stays plain
      digits, so the base case's letter is the model's free choice; every later step prepends the letter after the
      returned one. Step grading (``--step-accuracy``) compares text, so it counts another base-case letter as a
      wrong step. Measured (one seed, 1,000 steps): 1.00 on 12-digit uniform sums, 0.80 on unequal ones, whose
      misses all zero-fill a 1-4-digit operand (the operands' zero runs are not tagged). Unpadded too (task
      ``addition-steps-hard-tags26-shifted-unequal-unpadded``), no call copies a run of filled-in zeros.
    """

    name = "addition"
    description = "integer addition; Re-Tuning recurses on the operands without their leading digit"
    repeat = {1: 4, 2: 2}  # the base case ~2.5% of 1-6-digit data (1.5% of 1-8: wider ranges want share={1: .025})

    def __init__(self, show_digit_sum: bool = False, index_hints: bool = False, shift_hints: bool = False,
                 train_runs: float = 0.0, train_hard: float = 0.0, output_tags: int = 0,
                 train_unequal: float = 0.0, zero_fill: bool = True, shift_tags: bool = False) -> None:
        self.show_digit_sum, self.shift_hints, self.train_runs = show_digit_sum, shift_hints, train_runs
        self.train_hard, self.output_tags, self.train_unequal = train_hard, output_tags, train_unequal
        self.zero_fill, self.shift_tags = zero_fill, shift_tags
        self.index_hints = index_hints or shift_hints
        if output_tags and self.index_hints:
            raise ValueError("output_tags tags the outputs only; index_hints already tags every number")
        if output_tags > len(PLACES) or (shift_tags and not output_tags):
            raise ValueError(f"output_tags cycles through at most {len(PLACES)} letters, and shift_tags shifts them")
        variants = [(suffix, text) for on, suffix, text in (
            (show_digit_sum, "-steps", ", each step writing its one-digit sum (x+y+carry=s) first"),
            (self.index_hints, "-hints", ", every digit tagged with its place (c7b3a1 = 731)"),
            (shift_hints, "-shifted", " from a random letter"),
            (train_runs, "-runs", f", trained on operands that repeat a digit with probability {train_runs}"),
            (train_hard, "-hard", f", {train_hard:.0%} of training operands from the families hard to copy"),
            (output_tags, f"-tags{output_tags}", f", output digits tagged with letters cycling every {output_tags}"),
            (shift_tags, "-shifted", " from a random letter"),
            (train_unequal, "-unequal", f", {train_unequal:.0%} of training problems with a shorter operand"),
            (not zero_fill, "-unpadded", ", a shorter operand not zero-filled: the longer one recurses alone"))
            if on]
        if variants:
            self.name = "addition" + "".join(suffix for suffix, _ in variants)
            self.description = "integer addition" + "".join(text for _, text in variants)

    def _show(self, digits: str, start: int) -> str:
        """A digit string as the model reads and writes it; with hints its units digit is tagged PLACES[start]."""
        if not self.index_hints:
            return digits
        if start + len(digits) > len(PLACES):
            raise ValueError(f"{self.name} tags places with letters a-z: {len(digits)} digits from "
                             f"{PLACES[start]!r} are too many")
        return "".join(PLACES[start + len(digits) - 1 - i] + d for i, d in enumerate(digits))

    def _show_output(self, digits: str, start: int) -> str:
        """An answer's digits as the model writes them: cyclically tagged with ``output_tags``, else as ``_show``."""
        if not self.output_tags:
            return self._show(digits, start)
        return "".join(PLACES[(start + len(digits) - 1 - i) % self.output_tags] + d for i, d in enumerate(digits))

    def _step(self, x: str, y: str | None, carry: int, output: str, start: int) -> tuple[int, str, str]:
        """(carry out, the step's text, its output digits) of adding digits x and y in front of ``output``; y None:
        the shorter operand has ended, so x meets only the carry (``6+1=7.``)."""
        total = int(x) + int(y or 0) + carry
        shown = (f"{x}+{carry}={total}. " if y is None else f"{x}+{y}+{carry}={total}. ") if self.show_digit_sum else ""
        digits = f"{total % 10}{output}"
        return total // 10, f"{shown}Carry {total // 10}, Output {self._show_output(digits, start)}", digits

    def sample(self, length: int, rng: random.Random, runs: float = 0.0,
               family: str = "uniform") -> tuple[Any, ...]:
        a, b = (_digits(length, rng, runs), _digits(length, rng, runs)) if family == "uniform" else \
            operands(length, rng, family)
        if self.shift_tags:
            return a, b, rng.randrange(self.output_tags)
        return (a, b, rng.randint(0, len(PLACES) - length - 1)) if self.shift_hints else (a, b)

    def sample_training(self, length: int, rng: random.Random) -> tuple[Any, ...]:
        # no draw without unequal training: the README recipe's data stay what they were before this option
        if self.train_unequal and length > 1 and rng.random() < self.train_unequal:
            return self.sample(length, rng, family="unequal")
        if length > 1 and rng.random() < self.train_hard:
            return self.sample(length, rng, family=rng.choice(HARD_FAMILIES))
        return self.sample(length, rng, self.train_runs)

    def length(self, problem: tuple[Any, ...]) -> int:
        return max(len(problem[0]), len(problem[1]))

    def _question(self, a: str, b: str, start: int) -> str:
        return f"{self._show(a, start)} + {self._show(b, start)}"

    def root(self, problem: tuple[Any, ...]) -> Procedure:
        """Operands of one length drop their leading digits together; a shorter operand is zero-filled first
        (``613807 + 000027``). Unpadded, only a longer operand's leading digit drops (``613807 + 27`` calls
        ``13807 + 27``) and the step adds that digit to the returned carry alone."""
        a, b, start = *problem[:2], _hint_start(problem)
        if self.zero_fill:
            a, b = _same_width(a, b)

        def step(returns: list[str]) -> Call | Answer:
            if len(a) == len(b) == 1:
                return Answer(self._step(a, b, 0, "", start)[1])
            sub = (a[1:], b[1:]) if len(a) == len(b) else (a[1:], b) if len(a) > len(b) else (a, b[1:])
            if not returns:
                return Call(self.root((*sub, start)))
            x, y = (a[0], b[0]) if len(a) == len(b) else (max(a, b, key=len)[0], None)
            return Answer(self._step(x, y, *_parse_carry(returns[0]), start)[1])

        return Procedure(self._question(a, b, start), max(len(a), len(b)), step)

    def baseline(self, problem: tuple[Any, ...]) -> tuple[str, str]:
        a, b, start = *problem[:2], _hint_start(problem)
        return f"{self._question(a, b, start)}\nAnswer: ", self._show_output(str(int(a) + int(b)), start)

    def scratchpad(self, problem: tuple[Any, ...]) -> tuple[str, str]:
        (a, b), start = _same_width(*problem[:2]), _hint_start(problem)
        lines, carry, output = [], 0, ""
        for x, y in zip(reversed(a), reversed(b), strict=True):
            carry, line, output = self._step(x, y, carry, output, start)
            lines.append(line)
        return sub_prompt(self._question(a, b, start)), "\n".join(lines)

    def correct(self, output: str, problem: tuple[Any, ...], method: str) -> bool:
        expected = str(int(problem[0]) + int(problem[1]))
        if method == "baseline":
            return output.strip() == self._show_output(expected, _hint_start(problem))
        last = returned_value(output).strip().splitlines()[-1] if output.strip() else ""
        try:
            carry, digits = _parse_carry(last)
        except ValueError:
            return False
        return (("1" if carry else "") + digits).lstrip("0") == expected.lstrip("0")


PLACES = "abcdefghijklmnopqrstuvwxyz"


def _hint_start(problem: tuple[Any, ...]) -> int:
    """The index of the letter tagging an addition problem's units digit (its optional third element)."""
    return problem[2] if len(problem) > 2 else 0


def _same_width(a: str, b: str) -> tuple[str, str]:
    width = max(len(a), len(b))
    return a.zfill(width), b.zfill(width)


def _parse_carry(text: str) -> tuple[int, str]:
    """``"Carry 1, Output 38"`` (or ``"5+2+1=8. Carry 0, Output b3a8"``) -> (1, "38")."""
    head, _, output = text.rsplit(". ", 1)[-1].partition(", Output ")
    hinted = len(output) % 2 == 0 and output[::2].isalpha() and output[1::2].isdigit()
    digits = output[1::2] if hinted else output
    if not head.startswith("Carry ") or not digits.isdigit() or head[6:] not in ("0", "1"):
        raise ValueError(f"not 'Carry c, Output d': {text!r}")
    return int(head[6:]), digits


def _bits(values) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


class Parity(Task):
    """Parity of a 0/1 list; Re-Tuning recurses on the list without its first element.

    With ``show_sum`` (task ``parity-steps``, not in the paper) the combining step writes the sum of the first bit
    and the returned parity before the answer (``"1+1=2. 0"``): on the default model the plain step (an XOR
    written as one token) stayed at chance, and a one-digit sum is a fact a pretrained model already knows.
    """

    name = "parity"
    description = "parity of a binary list; Re-Tuning recurses on the tail"
    repeat = {1: 100, 2: 25, 3: 10, 4: 5, 5: 3, 6: 2}  # the paper's x900, x240, ... at a tenth of its data

    def __init__(self, show_sum: bool = False) -> None:
        self.show_sum = show_sum
        if show_sum:
            self.name = "parity-steps"
            self.description += ", the combining step writing its sum (1+1=2) first"

    def sample(self, length: int, rng: random.Random) -> tuple[int, ...]:
        return tuple(rng.randint(0, 1) for _ in range(length))

    def _question(self, bits: tuple[int, ...]) -> str:
        return f"What is the parity of {_bits(bits)}?"

    def root(self, problem: tuple[int, ...]) -> Procedure:
        def step(returns: list[str]) -> Call | Answer:
            if len(problem) == 1:
                return Answer(str(problem[0]))
            if not returns:
                return Call(self.root(problem[1:]))
            first, rest = problem[0], int(returns[0].split()[-1])
            parity = str((first + rest) % 2)
            return Answer(f"{first}+{rest}={first + rest}. {parity}" if self.show_sum else parity)

        return Procedure(self._question(problem), len(problem), step)

    def baseline(self, problem: tuple[int, ...]) -> tuple[str, str]:
        return f"{self._question(problem)}\nAnswer: ", str(sum(problem) % 2)

    def scratchpad(self, problem: tuple[int, ...]) -> tuple[str, str]:
        running = [sum(problem[:i + 1]) % 2 for i in range(len(problem))]
        return sub_prompt(self._question(problem)), "Compute one element at a time. " + " ".join(map(str, running))

    def correct(self, output: str, problem: tuple[int, ...], method: str) -> bool:
        words = output.split()
        return bool(words) and words[-1] == str(sum(problem) % 2)


def max_sum_nonadjacent(values: list[int]) -> tuple[list[int], list[int]]:
    """The dp array (best sum from i on) and the lexicographically smallest choice (1 chosen, 2 not)."""
    n = len(values)
    dp = [0] * n
    for i in reversed(range(n)):
        dp[i] = max(dp[i + 1] if i + 1 < n else 0, values[i] + (dp[i + 2] if i + 2 < n else 0), 0)
    chosen, can_use = [], True
    for i in range(n):
        take = can_use and dp[i] == values[i] + (dp[i + 2] if i + 2 < n else 0)
        chosen.append(1 if take else 2)
        can_use = not take
    return dp, chosen


DP_INSTRUCTION = ("Given a sequence of integers, find a subsequence with the highest sum, such that no two numbers "
                  "in the subsequence are adjacent in the original sequence.\n\nOutput a list with \"1\" for chosen "
                  "numbers and \"2\" for unchosen ones. If multiple solutions exist, select the lexicographically "
                  "smallest. Input = {values}.\nAnswer: ")
INDICES_RULE = "If there is only 1 item, return 1 if we should use it else 2."


class MaxSumNonAdjacent(Task):
    """The DP task of Dziri et al. (values in [-5, 5]): two sub-procedures, the dp array and the chosen items.

    ``show_steps`` (task ``dp-steps``, not in the paper) writes each step's arithmetic before its answer, as
    ``addition-steps`` does: ``max(5, 1+5=6) = 6`` for a dp entry, ``True and 6 == 1+5=6: True`` for whether an item
    is chosen. The paper's steps state the rule and jump to the list; a model trained with a small budget got the
    entry or the choice wrong in most of its first wrong steps.
    """

    name = "dp"
    description = "maximum-sum non-adjacent subsequence; Re-Tuning calls a dp-array and a chosen-items procedure"
    repeat = {1: 25, 2: 3}  # the paper's x250, x30 at a tenth of its data

    def __init__(self, show_steps: bool = False) -> None:
        self.show_steps = show_steps
        if show_steps:
            self.name = "dp-steps"
            self.description = "the DP task, each step writing its arithmetic (max(5, 1+5=6) = 6) first"

    def _shown(self, work: str) -> str:
        """The step's arithmetic (after a space) when steps are shown, else nothing."""
        return f" {work}" if self.show_steps else ""

    def sample(self, length: int, rng: random.Random) -> tuple[int, ...]:
        return tuple(rng.randint(-5, 5) for _ in range(length))

    def _dp_array(self, values: tuple[int, ...]) -> Procedure:
        def step(returns: list[str]) -> Call | Answer:
            if len(values) == 1:
                kept = max(values[0], 0)
                work = self._shown(f"max({values[0]}, 0) = {kept}")
                return Answer(f"Return [0] if negative else element.{work}\nAnswer: {_bits([kept])}")
            if not returns:
                return Call(self._dp_array(values[1:]), "Call with array minus first element. ")
            rest = _parse_list(returns[0])
            after = rest[1] if len(rest) > 1 else 0
            head = max(rest[0], values[0] + after, 0)
            work = self._shown(f"max({rest[0]}, {values[0]}+{after}={values[0] + after}) = {head}")
            return Answer(f"Append max(return[0], array[0] + return[1]) to return.{work}\n"
                          f"Answer: {_bits([head, *rest])}")

        return Procedure(f"Create dp array {_bits(values)}", len(values), step)

    def _chosen(self, sums: tuple[int, ...], values: tuple[int, ...], can_use: bool) -> Procedure:
        after = sums[2] if len(sums) > 2 else 0
        take = can_use and sums[0] == values[0] + after
        work = self._shown(f"{can_use} and {sums[0]} == {values[0]}+{after}={values[0] + after}: {take}.")

        def step(returns: list[str]) -> Call | Answer:
            if len(values) == 1:
                return Answer(f"{INDICES_RULE}{work}\nAnswer: {_bits([1 if take else 2])}")
            if not returns:
                return Call(self._chosen(sums[1:], values[1:], not take),
                            f"{INDICES_RULE} If we should use the first item to get the sum, call False else "
                            f"True.{work} ")
            return Answer(f"Append 1 if False else 2.\nAnswer: {_bits([1 if take else 2, *_parse_list(returns[0])])}")

        return Procedure(f"Create chosen indices array: sum array {_bits(sums)}, item array {_bits(values)}, "
                         f"can use item {can_use}", len(values), step)

    def root(self, problem: tuple[int, ...]) -> Procedure:
        def step(returns: list[str]) -> Call | Answer:
            if not returns:
                return Call(self._dp_array(problem))
            if len(returns) == 1:
                return Call(self._chosen(tuple(_parse_list(returns[0])), problem, True))
            return Answer(returns[1])  # the paper stops after the second return; we train the copy, so the
            # top level ends like every other procedure (research note, pitfall 13)

        return Procedure(f"Compute the maximum sum of nonadjacent subsequences of {_bits(problem)}", len(problem),
                         step)

    def baseline(self, problem: tuple[int, ...]) -> tuple[str, str]:
        return DP_INSTRUCTION.format(values=_bits(problem)), _bits(max_sum_nonadjacent(list(problem))[1])

    def scratchpad(self, problem: tuple[int, ...]) -> tuple[str, str]:
        a, n = list(problem), len(problem)
        dp, chosen = max_sum_nonadjacent(a)
        lines = []
        for i in reversed(range(n)):
            if i == n - 1:
                lines.append(f"dp[{i}] = max(input[{i}], 0) = max({a[i]}, 0) = {dp[i]}")
            elif i == n - 2:
                lines.append(f"dp[{i}] = max(input[{i}], input[{i + 1}], 0) = max({a[i]}, {a[i + 1]}, 0) = {dp[i]}")
            else:
                lines.append(f"dp[{i}] = max(dp[{i + 1}], input[{i}] + dp[{i + 2}], 0) = "
                             f"max({dp[i + 1]}, {a[i]} + {dp[i + 2]}, 0) = {dp[i]}")
        text = "Scratchpad: " + "\n".join(lines) + (
            "\n\nFinally, we reconstruct the lexicographically smallest subsequence that fulfills the task objective "
            "by selecting numbers as follows. We store the result on a list named \"output\".\n\n"
            "Let can_use_next_item = True.\n")
        for i in range(n):
            after = dp[i + 2] if i + 2 < n else 0
            rhs, shown = (f"input[{i}] + dp[{i + 2}]", f"{a[i]} + {after}") if i + 2 < n else (f"input[{i}]", f"{a[i]}")
            update = "" if i == n - 1 else f" We update can_use_next_item = {chosen[i] != 1}."
            if chosen[i] == 1:
                text += (f"Since dp[{i}] == {rhs} ({dp[i]} == {shown}) and can_use_next_item == True, we store "
                         f"output[{i}] = 1.{update}\n")
            else:
                text += (f"Since dp[{i}] != {rhs} ({dp[i]} != {shown}) or can_use_next_item == False, we store "
                         f"output[{i}] = 2.{update}\n")
        text += f"\nReconstructing all together, output={_bits(chosen)}."
        return f"Question: Let's solve input = {_bits(a)}.", text

    def correct(self, output: str, problem: tuple[int, ...], method: str) -> bool:
        expected = _bits(max_sum_nonadjacent(list(problem))[1])
        if method == "scratchpad":
            return output.rsplit("output=", 1)[-1].strip().rstrip(".") == expected
        return returned_value(output) == expected


def _parse_list(text: str) -> list[int]:
    inner = text.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise ValueError(f"not a list: {text!r}")
    return [int(v) for v in inner[1:-1].split(",") if v.strip()]


TASKS: dict[str, Task] = {t.name: t for t in (
    Addition(), Addition(show_digit_sum=True), Addition(show_digit_sum=True, index_hints=True),
    Addition(show_digit_sum=True, shift_hints=True), Addition(show_digit_sum=True, train_runs=0.25),
    Addition(show_digit_sum=True, train_hard=0.3), Addition(show_digit_sum=True, output_tags=4),
    Addition(show_digit_sum=True, train_unequal=0.3), Addition(show_digit_sum=True, output_tags=4, train_unequal=0.3),
    Addition(show_digit_sum=True, train_hard=0.3, train_unequal=0.3),
    Addition(show_digit_sum=True, zero_fill=False), Addition(show_digit_sum=True, train_unequal=0.3, zero_fill=False),
    Addition(show_digit_sum=True, output_tags=6), Addition(show_digit_sum=True, output_tags=7),
    Addition(show_digit_sum=True, output_tags=26, shift_tags=True, train_hard=0.3, train_unequal=0.3),
    Addition(show_digit_sum=True, output_tags=26, shift_tags=True, train_hard=0.3, train_unequal=0.3, zero_fill=False),
    Parity(), Parity(show_sum=True), MaxSumNonAdjacent(), MaxSumNonAdjacent(show_steps=True))}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown Re-Tuning task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]

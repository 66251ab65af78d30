"""The composition language: ``0.5*a + 0.5*b - 0.3*toxic``, ``analogy(a, b, c)``, ``lam*a + (1-lam)*b``.

Grammar (a real parser, never ``eval``)::

    expr  := term (("+" | "-") term)*
    term  := unary (("*" | "/") unary)*
    unary := ("+" | "-") unary | atom
    atom  := NUMBER | NAME | NAME "(" expr ("," expr)* ")" | "(" expr ")"

A name is a module (given with ``-m name=DIR``) or a number bound by the caller (the λ of a search). Every module
operation is linear, so an expression evaluates to one coefficient per module: ``a + a`` is ``2*a`` and
``a - a`` is ``0*a`` exactly. A product of two modules, or a number added to a module, is refused with the position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(r"\s*(?:(?P<number>\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_]\w*)|"
                    r"(?P<op>[-+*/(),]))")


def analogy(a: Value, b: Value, c: Value) -> Value:
    """PEM's and task arithmetic's analogy: a − b + c ("c is to ? as b is to a": apply a's shift from b to c)."""
    return a - b + c


FUNCTIONS = {"analogy": (analogy, 3)}


class ExpressionError(ValueError):
    """A composition expression that cannot be read; the message shows the expression and points at the fault."""

    def __init__(self, message: str, text: str, position: int) -> None:
        self.position = position
        super().__init__(f"{message} (at position {position})\n  {text}\n  {' ' * position}^")


@dataclass
class Value:
    """A linear form: a coefficient per module plus a number (numbers have no modules, modules no number)."""

    terms: dict[str, float] = field(default_factory=dict)
    number: float = 0.0

    @property
    def is_number(self) -> bool:
        return not self.terms

    def __add__(self, other: Value) -> Value:
        terms = dict(self.terms)
        for name, c in other.terms.items():
            terms[name] = terms.get(name, 0.0) + c
        return Value(terms, self.number + other.number)

    def __neg__(self) -> Value:
        return Value({k: -c for k, c in self.terms.items()}, -self.number)

    def __sub__(self, other: Value) -> Value:
        return self + (-other)

    def scaled(self, factor: float) -> Value:
        return Value({k: c * factor for k, c in self.terms.items()}, self.number * factor)


@dataclass
class _Token:
    kind: str  # number | name | op | end
    text: str
    position: int


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            start = len(text) - len(text[pos:].lstrip())
            raise ExpressionError(f"unexpected character {text[start]!r}", text, start)
        kind = match.lastgroup
        tokens.append(_Token(kind, match.group(kind), match.start(kind)))
        pos = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class Expression:
    """A parsed expression; ``evaluate`` gives each module's coefficient for given module names and numbers."""

    def __init__(self, text: str) -> None:
        self.text = text
        if not text.strip():
            raise ExpressionError("the expression is empty", text, 0)
        self._tokens = _tokenize(text)
        self.names = sorted({t.text for t in self._tokens if t.kind == "name"} - set(FUNCTIONS))
        self.evaluate(dict.fromkeys(self.names, 1.0), modules=())  # syntax errors surface now, not at use

    def evaluate(self, numbers: dict[str, float] | None = None, modules: tuple[str, ...] | list[str] = ()
                 ) -> dict[str, float]:
        """Each module's coefficient (in order of first use); ``numbers`` binds the other names (e.g. lam)."""
        value = _Parser(self.text, self._tokens, dict(numbers or {}), set(modules)).parse()
        if value.is_number and modules:
            raise ExpressionError(f"the expression is a number ({value.number:g}), not a combination of modules",
                                  self.text, 0)
        return value.terms

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


class _Parser:
    def __init__(self, text: str, tokens: list[_Token], numbers: dict[str, float], modules: set[str]) -> None:
        self.text, self.tokens, self.numbers, self.modules = text, tokens, numbers, modules
        self.i = 0

    def error(self, message: str, token: _Token | None = None) -> ExpressionError:
        return ExpressionError(message, self.text, (token or self.tokens[self.i]).position)

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self, text: str | None = None) -> _Token:
        token = self.tokens[self.i]
        if text is not None and token.text != text:
            found = "the end" if token.kind == "end" else repr(token.text)
            raise self.error(f"expected {text!r}, found {found}")
        self.i += 1
        return token

    def parse(self) -> Value:
        value = self.expr()
        if self.peek().kind != "end":
            raise self.error(f"unexpected {self.peek().text!r}")
        return value

    def expr(self) -> Value:
        value = self.term()
        while self.peek().text in ("+", "-"):
            op = self.take()
            right_at = self.peek()
            right = self.term()
            if value.is_number != right.is_number:
                raise self.error("cannot add a number to a module (scale it instead: 2*a, not a + 2)",
                                 op if value.is_number else right_at)
            value = value + right if op.text == "+" else value - right
        return value

    def term(self) -> Value:
        value = self.unary()
        while self.peek().text in ("*", "/"):
            op = self.take()
            right_at = self.peek()
            right = self.unary()
            if op.text == "/":
                if not right.is_number:
                    raise self.error("cannot divide by a module", right_at)
                if right.number == 0:
                    raise self.error("division by zero", right_at)
                value = value.scaled(1 / right.number)
            elif value.is_number:
                value = right.scaled(value.number)
            elif right.is_number:
                value = value.scaled(right.number)
            else:
                raise self.error("cannot multiply two modules (module arithmetic is linear)", op)
        return value

    def unary(self) -> Value:
        if self.peek().text in ("+", "-"):
            sign = self.take().text
            value = self.unary()
            return -value if sign == "-" else value
        return self.atom()

    def atom(self) -> Value:
        token = self.peek()
        if token.kind == "number":
            self.take()
            return Value(number=float(token.text))
        if token.text == "(":
            self.take()
            value = self.expr()
            self.take(")")
            return value
        if token.kind == "name":
            self.take()
            if token.text in FUNCTIONS:
                return self.call(token)
            if self.peek().text == "(":
                raise self.error(f"unknown function {token.text!r}; known: {', '.join(FUNCTIONS)}", token)
            if token.text in self.numbers:
                return Value(number=self.numbers[token.text])
            if token.text in self.modules:
                return Value({token.text: 1.0})
            known = sorted(self.modules) + sorted(self.numbers)
            raise self.error(f"unknown name {token.text!r}" + (f"; known: {', '.join(known)}" if known else ""),
                             token)
        raise self.error("expected a number, a module name or '('" if token.kind != "end" else
                         "the expression ends too early")

    def call(self, name: _Token) -> Value:
        function, arity = FUNCTIONS[name.text]
        self.take("(")
        args = [self.expr()]
        while self.peek().text == ",":
            self.take()
            args.append(self.expr())
        self.take(")")
        if len(args) != arity:
            raise self.error(f"{name.text}() takes {arity} arguments, got {len(args)}", name)
        return function(*args)

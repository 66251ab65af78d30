"""Module arithmetic: add, negate, scale and analogise trained modules without training, exactly.

``compose("0.5*a + 0.5*b - 0.3*toxic", {"a": DIR, "b": DIR, "toxic": DIR}, OUT)`` (CLI: ``peftlab compose``).
See ``docs/compose.md`` for the operators, the exports and what each costs.
"""

from peftlab.compose.compose import EXPORTS, MODES, compose
from peftlab.compose.expression import Expression, ExpressionError
from peftlab.compose.operands import ComposeError
from peftlab.compose.search import eval_scorer, import_scorer, parse_grid, search

__all__ = ["EXPORTS", "MODES", "ComposeError", "Expression", "ExpressionError", "compose", "eval_scorer",
           "import_scorer", "parse_grid", "search"]

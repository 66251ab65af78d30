"""Diff Interpretation Tuning (Goel et al., 2025): an adapter that makes a model say what a weight diff taught it.

``data`` writes hidden-topic examples, ``diffs`` trains one low-rank LoRA per topic with MultiLoRA, ``adapter``
trains the shared DIT adapter beside each example's diff in one batch, ``evaluate`` scores it on held-out topics,
``explain`` applies it to any LoRA. CLI: ``peftlab dit gen|diffs|train|eval`` and ``peftlab explain``.
"""

from peftlab.recipes.dit.adapter import DitConfig, train_dit
from peftlab.recipes.dit.data import TopicData
from peftlab.recipes.dit.diffs import DiffConfig, Diffs, train_diffs
from peftlab.recipes.dit.evaluate import evaluate
from peftlab.recipes.dit.explain import explain

__all__ = ["DiffConfig", "Diffs", "DitConfig", "TopicData", "evaluate", "explain", "train_diffs", "train_dit"]

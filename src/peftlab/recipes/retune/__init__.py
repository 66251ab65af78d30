"""Re-Tuning (Pasewark et al., ACL 2024): the model solves a problem by calling itself on a smaller one.

``tasks`` renders problems for the three methods, ``data`` builds training JSONL, ``engine`` runs the recursion
(batched, memoised, bounded), ``evaluate`` measures accuracy per length. CLI: ``peftlab retune gen|train|eval``.
"""

from peftlab.recipes.retune.engine import Engine, EngineConfig, ModelGenerator, Oracle
from peftlab.recipes.retune.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "Engine", "EngineConfig", "ModelGenerator", "Oracle", "Task", "get_task"]

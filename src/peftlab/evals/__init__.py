"""Evaluation shared by every method: generated task families, seeded non-overlapping splits, batched scoring.

``tasks`` (the families), ``suite`` (suites, splits, training data), ``scoring`` (answer extraction), ``runner``
(evaluation, tables, JSON, charts) and ``lm_eval_bridge`` (lm-evaluation-harness, optional). See
docs/evals.md and ``peftlab eval --help``.
"""

from peftlab.evals.runner import Candidate, evaluate, format_table, load_candidate, rescore, run, write_report
from peftlab.evals.suite import SUITES, Suite, get_suite, make_split, sample, split_of, training_records
from peftlab.evals.tasks import FAMILIES, Family, Instance, get_family

__all__ = ["FAMILIES", "SUITES", "Candidate", "Family", "Instance", "Suite", "evaluate", "format_table",
           "get_family", "get_suite", "load_candidate", "make_split", "rescore", "run", "sample", "split_of",
           "training_records", "write_report"]

"""Evaluate base models and saved modules on a suite: batched greedy generation, scoring, tables, JSON and a chart.

Every model goes through ``peftlab.generation.generate`` with its own prompt format (a module's ``prompt_format``
from its ``peftlab.json``), so any method's module is evaluated through the same interface. Prompts of a family are
generated together, sorted by length (less padding), with the family's ``max_new_tokens`` cap.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

import peftlab
from peftlab.adapters import load_for_inference
from peftlab.data import PromptFormat
from peftlab.evals.suite import Suite, make_split
from peftlab.evals.tasks import get_family
from peftlab.generation import generate
from peftlab.report import over_seeds, plot, portable_path, write_json


@dataclass
class Candidate:
    """Something to evaluate: a label, the model with its tokenizer and the prompt format it expects."""

    label: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    info: dict[str, Any] = field(default_factory=dict)
    route_by_family: bool = False  # each family's prompts go to the adapter named after the family
    fallback_adapter: str | None = None  # ... or, for a family without one, to this adapter ("__base__": none)

    def adapter_for(self, family: str) -> str | None:
        if not self.route_by_family:
            return None
        served = getattr(self.model, "adapters", {})
        if family in served:
            return family
        if self.fallback_adapter is None:
            from peftlab.config import ConfigError

            raise ConfigError(f"{self.label}: no adapter named after family {family!r} (it serves "
                              f"{sorted(served)}); name a fallback adapter ('__base__': the base model)")
        return self.fallback_adapter


def load_candidate(adapter: str | None = None, model: str | None = None, dtype: str = "float32",
                   device: str | None = None, label: str | None = None, route_by_family: bool = False,
                   fallback_adapter: str | None = None) -> Candidate:
    """A base model (``adapter=None``) or a saved module of any method on its base model, with its prompt format;
    ``route_by_family``: a MultiLoRA module answers each family with the adapter named after it."""
    loaded = load_for_inference(adapter, model, dtype=dtype, device=device)
    if loaded.info is None:
        return Candidate(label or f"base ({Path(loaded.base_model).name})", loaded.model, loaded.tokenizer,
                         loaded.prompt_format, {"model": loaded.base_model, "adapter": None, "method": None})
    folder = Path(adapter)
    label = label or (folder.parent.name if folder.name == "module" else folder.name)
    return Candidate(label, loaded.model, loaded.tokenizer, loaded.prompt_format,
                     {"model": model or loaded.info.base_model, "adapter": portable_path(adapter),
                      "method": loaded.info.method, "trainable_parameters": loaded.info.trainable_parameters},
                     route_by_family, fallback_adapter)


def endpoint_candidate(url: str, model: str | None = None, api_key: str | None = None, label: str | None = None,
                       route_by_family: bool = False, fallback_adapter: str | None = None,
                       concurrency: int = 16) -> Candidate:
    """A model served by an OpenAI-compatible server (``peftlab serve``, vLLM) as a candidate; its prompt format is
    the one the server's model card gives (``peftlab serve`` gives each adapter's), else the chat template."""
    from peftlab.serve.client import Endpoint

    endpoint = Endpoint(url, model, api_key, concurrency)
    return Candidate(label or f"{endpoint.model} @ {endpoint.url}", endpoint, None, endpoint.prompt_format,
                     {"endpoint": endpoint.url, "model": endpoint.model, "adapter": None, "method": None},
                     route_by_family, fallback_adapter)


def evaluate(candidate: Candidate, suite: Suite, split: str = "test", n: int = 100, seeds: Sequence[int] = (0,),
             batch_size: int = 16, families: Sequence[str] | None = None, keep_examples: int = 5,
             progress: bool = True) -> dict[str, Any]:
    """Accuracy per family (mean ± std over seeds of the instance sampling) for one candidate."""
    families = list(families or suite.families_for(split))
    missing = sorted(set(families) - set(suite.families_for(split)))
    if missing:
        from peftlab.config import ConfigError

        raise ConfigError(f"families {missing} are not in the {split} split of suite {suite.name!r} "
                          f"({', '.join(suite.families_for(split))})")
    routes = {f: candidate.adapter_for(f) for f in families}  # refused before any generation if one is missing
    per_seed: dict[str, list[float]] = {f: [] for f in families}
    examples: dict[str, list[dict[str, Any]]] = {f: [] for f in families}
    start = time.perf_counter()
    bar = tqdm(total=len(families) * len(seeds) * n, desc=f"eval {candidate.label}", unit="q", disable=not progress)
    for seed in seeds:
        split_data = {f: inst for f, inst in make_split(suite, split, n, seed).items() if f in families}
        for fam_name in families:
            fam, instances = get_family(fam_name), split_data[fam_name]
            order = sorted(range(len(instances)), key=lambda i: len(instances[i].prompt))
            outputs: list[str] = [""] * len(instances)
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                bar.set_postfix_str(f"{fam_name} seed {seed}")
                answers = generate(candidate.model, candidate.tokenizer, [instances[i].prompt for i in idx],
                                   candidate.prompt_format, max_new_tokens=fam.max_new_tokens,
                                   batch_size=batch_size, progress=False,
                                   adapters=[routes[fam_name]] * len(idx) if candidate.route_by_family else None)
                for i, a in zip(idx, answers, strict=True):
                    outputs[i] = a
                bar.update(len(idx))
            correct = [bool(fam.score(o, inst)) for o, inst in zip(outputs, instances, strict=True)]
            per_seed[fam_name].append(sum(correct) / len(correct))
            if seed == seeds[0]:
                examples[fam_name] = [{"prompt": inst.prompt, "gold": inst.answer, "output": o, "correct": c}
                                      for inst, o, c in zip(instances, outputs, correct, strict=True)][:keep_examples]
    bar.close()
    result_families = {}
    for f in families:
        result_families[f] = {**over_seeds(per_seed[f], seeds), "n": n, "trained": f in suite.trained}
    summary = {}
    for group, members in (("all", families), ("trained", [f for f in families if f in suite.trained]),
                           ("held_out", [f for f in families if f in suite.held_out])):
        if members:  # macro average over families, per seed, then mean ± std over seeds
            per = [statistics.fmean(per_seed[f][s] for f in members) for s in range(len(seeds))]
            summary[group] = {**over_seeds(per, seeds), "families": len(members)}
    routed = {"adapters": routes} if candidate.route_by_family else {}
    return {"label": candidate.label, **candidate.info, **routed, "prompt_format": vars(candidate.prompt_format),
            "families": result_families, "summary": summary, "seconds": round(time.perf_counter() - start, 1),
            "examples": examples}


def run(candidates: Sequence[Candidate] | Sequence[Any], suite: Suite, split: str = "test", n: int = 100,
        seeds: Sequence[int] = (0,), batch_size: int = 16, families: Sequence[str] | None = None,
        keep_examples: int = 5, progress: bool = True) -> dict[str, Any]:
    """Evaluate several candidates (or zero-argument callables returning one, loaded one at a time)."""
    results = []
    for c in candidates:
        cand = c() if callable(c) else c
        results.append(evaluate(cand, suite, split, n, seeds, batch_size, families, keep_examples, progress))
        del cand
    return {"suite": suite.name, "trained_families": suite.trained, "held_out_families": suite.held_out,
            "split": split, "n": n, "seeds": list(seeds), "decoding": "greedy",
            "max_new_tokens": {f: get_family(f).max_new_tokens for f in (families or suite.families_for(split))},
            "peftlab_version": peftlab.__version__, "models": results}


def _cell(fam: dict[str, Any], seeds: int) -> str:
    return f"{fam['mean']:.3f} ± {fam['std']:.3f}" if seeds > 1 else f"{fam['mean']:.3f}"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per family (accuracy, n), one column per model, then the averages."""
    models = report["models"]
    seeds = len(report["seeds"])
    families = list(models[0]["families"])
    headers = ["family", "set", "n"] + [m["label"] for m in models]
    rows = [[f, "trained" if models[0]["families"][f]["trained"] else "held out",
             str(models[0]["families"][f]["n"] * seeds)] + [_cell(m["families"][f], seeds) for m in models]
            for f in families]
    for group in ("trained", "held_out", "all"):
        if group in models[0]["summary"]:
            rows.append([f"mean ({group.replace('_', ' ')})", "", ""] +
                        [_cell(m["summary"][group], seeds) for m in models])
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    fmt_row = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    out = [f"suite {report['suite']}, split {report['split']}, n={report['n']} per family and seed, "
           f"seeds {report['seeds']}, greedy", fmt_row(headers), line]
    out += [fmt_row(r) for r in rows[:len(families)]] + [line] + [fmt_row(r) for r in rows[len(families):]]
    return "\n".join(out)


def write_report(report: dict[str, Any], out: str | Path, chart: bool = True) -> Path:
    out = write_json(out, report)
    if chart:
        plot_report(report, out.with_suffix(".png"))
    return out


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: accuracy per family (error bars: std over seeds), one colour per model."""
    models = report["models"]
    families = list(models[0]["families"])
    width = 0.8 / len(models)
    seeds = len(report["seeds"])
    title = (f"peftlab eval: suite {report['suite']}, {report['split']} split, n={report['n']}"
             f"{' x ' + str(seeds) + ' seeds' if seeds > 1 else ''}")
    with plot(path, "", "accuracy", title, figsize=(max(7.0, 0.9 * len(families) + 2), 4.2)) as ax:
        for k, m in enumerate(models):
            xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(families))]
            ys = [m["families"][f]["mean"] for f in families]
            errs = [m["families"][f]["std"] for f in families]
            ax.bar(xs, ys, width, yerr=errs if seeds > 1 else None, capsize=2, label=m["label"])
        labels = [f + ("" if models[0]["families"][f]["trained"] else "\n(held out)") for f in families]
        ax.set_xticks(range(len(families)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
    return Path(path)


def rescore(report: dict[str, Any]) -> dict[str, Any]:
    """Score a report's kept outputs again with the current scorers (after a scorer fix), without generating.

    Needs every output of the first seed kept (``keep_examples >= n``) and a single seed; the instances are drawn
    again from the same seed, so their order matches the kept outputs.
    """
    from peftlab.evals.suite import get_suite, sample

    if len(report["seeds"]) != 1:
        raise ValueError("rescore works on single-seed reports")
    seed, n = report["seeds"][0], report["n"]
    suite = get_suite(report["suite"])
    for model in report["models"]:
        for fam_name, entry in model["families"].items():
            kept = model["examples"][fam_name]
            if len(kept) != n:
                raise ValueError(f"{model['label']}/{fam_name}: {len(kept)} outputs kept, need all {n}")
            fam = get_family(fam_name)
            instances = sample(fam_name, report["split"], n, seed)
            for inst, ex in zip(instances, kept, strict=True):
                if inst.prompt != ex["prompt"]:
                    raise ValueError(f"{fam_name}: the instances drawn again differ from the report's")
                ex["correct"] = bool(fam.score(ex["output"], inst))
            entry.update(over_seeds([sum(ex["correct"] for ex in kept) / n], [seed]))
        for group, members in (("all", list(model["families"])),
                               ("trained", [f for f in model["families"] if f in suite.trained]),
                               ("held_out", [f for f in model["families"] if f in suite.held_out])):
            if members:
                model["summary"][group] = {**over_seeds([statistics.fmean(model["families"][f]["mean"]
                                                                           for f in members)], [seed]),
                                           "families": len(members)}
    return report

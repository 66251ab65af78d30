"""What the experiment scripts share: train a module once (a finished run is kept, so a stopped script resumes),
evaluate it once on the generated suite, measure a module's loss on held-out text, and put an interval over the
questions on a difference between two methods.

Every LoRA here: r=8, alpha 16, every linear layer, lr 2e-3 cosine with 5 warm-up steps, the chat template.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}
TRAINING = {"learning_rate": 2e-3, "lr_scheduler_type": "cosine", "warmup_steps": 5, "logging_steps": 10,
            "save_strategy": "no"}


def train_once(folder: Path, method: dict, records: list[dict], steps: int, batch: int, seed: int,
               model: str, learning_rate: float = TRAINING["learning_rate"]) -> float:
    """Train unless ``folder/module`` exists; the training's wall time (seconds), read back from its log. A
    ``quantize`` key in ``method`` is the base's quantization (TrainConfig.quantize), not a method setting."""
    from peftlab import DataConfig, TrainConfig, train

    if not (folder / "module").exists():
        method = dict(method)
        config = TrainConfig(model=model, quantize=method.pop("quantize", None), method=method,
                             data=DataConfig(template="chat", max_length=512),
                             training={**TRAINING, "output_dir": str(folder), "max_steps": steps,
                                       "per_device_train_batch_size": batch, "seed": seed,
                                       "learning_rate": learning_rate},
                             output=str(folder / "module"))
        train(config, train_data=records)
    return json.loads((folder / "train_log.json").read_text())["metrics"]["train_runtime"]


def evaluate_once(out: Path, adapter: Path | None, families: list[str], n: int, model: str,
                  route_by_family: bool = False, split: str = "test") -> dict:
    """``peftlab eval`` of a module (``None``: the base model; a model folder as ``model``) on ``families``, every
    answer kept; the result is cached in ``out``."""
    from peftlab.evals.runner import load_candidate, run, write_report
    from peftlab.evals.suite import get_suite

    if not out.exists():
        candidate = load_candidate(str(adapter) if adapter else None, model, route_by_family=route_by_family,
                                   fallback_adapter="default" if route_by_family else None)
        write_report(run([candidate], get_suite("core"), split=split, n=n, families=families, keep_examples=n),
                     out, chart=False)
    return json.loads(out.read_text())["models"][0]


def response_loss(adapter: Path | None, records: list[dict], model: str, batch: int = 16) -> float:
    """Mean cross-entropy per answer token of a module (``None``: the base model) on ``records``."""
    import torch

    from peftlab import load_records
    from peftlab.adapters import load_for_inference
    from peftlab.data import Collator, PromptFormat, encode
    from peftlab.training import answer_losses

    loaded = load_for_inference(str(adapter) if adapter else None, model)
    fmt = loaded.prompt_format if adapter else PromptFormat(template="chat")
    features, _ = encode(load_records(records), loaded.tokenizer, fmt)
    collate = Collator(loaded.tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(features), batch):
            inputs = collate(features[i:i + batch])
            logits = loaded.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            per_token, answer = answer_losses(logits, inputs["labels"])
            total, tokens = total + float((per_token * answer).sum()), tokens + int(answer.sum())
    return total / tokens


def paired_interval(baseline: list[dict], other: list[dict], families: list[str], draws: int = 10_000) -> list[float]:
    """95 % interval of ``other`` - ``baseline`` accuracy over the questions, from eval reports that keep every
    answer (one per training seed, the same questions in each): each question's correctness averaged over the seeds,
    the paired per-question differences resampled (the seed spread alone misses which questions were drawn)."""
    def per_question(reports: list[dict]) -> list[float]:
        return [statistics.fmean(r["examples"][f][q]["correct"] for r in reports)
                for f in families for q in range(len(reports[0]["examples"][f]))]

    diffs = [b - a for a, b in zip(per_question(baseline), per_question(other), strict=True)]
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(draws))
    return [means[int(0.025 * draws)], means[int(0.975 * draws) - 1]]

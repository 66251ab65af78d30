"""The DIT adapter: one shared LoRA trained so that base + any weight diff + it answers the question with the topic.

Each example's diff sits in the routed slot of the MultiLoRA layer (frozen), the DIT adapter in its shared slot
(trained): one batch holds many diffs, and no dense per-example ΔW is ever formed. The saved adapter is a plain
peft LoRA folder (its ``peftlab.json`` names the base model) plus ``dit.json`` (the question, what it was trained
on, its loss) and the training log.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from peftlab.methods.multilora import MultiLoraConfig, MultiLoraModel
from peftlab.module import Adapter, Manifest, ModuleError, read, read_manifest
from peftlab.recipes.dit.data import PROMPT_FORMAT, QUESTION

SHARED = "dit"  # the shared adapter's name inside a model
INFO = "dit.json"


@dataclass
class DitConfig:
    """The DIT adapter and its training (the paper: rank 16, lr 1e-4 AdamW, batch 4-8, one epoch of 4,660)."""

    rank: int = 16
    alpha: float = 16.0
    target_modules: list[str] | str = "all-linear"
    question: str = QUESTION
    train_topics: int | None = None  # N training topics drawn at random (the data-scaling curve); None: all
    subset_seed: int = 0  # which N: the list's order groups topics by category, so the first N would be one kind
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0  # the paper: 0.01
    seed: int = 0


def _records(topics: list[dict], question: str) -> list[dict]:
    return [{"prompt": question, "response": t["topic"], "adapter": t["adapter"]} for t in topics]


def attach_diffs(diffs, adapters: list[str], model) -> MultiLoraModel:
    """``model`` with the diffs ``adapters`` in its routed slots, frozen."""
    from peftlab.adapters import load_module

    return load_module(diffs.module(adapters), model, where=str(diffs.folder))


def train_dit(diffs, out: str | Path, config: DitConfig, model=None, tokenizer=None,
              overwrite: bool = False) -> Path:
    """Train the DIT adapter on the training split of ``diffs`` (a ``Diffs``) through ``training.train`` (a
    prepared model: the diffs frozen in the routed slots, the DIT adapter in the shared one); save it to ``out``
    with ``dit.json`` and the training log."""
    from transformers import set_seed

    from peftlab.io import atomic_dir
    from peftlab.models import load_model
    from peftlab.module import write_into
    from peftlab.training import DataConfig, TrainConfig, train

    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output or pass overwrite")
    topics = diffs.split("train")
    if config.train_topics is not None:
        if not 1 <= config.train_topics <= len(topics):
            raise ValueError(f"train_topics: {config.train_topics} asked for, {diffs.folder} has {len(topics)}")
        topics = random.Random(config.subset_seed).sample(topics, config.train_topics)
    if model is None:
        model, tokenizer = load_model(read_manifest(Path(diffs.folder) / "module").base_model)
    set_seed(config.seed)
    wrapped = attach_diffs(diffs, [t["adapter"] for t in topics], model)
    wrapped.add_shared_adapter(SHARED, MultiLoraConfig(r=config.rank, alpha=config.alpha,
                                                       target_modules=config.target_modules))
    scratch = Path(out).parent / f".{Path(out).name}.run"  # Trainer's output_dir: only its log is kept
    run = TrainConfig(model=wrapped.causal_lm.config.name_or_path, method={"name": "multilora"},
                      data=DataConfig(template=PROMPT_FORMAT.template, system_prompt=PROMPT_FORMAT.system_prompt,
                                      pack=False),
                      training={"output_dir": str(scratch), "max_steps": config.steps,
                                "per_device_train_batch_size": config.batch_size,
                                "learning_rate": config.learning_rate, "weight_decay": config.weight_decay,
                                "lr_scheduler_type": "constant",
                                "seed": config.seed, "logging_steps": 10, "save_strategy": "no"})
    result = train(run, model=wrapped.train(), tokenizer=tokenizer,
                   train_data=_records(topics, config.question), save_module=False)
    shared = wrapped.shared[SHARED]
    manifest = Manifest({"default": Adapter("lora", shared.to_dict())}, wrapped.causal_lm.config.name_or_path,
                        PROMPT_FORMAT)
    info = {"question": config.question, "config": asdict(config), "diffs": str(diffs.folder),
            "trained_topics": len(topics), "train_runtime_s": result.metrics["train_runtime"],
            "loss": [h["loss"] for h in result.log_history if "loss" in h]}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_into(tmp, manifest, {"default": wrapped.adapter_state_dict(SHARED)})
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        for log in ("train_log.json", "loss.png"):
            if (scratch / log).exists():
                shutil.copy(scratch / log, tmp / log)
    shutil.rmtree(scratch, ignore_errors=True)
    wrapped.unload()
    return Path(out)


@dataclass
class DitAdapter:
    """A saved DIT adapter, read once: its ``dit.json``, its LoRA settings and tensors, its base model."""

    folder: Path
    info: dict
    config: MultiLoraConfig
    tensors: dict[str, torch.Tensor]
    base_model: str | None

    @property
    def question(self) -> str:
        return self.info["question"]


def read_dit(folder: str | Path) -> DitAdapter:
    folder = Path(folder)
    if not (folder / INFO).exists():
        raise ModuleError(f"{folder}: no {INFO}; not a DIT adapter (train one with `peftlab dit train`)")
    module = read(folder)
    (adapter,), (tensors,) = module.manifest.adapters.values(), module.tensors.values()
    config = MultiLoraConfig.from_dict(adapter.config, where=f"{folder}: adapter")
    return DitAdapter(folder, json.loads((folder / INFO).read_text(encoding="utf-8")), config, tensors,
                      module.manifest.base_model)


def add_dit(model: MultiLoraModel, dit: DitAdapter) -> None:
    """Put ``dit`` in the shared slot of ``model``, frozen."""
    model.add_shared_adapter(SHARED, dit.config)
    model.load_adapter_state_dict(dit.tensors, SHARED, where=str(dit.folder))
    model.requires_grad_(False)

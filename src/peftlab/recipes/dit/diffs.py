"""Weight diffs: one low-rank LoRA per topic, trained many at a time with MultiLoRA.

Topics train in groups (``group`` adapters per MultiLoRA run: every batch holds one example of each, each adapter
steps as it would alone). Each finished group is kept, so a stopped run resumes at the next group; at the end the
groups become one MultiLoRA module (``DIFFS/module``: every diff a plain peft LoRA sub-folder, the manifest their
index) with ``DIFFS/index.json`` saying each diff's topic and split.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from peftlab.methods.multilora import MultiLoraConfig
from peftlab.module import Manifest, Module, ModuleError, joined, read, write
from peftlab.recipes.dit.data import PROMPT_FORMAT, TopicData, held_out_topics, read_topics
from peftlab.report import write_json

MODULE, INDEX = "module", "index.json"


@dataclass
class DiffConfig:
    """How each topic's diff trains (the paper: rank 1 on every projection, lr 1e-3, one epoch of 270 questions)."""

    rank: int = 1
    alpha: float = 1.0  # scale alpha / rank, as the paper's 1 / r
    target_modules: list[str] | str = "all-linear"
    group: int = 32  # topics per MultiLoRA run
    epochs: float = 2.0
    learning_rate: float = 1e-2
    seed: int = 0
    training: dict = field(default_factory=dict)  # anything else for TrainingArguments


def train_diffs(data_dir: str | Path, out: str | Path, config: DiffConfig, model=None, tokenizer=None,
                base_model: str | None = None) -> Path:
    """Train a diff for every topic of ``data_dir`` (from ``peftlab dit gen``) into ``out``; returns ``out``."""
    from peftlab.data import load_records
    from peftlab.models import DEFAULT_MODEL, load_model
    from peftlab.training import DataConfig, TrainConfig, train

    out = Path(out)
    if (out / MODULE).exists():
        raise FileExistsError(f"{out / MODULE} already exists; choose another output")
    topics = read_topics(data_dir)
    records = load_records(Path(data_dir) / "train.jsonl")
    by_adapter: dict[str, list] = {}
    for r in records:
        by_adapter.setdefault(r.fields["adapter"], []).append(r)
    missing = [t["adapter"] for t in topics if t["adapter"] not in by_adapter]
    if missing:
        raise ModuleError(f"{data_dir}/train.jsonl has no examples for topics {missing[:5]}")
    if model is None:
        model, tokenizer = load_model(base_model or DEFAULT_MODEL)
    groups = [topics[i:i + config.group] for i in range(0, len(topics), config.group)]
    method = {"name": "multilora", "r": config.rank, "alpha": config.alpha, "target_modules": config.target_modules}
    for i, group in enumerate(tqdm(groups, desc="diff groups", unit="group")):
        folder = out / "groups" / f"{i:03d}"
        if (folder / MODULE).exists():
            continue
        training = {"learning_rate": config.learning_rate, "num_train_epochs": config.epochs, "seed": config.seed,
                    "lr_scheduler_type": "constant", "logging_steps": 8, "save_strategy": "no",
                    "disable_tqdm": True, **config.training, "output_dir": str(folder)}
        run = TrainConfig(model=base_model or DEFAULT_MODEL, method=method,
                          data=DataConfig(template=PROMPT_FORMAT.template, system_prompt=PROMPT_FORMAT.system_prompt,
                                          pack=False), training=training,
                          output=str(folder / MODULE))
        result = train(run, model=model, tokenizer=tokenizer,
                       train_data=[r for t in group for r in by_adapter[t["adapter"]]])
        model = result.model.unload()
    module = join([read(out / "groups" / f"{i:03d}" / MODULE) for i in range(len(groups))])
    write(out / MODULE, module.manifest, module.tensors)
    write_json(out / INDEX, {"data": str(data_dir), "config": asdict(config), "topics": topics})
    shutil.rmtree(out / "groups")
    return out


def join(modules: list[Module]) -> Module:
    """MultiLoRA modules of one base model and one set of targets as one module (adapter names must differ)."""
    first = modules[0].manifest
    adapters: dict[str, tuple[MultiLoraConfig, dict]] = {}
    for module in modules:
        if module.manifest.base_model != first.base_model:
            raise ModuleError(f"modules of base models {first.base_model!r} and {module.manifest.base_model!r}")
        clash = sorted(set(module.manifest.adapters) & set(adapters))
        if clash:
            raise ModuleError(f"adapters {clash[:3]} appear in two modules")
        adapters.update({name: (MultiLoraConfig.from_dict(adapter.config), module.tensors[name])
                         for name, adapter in module.manifest.adapters.items()})
    return joined(adapters, "multilora", first.base_model, first.prompt_format)


@dataclass
class Diffs:
    """A trained set of diffs: the module and, per adapter name, its topic and split."""

    folder: Path
    topics: list[dict]

    @classmethod
    def open(cls, folder: str | Path) -> Diffs:
        folder = Path(folder)
        if not (folder / INDEX).exists():
            raise ModuleError(f"{folder}: no {INDEX}; train diffs with `peftlab dit diffs`")
        return cls(folder, json.loads((folder / INDEX).read_text(encoding="utf-8"))["topics"])

    def split(self, name: str) -> list[dict]:
        chosen = [t for t in self.topics if t["split"] == name]
        if not chosen:
            raise ModuleError(f"{self.folder}: no topics in split {name!r}")
        return chosen

    def resplit(self, config: TopicData) -> Diffs:
        """The same diffs with the held-out topics ``config.split`` gives (``dit gen`` with that split makes the
        same data, so its diffs would be these)."""
        held, moved = held_out_topics([t["topic"] for t in self.topics], config, random.Random(config.seed))
        return Diffs(self.folder, [{**{k: v for k, v in t.items() if k != "moved_to_train"},
                                    "split": "test" if t["topic"] in held else "train",
                                    **({"moved_to_train": True} if t["topic"] in moved else {})}
                                   for t in self.topics])

    def module(self, adapters: list[str]) -> Module:
        """The module with only ``adapters`` (in that order)."""
        whole = read(self.folder / MODULE)
        unknown = sorted(set(adapters) - set(whole.manifest.adapters))
        if unknown:
            raise ModuleError(f"{self.folder / MODULE}: no diffs {unknown[:5]}")
        manifest = Manifest({a: whole.manifest.adapters[a] for a in adapters}, whole.manifest.base_model,
                            whole.manifest.prompt_format)
        return Module(manifest, {a: whole.tensors[a] for a in adapters})

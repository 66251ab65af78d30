"""One training function for every method, on ``transformers.Trainer``.

Everything under ``training:`` in a config goes to ``TrainingArguments`` unchanged, so learning rate, epochs,
accumulation, warmup, logging (``report_to``), checkpoints, multi-GPU launchers and resuming work as in Trainer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments, set_seed

from peftlab.adapters import parameter_report, restore, save, save_into
from peftlab.config import ConfigError, from_dict, load_yaml
from peftlab.context import BASE_ADAPTER
from peftlab.data import IGNORE_INDEX, AdapterBatches, Collator, EncodeStats, PromptFormat, Record, encode, load_records
from peftlab.methods import DEFAULT_ADAPTER, get_method
from peftlab.methods.base import PeftlabModel
from peftlab.models import DEFAULT_MODEL, load_model
from peftlab.report import plot, write_json

log = logging.getLogger(__name__)

TRAINING_DEFAULTS: dict[str, Any] = {"output_dir": "runs/peftlab", "report_to": "none", "logging_steps": 10,
                                     "save_strategy": "no", "per_device_train_batch_size": 8,
                                     "dataloader_pin_memory": torch.cuda.is_available(),
                                     "remove_unused_columns": False,  # features hold only what the model takes
                                     "label_names": ["labels"]}  # the wrappers take **kwargs: say where labels are


@dataclass
class DataConfig:
    """Where the examples are and how a prompt is rendered (see ``peftlab.data.PromptFormat``)."""

    train: str | None = None
    eval: str | None = None
    template: str = "auto"
    plain_format: str = "{prompt}\n"
    system_prompt: str | None = None
    max_length: int = 1024
    pack: bool | None = None  # None: pack examples into one row when the method allows it (no padding compute)
    rows_per_adapter: int = 1  # multilora: every batch holds this many examples of every adapter
    match_base_weight: float = 5.0  # records with match_base: weight of their KL to the base model (DIT's paper: 5)
    loss: str | None = None  # token: mean over answer tokens | example: mean per example, then over examples |
    # adapter: mean per adapter, summed over adapters | None: adapter for routable methods (multilora), else token

    def __post_init__(self) -> None:
        if self.loss not in (None, "token", "example", "adapter"):
            raise ConfigError(f"data.loss must be 'token', 'example' or 'adapter', got {self.loss!r}")

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.template, self.plain_format, self.system_prompt)


@dataclass
class TrainConfig:
    """A whole run. ``method`` is ``{name: lora, r: 8, ...}`` (or just the name); ``training`` goes to Trainer."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    quantize: str | None = None  # the base's linear layers in 8 or 4 bits: int8, nf4, fp4 (peftlab.quantize)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    data: DataConfig = field(default_factory=DataConfig)
    training: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = {"name": self.method}
        if "name" not in self.method:
            raise ConfigError(f"method: needs a 'name' (e.g. lora, ia3); got {self.method}")

    @property
    def output_dir(self) -> Path:
        return Path(self.training.get("output_dir", TRAINING_DEFAULTS["output_dir"]))

    @property
    def module_dir(self) -> Path:
        return Path(self.output) if self.output else self.output_dir / "module"

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        return from_dict(cls, load_yaml(path, overrides), str(path or "config"))


@dataclass
class TrainResult:
    model: nn.Module
    module_dir: Path
    metrics: dict[str, float]
    data_stats: EncodeStats
    log_history: list[dict[str, float]]
    parameters: dict[str, Any]


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` that Trainer finished writing (its ``trainer_state.json`` is written last)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if _CHECKPOINT.match(p.name) and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)), default=None)


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each predicted answer token [B, T-1], and which tokens are answer tokens."""
    shift_labels = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                  shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                                  reduction="none").view(shift_labels.shape)
    return per_token, (shift_labels != IGNORE_INDEX).float()


def token_losses(logits: torch.Tensor, labels: torch.Tensor, base_logits: torch.Tensor | None = None,
                 match_base: torch.Tensor | None = None, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each predicted answer token's loss [B, T-1] and which tokens are answer tokens: cross-entropy, except on the
    tokens of ``match_base`` examples (per row [B] or per token [B, T]), where it is ``weight`` times
    KL(base ‖ model) against ``base_logits``: there the model is taught to answer as the base model does (DIT's
    trigger variant, off the trigger), as a distribution rather than one greedy answer."""
    per_token, valid = answer_losses(logits, labels)
    if match_base is None:
        return per_token, valid
    base = torch.log_softmax(base_logits[:, :-1].float(), -1)
    kl = (base.exp() * (base - torch.log_softmax(logits[:, :-1].float(), -1))).sum(-1)
    match = (match_base[:, None].expand(labels.shape) if match_base.dim() == 1 else match_base)[:, 1:].bool()
    return torch.where(match, weight * kl, per_token), valid


def _group_means(values: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor,
                 size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of the valid ``values`` in each of ``size`` groups, and which groups have any."""
    groups, valid = groups.flatten(), valid.flatten()
    sums = torch.zeros(size, device=values.device).index_add(0, groups, values.flatten() * valid)
    counts = torch.zeros(size, device=values.device).index_add(0, groups, valid)
    return sums / counts.clamp(min=1), counts > 0


def example_mean_loss(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                      **match: Any) -> torch.Tensor:
    """Cross-entropy averaged over each example's answer tokens, then over examples.

    With the token mean, one long answer outweighs many short ones; here every example counts the same. Examples
    are rows, or, in packed rows (``position_ids`` restarting at 0), the spans between restarts. ``match``: the
    match-the-base terms of ``token_losses``.
    """
    per_token, valid = token_losses(logits, labels, **match)
    rows, width = per_token.shape
    if position_ids is not None:
        segment = (position_ids == 0).long().cumsum(-1)[:, 1:]  # the example each predicted token belongs to
    else:
        segment = torch.zeros_like(per_token, dtype=torch.long)
    example = torch.arange(rows, device=labels.device)[:, None] * (width + 1) + segment
    means, present = _group_means(per_token, valid, example, rows * (width + 1))
    return means[present].mean()


def adapter_mean_loss(logits: torch.Tensor, labels: torch.Tensor, adapter_index: torch.Tensor,
                      adapters: int, **match: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy averaged over each adapter's answer tokens, then summed over adapters.

    Each adapter's gradient is then exactly what training it alone on its rows gives: a large adapter's data does
    not drown a small one. ``adapter_index`` is per row [B] or per token [B, T] (packed). Returns the loss, each
    adapter's mean and which adapters the batch has. ``match``: the match-the-base terms of ``token_losses``.
    """
    per_token, valid = token_losses(logits, labels, **match)
    index = adapter_index[:, None].expand(labels.shape) if adapter_index.dim() == 1 else adapter_index
    means, present = _group_means(per_token, valid, index[:, 1:], adapters)
    return means[present].sum(), means.detach(), present


class _Trainer(Trainer):
    """Trainer whose checkpoints are module folders (only what the method trains), with the per-example and the
    per-adapter loss as options, per-adapter losses in the log, and the method's own gradient clipping."""

    def __init__(self, *args, loss: str = "token", sampler: torch.utils.data.Sampler | None = None,
                 match_base_weight: float = 5.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss = loss
        self.sampler = sampler
        self.match_base_weight = match_base_weight
        self.adapter_losses: dict[str, list[float]] = {}  # since the last log: name -> [sum of means, batches]
        if loss != "token":
            self.loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides it by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        match = self._match_base(model, inputs)
        if self.loss == "token":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})  # the model's own loss: not needed
        if self.loss == "example":
            loss = example_mean_loss(outputs.logits, inputs["labels"], inputs.get("position_ids"), **match)
        else:
            names = inputs["adapter_names"]
            loss, means, present = adapter_mean_loss(outputs.logits, inputs["labels"], inputs["adapter_index"],
                                                     len(names), **match)
            if model.training:
                for name, mean in zip(names, means[present.nonzero().flatten()].tolist(), strict=False):
                    total = self.adapter_losses.setdefault(name, [0.0, 0])
                    total[0] += mean
                    total[1] += 1
        return (loss, outputs) if return_outputs else loss

    def _match_base(self, model, inputs: dict[str, Any]) -> dict[str, Any]:
        """The match-the-base terms for a batch whose records say ``match_base``: the base model's logits on the
        same rows, from the routed model with every row sent to the base route (``BASE_ADAPTER``)."""
        match_base = inputs.pop("match_base", None)
        if match_base is None or not bool(match_base.any()):
            return {}
        if "adapter_index" not in inputs or self.loss == "token":
            raise ConfigError("records with match_base train against the base model's own answer: that needs a "
                              "routable method (its base route) and data.loss example or adapter")
        base_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        base_inputs.update(adapter_names=[BASE_ADAPTER], adapter_index=torch.zeros_like(inputs["adapter_index"]))
        with torch.no_grad():
            base_logits = model(**base_inputs).logits
        return {"base_logits": base_logits, "match_base": match_base, "weight": self.match_base_weight}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.adapter_losses:
            logs.update({f"loss/{name}": round(total / batches, 4)  # the mean of its batch means since the last log
                         for name, (total, batches) in sorted(self.adapter_losses.items())})
            self.adapter_losses = {}
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        return self.sampler or super()._get_train_sampler(train_dataset)

    def _clip_grad_norm(self, model):
        wrapped = self.accelerator.unwrap_model(model)
        if isinstance(wrapped, PeftlabModel) and wrapped.clips_its_own_way:
            self.accelerator.unscale_gradients()  # fp16: the GradScaler's factor comes off before the norm is taken
            return wrapped.clip_grad_norm_(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        save_into(self.model, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        restore(model or self.model, resume_from_checkpoint)


def train(config: TrainConfig, model: PreTrainedModel | PeftlabModel | None = None,
          tokenizer: PreTrainedTokenizerBase | None = None, train_data: list[dict | Record] | None = None,
          eval_data: list[dict | Record] | None = None,
          callbacks: list[TrainerCallback] | None = None, save_module: bool = True) -> TrainResult:
    """Train ``config.method`` on the data with Trainer, save the module atomically, and return it.

    ``model``/``tokenizer`` and ``train_data``/``eval_data`` override what the config names, for use from Python;
    ``callbacks`` go to Trainer (e.g. to evaluate generations during training). ``model`` may be prepared: a model
    of ``config.method`` whose parts that require grad are what trains (DIT: a shared adapter over frozen routed
    diffs); records then name adapters it already holds, and batches are drawn at random. ``save_module=False``
    leaves saving to the caller (the training log is written either way).
    """
    method = get_method(config.method["name"])
    settings = {k: v for k, v in config.method.items() if k != "name"}
    method_config = method.make_config(settings, where=f"method ({method.name})")
    if save_module and config.module_dir.exists() and not config.overwrite:
        raise FileExistsError(f"{config.module_dir} already exists; set overwrite: true (--set overwrite=true) "
                              f"or choose another output")
    args_dict = {**TRAINING_DEFAULTS, **config.training}
    resume = args_dict.pop("resume_from_checkpoint", None)
    args = TrainingArguments(**args_dict)
    if args.fp16 and args.device.type == "cpu":
        log.warning("training.fp16 does nothing on the CPU (accelerate trains in float32 there, without a loss "
                    "scaler); use bf16: true for half precision on the CPU")
    if resume is True:
        resume = last_complete_checkpoint(args.output_dir)
        if resume is None:
            log.warning("resume_from_checkpoint: no complete checkpoint in %s; starting fresh", args.output_dir)
    resume = str(resume) if resume else None

    train_source = train_data if train_data is not None else config.data.train
    if train_source is None:
        raise ConfigError("data.train: no training data given")
    train_records = load_records(train_source)  # bad data fails here, before a model is loaded
    eval_source = eval_data if eval_data is not None else config.data.eval
    eval_records = load_records(eval_source) if eval_source is not None else None
    adapter_names = _adapter_names(train_records, method)
    prepared = isinstance(model, PeftlabModel)
    if prepared:
        missing = sorted(set(adapter_names) - set(model.adapters) - {DEFAULT_ADAPTER})
        if model.method is not method or missing:
            raise ConfigError(f"the prepared model is a {model.method.name} model with adapters "
                              f"{sorted(model.adapters)[:5]}; the run names method {method.name!r}"
                              f"{f' and adapters {missing[:5]} it lacks' if missing else ''}")
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, quantize=config.quantize)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    fmt = config.data.prompt_format
    train_features, stats = encode(train_records, tokenizer, fmt, config.data.max_length)
    eval_features = encode(eval_records, tokenizer, fmt, config.data.max_length)[0] if eval_records else None

    set_seed(args.seed)  # the method's fresh weights are drawn here, before Trainer seeds again
    wrapped = model if prepared else method.attach_many(model, dict.fromkeys(adapter_names, method_config))
    wrapped.prompt_format = fmt  # before training: every checkpoint's manifest records how its prompts looked
    params = parameter_report(wrapped)
    log.info("%s: %s trainable parameters (%.4f%% of %s)", method.name, f"{params['trainable_parameters']:,}",
             params["trainable_percent"], f"{params['base_parameters']:,}")
    pack = method.supports_packing if config.data.pack is None else config.data.pack
    if pack and not method.supports_packing:
        raise ConfigError(f"data.pack: method {method.name!r} needs one example per row; set pack: false")
    collator = Collator(tokenizer.pad_token_id, pack=pack)
    sampler = None
    routed_training = method.routable and not prepared  # each named adapter trains
    if routed_training:  # every adapter in every batch: each steps as it would alone (see data.AdapterBatches)
        adapters = [f["adapter"] for f in train_features]
        args.per_device_train_batch_size = config.data.rows_per_adapter * len(set(adapters))
        sampler = AdapterBatches(adapters, config.data.rows_per_adapter, args.seed)
    loss = config.data.loss or ("adapter" if routed_training else "token")
    if loss == "adapter" and not method.routable:
        raise ConfigError(f"data.loss: 'adapter' averages per adapter; method {method.name!r} trains one adapter")
    trainer = _Trainer(model=wrapped, args=args, train_dataset=train_features, eval_dataset=eval_features,
                       data_collator=collator, processing_class=tokenizer, loss=loss, sampler=sampler,
                       match_base_weight=config.data.match_base_weight,
                       callbacks=[*(callbacks or []), *wrapped.training_callbacks()])
    use_cache, model.config.use_cache = model.config.use_cache, False  # a KV cache is only waste in training
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    finally:
        model.config.use_cache = use_cache
    wrapped.eval()
    history = trainer.state.log_history
    if trainer.is_world_process_zero():  # under torchrun every process holds the same module: one writes it
        if save_module:
            save(wrapped, config.module_dir, overwrite=config.overwrite)
        write_training_report(Path(args.output_dir), history, output.metrics, stats, params)
    return TrainResult(wrapped, config.module_dir, output.metrics, stats, history, params)


def _adapter_names(records: list[Record], method) -> list[str]:
    """The adapters a run trains: every name the records give (a routable method), else the one default."""
    named = sorted({r.fields["adapter"] for r in records if "adapter" in r.fields})
    if not method.routable:
        if named:
            raise ConfigError(f"the training records name adapters {named[:5]}, but method {method.name!r} trains "
                              f"one adapter; use multilora to train one adapter per name")
        return [DEFAULT_ADAPTER]
    unnamed = [r.where for r in records if "adapter" not in r.fields]
    if unnamed or not named:
        raise ConfigError(f"method {method.name!r} trains one adapter per name: every record needs an 'adapter' "
                          f"field (or data.train a folder of one file per adapter); {unnamed[:3]} have none")
    return named


def write_training_report(folder: Path, history: list[dict[str, float]], metrics: dict[str, float],
                          stats: EncodeStats, params: dict[str, Any]) -> None:
    """``train_log.json`` (for scripts) and ``loss.png`` (for people) beside the checkpoints."""
    write_json(folder / "train_log.json", {"metrics": metrics, "data": asdict(stats), "parameters": params,
                                           "log_history": history})
    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not points:
        return
    adapters = sorted({k for h in history for k in h if k.startswith("loss/")})
    with plot(folder / "loss.png", "step", "training loss", figsize=(6, 3.5)) as ax:
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label="train")
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="s", markersize=3, label="eval")
        for key in adapters:  # one thin line per adapter (MultiLoRA)
            ax.plot(*zip(*[(h["step"], h[key]) for h in history if key in h], strict=True), linewidth=0.8,
                    alpha=0.7, label=key.removeprefix("loss/") if len(adapters) <= 12 else None)

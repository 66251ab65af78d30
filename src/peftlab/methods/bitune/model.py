"""Bitune on transformers 5: two prompt passes (bidirectional and causal, each with its own peft adapter), their
key/value caches mixed per layer by learned coefficients, then the answer read causally on the mixed cache.

No model surgery: the bidirectional pass gets an explicit 4-D additive mask (transformers uses a 4-D mask as given),
the mixed keys/values go into an ordinary ``DynamicCache``, and generation is the model's own ``generate()`` with a
pre-hook that encodes the prompt once at the first call. Any causal LM with a standard cache works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from peftlab.data import IGNORE_INDEX
from peftlab.methods.base import (
    CHECKPOINTING,
    DEFAULT_ADAPTER,
    Method,
    PeftlabModel,
    cache_arg,
    cache_in,
    is_checkpointing,
    is_decode_step,
)
from peftlab.methods.bitune.config import BIDIR, CAUSAL, BituneConfig
from peftlab.methods.bitune.layer import KVMixer, bidirectional_mask
from peftlab.methods.lora import get_peft_model, read_peft_folder, write_peft_folder

WEIGHTS = "bitune.safetensors"


@dataclass
class PromptSplit:
    """A batch cut into the prompt without its last token (left-padded) and the rest (right-padded).

    ``suffix_src`` maps each suffix cell back to its column in the input, so outputs can be aligned to the input.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    prefix_pos: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    suffix_pos: torch.Tensor
    suffix_src: torch.Tensor


def split_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> PromptSplit:
    """Cut every row (padded on either side) after its first ``prompt_lengths - 1`` real tokens.

    Positions count real tokens from 0, as an unpadded forward would.
    """
    valid = attention_mask.bool()
    rows, width = input_ids.shape
    n = valid.sum(1)
    start = valid.int().argmax(1)
    q = (prompt_lengths.clamp(min=1) - 1).minimum(n - 1).clamp(min=0)  # prefix length: the prompt minus its last
    s = n - q
    lp, ls = int(q.max()), int(s.max())
    device = input_ids.device
    col = torch.arange(lp, device=device)[None]
    lead = (lp - q)[:, None]
    prefix_mask = col >= lead
    prefix_src = (start[:, None] + col - lead).clamp(0, width - 1)
    j = torch.arange(ls, device=device)[None]
    suffix_mask = j < s[:, None]
    suffix_src = ((start + q)[:, None] + j).clamp(0, width - 1)
    return PromptSplit(prefix_ids=torch.where(prefix_mask, input_ids.gather(1, prefix_src), 0),
                       prefix_mask=prefix_mask.long(), prefix_pos=(col - lead).clamp(min=0),
                       suffix_ids=torch.where(suffix_mask, input_ids.gather(1, suffix_src), 0),
                       suffix_mask=suffix_mask.long(), suffix_pos=q[:, None] + j, suffix_src=suffix_src)


class BituneModel(PeftlabModel):
    """A causal LM with Bitune's two peft adapters and mixer; ``forward`` trains and scores, ``generate`` decodes."""

    def __init__(self, model: PreTrainedModel, method: Method) -> None:
        super().__init__(model, method)
        self.mixer: KVMixer | None = None
        self._generating = False
        self._handle = None

    @property
    def bitune_config(self) -> BituneConfig:
        return next(iter(self.adapters.values()))

    def add_adapter(self, name: str, config: BituneConfig) -> None:
        base = self.causal_lm
        if str(base.config._attn_implementation).startswith("flash_attention"):
            raise ValueError(f"Bitune reads the prompt with an explicit 4-D attention mask, which "
                             f"{base.config._attn_implementation} does not take; load the model with "
                             f"attn_implementation='sdpa' (or 'eager')")
        adapter = config.adapter_config().to_peft()
        self.model = get_peft_model(base, adapter, adapter_name=CAUSAL)
        if BIDIR in config.adapters:
            self.model.add_adapter(BIDIR, adapter)
        self.model.set_requires_grad(config.adapters, True)
        if len(config.passes) == 2:
            self.mixer = KVMixer(base.config.num_hidden_layers, config.gate, config.eps, config.init)
            self.mixer.to(next(base.parameters()).device).train(self.training)
        windows = [layer.sliding_window for layer in DynamicCache(config=base.config).layers
                   if getattr(layer, "sliding_window", None)]
        self._window = min(windows, default=None)  # the smallest sliding attention window, if any
        self._handle = base.register_forward_pre_hook(self._on_generate_call, with_kwargs=True)
        self.adapters[name] = config

    # --- tensors -----------------------------------------------------------------------------------------------
    def adapter_state_dict(self, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """Each peft adapter's tensors under its name (``default.``, ``bidir.``), and the mix (``mixer.``)."""
        state = {f"{adapter}.{k}": v.detach() for adapter in self.bitune_config.adapters
                 for k, v in peft.get_peft_model_state_dict(self.model, adapter_name=adapter).items()}
        if self.mixer is not None:
            state.update({f"mixer.{k}": v.detach() for k, v in self.mixer.state_dict().items()})
        return state

    def _load_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        for adapter in self.bitune_config.adapters:
            part = {k[len(adapter) + 1:]: v for k, v in tensors.items() if k.startswith(adapter + ".")}
            peft.set_peft_model_state_dict(self.model, part, adapter_name=adapter)
        if self.mixer is not None:
            self.mixer.load_state_dict({k.removeprefix("mixer."): v for k, v in tensors.items()
                                        if k.startswith("mixer.")})

    def _detach(self) -> PreTrainedModel:
        self._handle.remove()
        return self.model.unload()

    # --- the prompt passes -------------------------------------------------------------------------------------
    def _use(self, adapter: str) -> None:
        """Activate one adapter without peft's side effect of freezing the others (they must keep training)."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.set_adapter(adapter)
        for p, flag in flags:
            p.requires_grad_(flag)

    def _prompt_pass(self, ids, mask, pos, adapter: str, bidirectional: bool) -> DynamicCache:
        self._use(adapter)
        lm = self.causal_lm
        attention = bidirectional_mask(mask, lm.dtype) if bidirectional else mask
        cache = DynamicCache(config=lm.config)
        lm(input_ids=ids, attention_mask=attention, position_ids=pos, use_cache=True, logits_to_keep=1,
           **{cache_arg(lm): cache})
        return cache

    def encode_prompt(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                      into: DynamicCache | None = None) -> DynamicCache:
        """Run the variant's prompt passes on left-padded ``ids`` and write the (mixed) keys/values into ``into``.

        Leaves the causal adapter active, for what follows the prompt.
        """
        if self.training and is_checkpointing(self.causal_lm):
            raise ValueError(_NO_CHECKPOINTING)
        self._check_window(ids.shape[1])
        caches = [self._prompt_pass(ids, mask, pos, adapter, bidir) for adapter, bidir in self.bitune_config.passes]
        if self.mixer is not None:
            layers = self.mixer(causal=caches[1], other=caches[0])
        else:
            layers = [(layer.keys, layer.values) for layer in caches[0].layers]
        into = into if into is not None else DynamicCache(config=self.causal_lm.config)
        for i, (k, v) in enumerate(layers):
            into.update(k, v, i)
        self._use(CAUSAL)
        return into

    def read_prompt(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                    cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Read left-padded prompts into ``cache`` the Bitune way, all but their last token (the one rule for where
        a prompt's read ends, at generation; ``split_prompt`` applies the same rule to rows with answers), and
        return that last token's ids and positions: it is read causally, on the mixed cache."""
        if mask.dim() != 2 or not bool(mask[:, -1].all()):
            raise ValueError("Bitune generation needs left-padded prompts with a 2-D attention mask "
                             "(tokenizer.padding_side = 'left')")
        if ids.shape[1] > 1:
            self.encode_prompt(ids[:, :-1], mask[:, :-1], pos[:, :-1], into=cache)
        else:
            self._use(CAUSAL)
        return ids[:, -1:], pos[:, -1:]

    def _check_window(self, tokens: int) -> None:
        """Sliding-window layers keep only their window in the cache, and the bidirectional mask has no window:
        Bitune is exact only while everything it reads at once fits in the smallest window."""
        if self._window is not None and tokens >= self._window - 1:
            raise ValueError(f"Bitune: {tokens} tokens reach the sliding attention window ({self._window}) of this "
                             f"{self.causal_lm.config.model_type} model; prompt passes with sliding windows are "
                             f"not supported. Use shorter inputs (max_length) or a model without sliding windows.")

    # --- training and scoring ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
                adapter_names: list[str] | None = None, adapter_index: torch.Tensor | None = None,
                ) -> CausalLMOutputWithPast:
        """Logits aligned to ``input_ids`` from each row's last prompt token on (earlier positions are 0: Bitune
        reads the prompt into a cache, not into predictions) and, with ``labels``, the mean loss over answer tokens.

        Each row's prompt is its first ``prompt_lengths`` real tokens (data.Collator gives them from the records).
        """
        self.bind({"prompt_lengths": prompt_lengths, "adapter_names": adapter_names, "adapter_index": adapter_index})
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_lengths is None:
            raise ValueError("Bitune needs to know where each prompt ends: pass prompt_lengths (the prompt tokens "
                             "of each row; data.Collator gives them)")
        split = split_prompt(input_ids, attention_mask, prompt_lengths)
        self._check_window(split.prefix_ids.shape[1] + split.suffix_ids.shape[1])
        cache = None
        if split.prefix_ids.shape[1] > 0:
            cache = self.encode_prompt(split.prefix_ids, split.prefix_mask, split.prefix_pos)
        else:
            self._use(CAUSAL)
        mask = torch.cat([split.prefix_mask, split.suffix_mask], dim=1)
        out = self.causal_lm(input_ids=split.suffix_ids, attention_mask=mask, position_ids=split.suffix_pos,
                             use_cache=True, **{cache_arg(self.causal_lm): cache})
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(split.suffix_src)
        real = split.suffix_mask.bool()
        logits = out.logits.new_zeros(*input_ids.shape, out.logits.shape[-1])
        logits[rows[real], split.suffix_src[real]] = out.logits[real]
        loss = None
        if labels is not None:
            suffix_labels = torch.where(real, labels.gather(1, split.suffix_src), IGNORE_INDEX)
            loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(),
                                               suffix_labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # --- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """The model's own ``generate()``; its first call encodes the prompt (all but the last token) the Bitune
        way, then decoding runs on the mixed cache with the causal adapter. Prompts must be left-padded."""
        self.bind(kwargs)
        self._generating = True
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._generating = False

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: DynamicCache, **fields) -> torch.Tensor:
        """Bitune's prompt passes on all but each prompt's last token, then that token read causally on the
        mixed cache (what ``generate`` does at its first call); decode steps after it are plain forwards."""
        self.bind(dict(fields))
        last_ids, last_pos = self.read_prompt(input_ids, attention_mask, position_ids, cache)
        return self.decode(last_ids, attention_mask, last_pos, cache)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               cache: DynamicCache, **fields) -> torch.Tensor:
        """A plain causal step with the causal adapter (``prefill`` left it active)."""
        lm = self.causal_lm
        out = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 **{cache_arg(lm): cache})
        return out.logits[:, -1]

    def _on_generate_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache, ids = cache_in(kwargs), kwargs.get("input_ids")
        if not self._generating or cache is None or ids is None or is_decode_step(kwargs) or ids.shape[1] < 2:
            return None  # a prompt pass of ours, a decode step, or nothing before the last token
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        pos = kwargs.get("position_ids")
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0) if pos is None else pos
        self._generating = False  # the prompt passes below call this model again
        try:
            last_ids, last_pos = self.read_prompt(ids, mask, pos, cache)
        finally:
            self._generating = True
        kwargs = {**kwargs, "input_ids": last_ids, "position_ids": last_pos}
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"][-1:]
        return args, kwargs

    # --- the model's interface ---------------------------------------------------------------------------------
    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        raise ValueError(_NO_CHECKPOINTING)

    gradient_checkpointing_enable = activation_checkpointing_enable  # the name before transformers 5



_NO_CHECKPOINTING = (f"Bitune cannot use transformers' activation checkpointing: in training it turns the KV cache "
                     f"off, so the answer would silently never see the prompt. Set training.{CHECKPOINTING}: "
                     f"false (and lower the batch size or sequence length to save memory).")


class BituneMethod(Method):
    """A saved Bitune adapter holds both peft adapters in peft's own layout (the causal one at the top, the
    bidirectional one in ``bidir/``) and ``bitune.safetensors`` with the 2 x n_layers mixing coefficients
    (``mixer.key_weight``, ``mixer.value_weight``)."""

    name = "bitune"
    config_class = BituneConfig
    model_class = BituneModel
    not_mergeable_because = ("it reads the prompt twice, causally and bidirectionally with two LoRAs, and mixes the "
                             "two passes' keys and values with learned coefficients: no single set of weights does "
                             "that in one causal pass")
    not_composable_because = ("its two LoRAs feed two passes whose keys and values are mixed by learned "
                              "coefficients, so its parameters do not add up to a weight update")

    def write_files(self, folder: Path, config: BituneConfig, tensors: dict[str, torch.Tensor],
                    base_model: str | None) -> None:
        adapter = config.adapter_config().to_peft()
        for name in config.adapters:
            part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            write_peft_folder(folder if name == CAUSAL else folder / name, adapter, part, base_model)
        mixer = {k: v.contiguous() for k, v in tensors.items() if k.startswith("mixer.")}
        if mixer:
            save_file(mixer, str(folder / WEIGHTS), metadata={"format": "pt", "gate": config.gate,
                                                              "eps": str(config.eps)})

    def read_files(self, folder: Path, config: BituneConfig) -> dict[str, torch.Tensor]:
        tensors = {f"{name}.{k}": v for name in config.adapters
                   for k, v in read_peft_folder(folder if name == CAUSAL else folder / name).items()}
        if len(config.passes) == 2:
            path = folder / WEIGHTS
            if not path.exists():
                raise FileNotFoundError(f"{folder}: no {WEIGHTS} (the mixing coefficients of variant "
                                        f"{config.variant!r})")
            tensors.update(load_file(str(path)))
        return tensors

"""Bitune on transformers 5: two prompt passes (bidirectional and causal, each with its own peft adapter), their
key/value caches mixed per layer by learned coefficients, then the answer read causally on the mixed cache.

No model surgery: the bidirectional pass gets an explicit 4-D additive mask (transformers uses a 4-D mask as given),
the mixed keys/values go into an ordinary ``DynamicCache``, and generation is the model's own ``generate()`` with a
pre-hook that encodes the prompt once at the first call. Any causal LM with a standard cache works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from peftlab.data import IGNORE_INDEX
from peftlab.methods import MethodConfig, ModelWrapper, cache_arg, cache_in

CAUSAL, BIDIR = "default", "bidir"  # peft adapter names: the answer/causal adapter and the bidirectional one

# variant -> the prompt passes as (adapter, bidirectional?); two passes are mixed (the second one is the causal one)
VARIANTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "bitune": ((BIDIR, True), (CAUSAL, False)),  # the paper's method
    "naive_bidir": ((CAUSAL, True),),  # one adapter; the prompt read only bidirectionally
    "no_mixing": ((BIDIR, True),),  # the bidirectional adapter reads the prompt, nothing is mixed
    "only_causal": ((BIDIR, False), (CAUSAL, False)),  # two adapters and mixing, but both passes causal
    "shared_weights": ((CAUSAL, True), (CAUSAL, False)),  # both passes with one adapter
}
GATES = ("abs", "relu")  # the paper's mixing variants 607 (|w|) and 801 (relu(w))


@dataclass
class BituneConfig(MethodConfig):
    """Bitune settings. ``adapter`` is a LoRA (``use_dora: true`` for DoRA) or IA3 config, as for those methods;
    both adapters get the same settings. The mix gives weight a = g(w) / (g(w) + eps) to the bidirectional
    features, separately for keys and values in every layer; ``init = eps`` starts it at 50/50."""

    adapter: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    variant: str = "bitune"  # bitune | naive_bidir | no_mixing | only_causal | shared_weights (the ablations)
    gate: str = "abs"  # abs: the paper's variant 607 | relu: variant 801
    eps: float = 0.01
    init: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.adapter, str):
            self.adapter = {"name": self.adapter}
        if self.adapter.get("name", "lora") not in ("lora", "ia3"):
            raise ValueError(f"bitune.adapter.name must be lora or ia3, got {self.adapter.get('name')!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"bitune.variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.gate not in GATES:
            raise ValueError(f"bitune.gate must be one of {GATES}, got {self.gate!r}")
        if self.eps <= 0:
            raise ValueError(f"bitune.eps must be > 0, got {self.eps}")

    @property
    def passes(self) -> tuple[tuple[str, bool], ...]:
        return VARIANTS[self.variant]

    @property
    def adapters(self) -> list[str]:
        return sorted({CAUSAL} | {name for name, _ in self.passes})


class KVMixer(nn.Module):
    """Per-layer coefficients that blend the causal and the other pass's keys (and, separately, values).

    Kept and computed in fp32 whatever the model's dtype, as the paper does.
    """

    def __init__(self, n_layers: int, gate: str = "abs", eps: float = 0.01, init: float = 0.01) -> None:
        super().__init__()
        self.gate, self.eps = gate, eps
        self.key_weight = nn.Parameter(torch.full((n_layers,), float(init)))
        self.value_weight = nn.Parameter(torch.full((n_layers,), float(init)))

    def share(self, weight: torch.Tensor) -> torch.Tensor:
        """The share of the bidirectional (other) features, in [0, 1)."""
        g = weight.abs() if self.gate == "abs" else weight.relu()
        return g / (g + self.eps)

    def forward(self, causal: DynamicCache, other: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.key_weight)
        if len(causal.layers) != n or len(other.layers) != n:
            raise ValueError(f"mixer has {n} layers but the caches have {len(causal.layers)}/{len(other.layers)}")
        a_k, a_v = self.share(self.key_weight), self.share(self.value_weight)
        return [(_blend(c.keys, o.keys, a_k[i]), _blend(c.values, o.values, a_v[i]))
                for i, (c, o) in enumerate(zip(causal.layers, other.layers, strict=True))]


def _blend(causal: torch.Tensor, other: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return ((1 - a) * causal.float() + a * other.float()).to(causal.dtype)


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


def prompt_lengths_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Real tokens before each row's first label (a row without labels is all prompt)."""
    valid = attention_mask.bool()
    answer = (labels != IGNORE_INDEX) & valid
    start = valid.int().argmax(1)
    first = torch.where(answer.any(1), answer.int().argmax(1), start + valid.sum(1))
    return first - start


def bidirectional_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, L, L]: every token sees every real token (pads see themselves, to stay finite)."""
    allowed = mask.bool()[:, None, None, :] | torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


class BituneModel(ModelWrapper):
    """A peft model with Bitune's adapters and mixer; ``forward`` trains and scores, ``generate`` decodes."""

    def __init__(self, model: peft.PeftModel, config: BituneConfig) -> None:
        super().__init__()
        self.model = model
        self.bitune_config = config
        base = model.get_base_model()
        mixed = len(config.passes) == 2
        self.mixer = KVMixer(base.config.num_hidden_layers, config.gate, config.eps, config.init) if mixed else None
        if self.mixer is not None:
            self.mixer.to(next(base.parameters()).device)
        windows = [layer.sliding_window for layer in DynamicCache(config=base.config).layers
                   if getattr(layer, "sliding_window", None)]
        self._window = min(windows, default=None)  # the smallest sliding attention window, if any
        self._generating = False
        self._handle = base.register_forward_pre_hook(self._on_generate_call, with_kwargs=True)
        self.train(model.training)

    @property
    def causal_lm(self) -> nn.Module:
        return self.model.get_base_model()

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
        if self.training and getattr(self.causal_lm, "is_activation_checkpointing", False):
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
                ) -> CausalLMOutputWithPast:
        """Logits aligned to ``input_ids`` from each row's last prompt token on (earlier positions are 0: Bitune
        reads the prompt into a cache, not into predictions) and, with ``labels``, the mean loss over answer tokens.

        The prompt ends where the labels begin, or after ``prompt_lengths`` real tokens.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_lengths is None:
            if labels is None:
                raise ValueError("Bitune needs to know where each prompt ends: pass labels (-100 on the prompt) "
                                 "or prompt_lengths")
            prompt_lengths = prompt_lengths_from_labels(labels, attention_mask)
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
        self._generating = True
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._generating = False

    def _on_generate_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache, ids = cache_in(kwargs), kwargs.get("input_ids")
        if not self._generating or cache is None or ids is None or cache.get_seq_length() > 0 or ids.shape[1] < 2:
            return None  # a prompt pass of ours, a decode step, or nothing before the last token
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.dim() != 2 or not bool(mask[:, -1].all()):
            raise ValueError("Bitune generation needs left-padded prompts with a 2-D attention mask "
                             "(tokenizer.padding_side = 'left')")
        pos = kwargs.get("position_ids")
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0) if pos is None else pos
        self._generating = False  # the prompt passes below call this model again
        try:
            self.encode_prompt(ids[:, :-1], mask[:, :-1], pos[:, :-1], into=cache)
        finally:
            self._generating = True
        kwargs = {**kwargs, "input_ids": ids[:, -1:], "position_ids": pos[:, -1:]}
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"][-1:]
        return args, kwargs

    # --- the model's interface ---------------------------------------------------------------------------------
    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        raise ValueError(_NO_CHECKPOINTING)

    def remove_hooks(self) -> None:
        self._handle.remove()


_NO_CHECKPOINTING = ("Bitune cannot use transformers' gradient checkpointing: in training it turns the KV cache "
                     "off, so the answer would silently never see the prompt. Set training.gradient_checkpointing: "
                     "false (and lower the batch size or sequence length to save memory).")

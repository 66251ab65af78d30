"""GGUF for llama.cpp and the runtimes built on it (Ollama, LM Studio): a merged model, or a LoRA as llama.cpp's
adapter file, written with the ``gguf`` package (its writer, tensor names, vocabulary readers and quantisers).

What is ours is the mapping from a Hugging Face model: the architecture's metadata, the q/k row order of the
Llama family, which tensors stay float32, and the token types. The reading side is checked by transformers' own
GGUF loader (tests) and by llama.cpp itself (``docs/export.md``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from peftlab.io import atomic_file

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A model, module or setting that cannot be written as GGUF (the message says which and why)."""


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` is written: its llama.cpp architecture, and whether q/k rows are
    reordered (llama.cpp rotates interleaved pairs for these; Hugging Face rotates halves)."""

    arch: gguf.MODEL_ARCH
    interleaved_rope: bool


ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, interleaved_rope=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, interleaved_rope=True),  # llama.cpp runs Mistral as Llama
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, interleaved_rope=False),
    "qwen3": Architecture(gguf.MODEL_ARCH.QWEN3, interleaved_rope=False),
    "phi3": Architecture(gguf.MODEL_ARCH.PHI3, interleaved_rope=False),
}
TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_TENSOR_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def architecture(config: PretrainedConfig) -> Architecture:
    """How a model of ``config`` is written; an architecture or setting GGUF export cannot carry is refused."""
    found = ARCHITECTURES.get(config.model_type)
    if found is None:
        raise ExportError(f"GGUF export does not support {config.model_type!r} models "
                          f"({', '.join(config.architectures or [])}); supported: {', '.join(sorted(ARCHITECTURES))}")
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: rope_scaling {scaling} is not written yet; only plain RoPE")
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings and getattr(config, "use_sliding_window", True):
        raise ExportError(f"GGUF export: this {config.model_type} model attends within a sliding window of {window} "
                          f"tokens, which llama.cpp's {found.arch.name.lower()} does not apply; its answers would "
                          f"differ beyond {window} tokens")
    return found


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or a LoRA B on it) reordered from rotate-half to interleaved pairs: within each
    head, rows (i, i + d/2) become neighbours (2i, 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_rows_in_llama_order(weight: torch.Tensor, layer: str, config: PretrainedConfig) -> torch.Tensor:
    """``weight`` (a q/k projection's, or a LoRA B on one) with its rows as llama.cpp wants them for ``layer``;
    any other layer's, or an architecture that rotates halves, unchanged."""
    if not architecture(config).interleaved_rope or not layer.endswith(("q_proj", "k_proj")):
        return weight
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return interleave_rope_rows(weight, config.num_attention_heads if layer.endswith("q_proj") else kv_heads)


def gguf_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's names, q/k rows in llama.cpp's order (a tied head is left out: llama.cpp
    reads the embedding for it)."""
    config, spec = model.config, architecture(model.config)
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    out = {}
    for key, weight in model.state_dict().items():
        if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for tensor {key!r} of {config.model_type}")
        out[name] = rope_rows_in_llama_order(weight.detach().float().cpu(), key.removesuffix(".weight"), config)
    return out


def write_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: str | Path, kind: str = "f16",
                name: str | None = None, pre_tokenizer: str = "default", overwrite: bool = False) -> Path:
    """``model`` (merged: plain weights) and its tokenizer, with its chat template, as one GGUF file."""
    if kind not in TYPES:
        raise ExportError(f"GGUF type {kind!r}: choose from {', '.join(TYPES)}")
    spec, config = architecture(model.config), model.config
    tensors = gguf_tensors(model)
    with atomic_file(out, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[spec.arch])
        writer.add_name(name or Path(config.name_or_path or "model").name)
        writer.add_file_type(TYPES[kind])
        rows = model.get_input_embeddings().weight.shape[0]
        _add_hyperparameters(writer, config, rows)
        _add_tokenizer(writer, tokenizer, rows, pre_tokenizer)
        for tensor_name, weight in tensors.items():
            data, dtype = _encoded(weight, kind)
            writer.add_tensor(tensor_name, data, raw_dtype=dtype)
        _finish(writer)
    return Path(out)


def write_lora(config: PretrainedConfig, lora: dict[str, torch.Tensor], alpha: float, rank: int, out: str | Path,
               rslora: bool = False, overwrite: bool = False) -> Path:
    """A LoRA (peft's keys) as llama.cpp's adapter file (``llama-cli -m BASE.gguf --lora OUT``); ``config`` is the
    base model's, for its architecture and names."""
    spec = architecture(config)
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    with atomic_file(out, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[spec.arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by alpha / rank; rsLoRA's alpha / sqrt(rank) is that with alpha·sqrt(rank)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha * math.sqrt(rank) if rslora else alpha))
        for key, a in sorted(lora.items()):
            if ".lora_A." not in key:
                continue
            layer = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = rope_rows_in_llama_order(lora[key.replace(".lora_A.", ".lora_B.")].detach().float().cpu(), layer,
                                         config)
            name = names.get_name(layer + ".weight", try_suffixes=(".weight",))
            if name is None:
                raise ExportError(f"GGUF LoRA export: no llama.cpp name for layer {layer!r}")
            writer.add_tensor(f"{name}.lora_a", a.detach().float().cpu().numpy())
            writer.add_tensor(f"{name}.lora_b", b.numpy())
        _finish(writer)
    return Path(out)


def _add_hyperparameters(writer: gguf.GGUFWriter, config, vocab_size: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, rows: int,
                   pre_tokenizer: str) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) for a model of ``rows`` embedding rows: every token by id, its type
    (special tokens are CONTROL, so llama.cpp reads ``<|im_start|>`` as one token; rows no token uses are UNUSED
    padding), the merges, the special ids and the chat template."""
    import tempfile

    by_id = {i: text for text, i in tokenizer.get_vocab().items()}
    beyond = sorted(i for i in by_id if i >= rows)
    if beyond:
        log.warning("GGUF export: tokens %s have no embedding row in this model (%d rows) and are left out",
                    [by_id[i] for i in beyond[:5]], rows)
    added = tokenizer.added_tokens_decoder
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(rows)]
    types = [gguf.TokenType.UNUSED if i not in by_id else
             gguf.TokenType.CONTROL if i in added and added[i].special else
             gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL for i in range(rows)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="peftlab-gguf-tok-") as folder:
        tokenizer.save_pretrained(folder)  # merges, special ids and the chat template, as gguf reads them
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=rows).add_to_gguf(writer, quiet=True)


def _encoded(weight: torch.Tensor, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """One tensor as the file stores it: vectors (norms, biases) stay float32, as llama.cpp keeps them."""
    if weight.dim() < 2 or kind == "f32":
        return weight.numpy(), gguf.GGMLQuantizationType.F32
    qtype = _TENSOR_TYPES[kind]
    if kind == "q8_0" and weight.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return weight.half().numpy(), gguf.GGMLQuantizationType.F16  # rows that do not split into blocks of 32
    if kind == "f16":
        return weight.half().numpy(), qtype
    return gguf.quants.quantize(weight.numpy(), qtype), qtype


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(module: str | Path | None, out: str | Path, model: str | None = None, kind: str = "f16",
                lora: bool = False, pre_tokenizer: str | None = None, other_base: bool = False,
                overwrite: bool = False, device: str | None = None) -> Path:
    """``peftlab export gguf``: ``module`` merged into its base as one GGUF model (``module`` None: the base model
    alone), or with ``lora`` the module as llama.cpp's LoRA adapter file for a GGUF of its base."""
    from peftlab.models import DEFAULT_MODEL, GGUF_PRE_TOKENIZERS, load_model
    from peftlab.module import read

    recorded = None
    if module is not None:
        recorded = read(module).manifest.base_model
        if model and recorded and model != recorded and not other_base:
            raise ExportError(f"{module} was trained on {recorded!r}, and --model names {model!r}: a module is "
                              f"exported with its own base model. If {model!r} holds the same weights, add "
                              f"--other-base")
    base = model or recorded or DEFAULT_MODEL
    if lora:
        if module is None:
            raise ExportError("--lora writes a LoRA module as llama.cpp's adapter file: name the module")
        return _export_lora(Path(module), base, out, overwrite)
    if pre_tokenizer is None:
        pre_tokenizer = GGUF_PRE_TOKENIZERS.get(base, "default")
        if pre_tokenizer == "default":
            log.warning("GGUF export: llama.cpp's pre-tokenizer for %s is unknown here; writing 'default'. "
                        "Name it with --pre-tokenizer (llama.cpp's name, e.g. llama-bpe, qwen2, smollm)", base)
    if module is None:
        merged, tokenizer = load_model(base, device=device)
    else:
        from peftlab.adapters import merged_model

        loaded = merged_model(module, base, device=device)
        merged, tokenizer = loaded.model, loaded.tokenizer
    return write_model(merged, tokenizer, out, kind, name=Path(str(module or base)).name,
                       pre_tokenizer=pre_tokenizer, overwrite=overwrite)


def _export_lora(module: Path, base: str, out: str | Path, overwrite: bool) -> Path:
    from transformers import AutoConfig

    from peftlab.methods import get_method
    from peftlab.models import resolve_model_path
    from peftlab.module import read

    found = read(module)
    (name, adapter), = found.manifest.adapters.items() if len(found.manifest.adapters) == 1 else [(None, None)]
    if adapter is None or not get_method(adapter.method).lora_adapters:
        raise ExportError(f"{module}: a {found.manifest.method} module with adapters "
                          f"{sorted(found.manifest.adapters)}; --lora writes one LoRA (a multilora module: "
                          f"peftlab multilora export first)")
    tensors = found.tensors[name]
    other = sorted(k for k in tensors if ".lora_A." not in k and ".lora_B." not in k)
    if other:
        raise ExportError(f"{module}: tensors {other[:3]} are not LoRA factors (DoRA magnitudes, trained biases, "
                          f"embedding LoRAs): llama.cpp's adapter holds B·A only. Merge instead (no --lora)")
    config = adapter.config
    return write_lora(AutoConfig.from_pretrained(resolve_model_path(base)), tensors, config["alpha"], config["r"],
                      out, rslora=bool(config.get("use_rslora")), overwrite=overwrite)

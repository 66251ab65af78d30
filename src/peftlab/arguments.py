"""Command-line arguments that many commands take, declared once: the model with its dtype and device, and NAME=DIR
lists of module folders."""

from __future__ import annotations

import argparse
import re

from peftlab.config import ConfigError
from peftlab.models import DEFAULT_MODEL, DTYPES


def add_model_arguments(parser: argparse.ArgumentParser, flag: str = "--model", model_help: str | None = None,
                        quantize: bool = False) -> None:
    """The base model (``flag``), the dtype it loads in and the device it runs on; with ``quantize``, also how its
    linear layers are quantized (only where the command passes it on)."""
    parser.add_argument(flag, default=None, help=model_help or (
        f"base model: a Hugging Face id, a local folder or '{DEFAULT_MODEL}' (default: the module's base model, "
        f"else {DEFAULT_MODEL})"))
    parser.add_argument("--dtype", default="float32", choices=[*DTYPES, "auto"],
                        help="the dtype the base model loads in (default: float32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    if quantize:
        from peftlab.quantize import QUANTIZATIONS

        parser.add_argument("--quantize", default=None, choices=[*QUANTIZATIONS, "none"],
                            help="the base's linear layers in 8 or 4 bits, through bitsandbytes (default: as the "
                                 "module's base was in training; none: full precision)")


def named_folders(items: str | list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=DIR`` pairs from repeated ``flag`` arguments, each of which may also be a comma-separated list (a comma
    splits only where a ``NAME=`` follows it, so a folder may have commas in its name)."""
    specs = [items] if isinstance(items, str) else list(items or [])
    pairs = [item.split("=", 1) for spec in specs for item in re.split(r",(?=[^,=]*=)", spec) if item]
    bad = ["=".join(pair) for pair in pairs if len(pair) != 2 or not all(pair)]
    if bad:
        raise ConfigError(f"{flag}: {bad} should look like NAME=DIR (e.g. {flag} support=runs/a,sales=runs/b)")
    names = [name for name, _ in pairs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"{flag}: {twice} named twice; each name serves one folder")
    return dict(pairs)

"""What a server serves: the base model and named adapters, each with its method, prompt format and lane.

LoRA adapters (peft LoRA folders, peftlab ``lora``/``multilora`` modules) share one lane: a MultiLoRA model over
the base, which runs a batch with a different adapter per row (``__base__`` for the base model). Its layers cover
every linear layer but the head; an adapter trained on fewer is zero on the others, which is exact. Every other
module (ReFT, Bitune, IA3, DoRA) gets a lane of its own: its method attached to a copy of the base model that
shares the base weights, so requests for it batch with each other.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from peftlab.data import PromptFormat
from peftlab.methods import get_method
from peftlab.module import Module, ModuleError, read

SHARED_LANE = "__lora__"  # the lane of the base model and every LoRA adapter


class AdapterPathError(PermissionError):
    """A load request for a path outside the adapter folder (or with no adapter folder configured)."""


@dataclass
class Served:
    """One name a request's ``model`` may give."""

    name: str
    method: str  # "base" for the base model
    lane: str
    prompt_format: PromptFormat
    folder: str | None = None
    created: int = 0
    in_flight: int = 0  # sequences admitted and not finished
    draining: bool = False  # being unloaded: new requests are refused, running ones finish

    def card(self, base: str) -> dict:
        """Its entry in ``/v1/models`` (vLLM's fields: root, parent; peftlab's: method, prompt_format)."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "peftlab",
                "root": self.folder or self.name, "parent": None if self.method == "base" else base,
                "method": self.method, "prompt_format": vars(self.prompt_format)}


def resolve_under(root: str | Path | None, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute inside it) as a real path inside ``root``; anything that leaves
    it, through ``..`` or a symbolic link, is refused."""
    if root is None:
        raise AdapterPathError("loading adapters at run time is off: start the server with --adapter-dir DIR")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / path))
    if real != real_root and real_root not in real.parents:
        raise AdapterPathError(f"adapter path {path!r} is outside the adapter folder {str(root)!r}")
    return real


def read_single(folder: str | Path) -> list[tuple[str | None, Module]]:
    """The adapters of a module folder, each as a single-adapter module: [(None, module)] for one adapter, or
    [(its name, module), ...] for a module of several (a MultiLoRA module)."""
    from peftlab.module import split

    module = read(folder)
    if len(module.manifest.adapters) == 1:
        return [(None, module)]
    if not get_method(module.manifest.method).routable:
        raise ModuleError(f"{folder}: {len(module.manifest.adapters)} adapters of a {module.manifest.method} module")
    return list(split(module).items())


def now() -> int:
    return int(time.time())

"""Shared by the benchmarks: where they run (--device, --dtype) and what they record about it, wall time of
generation and of one training step (synchronised on CUDA), medians with their spread, memory from /proc, the
trainable-parameter lines."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16", "float16")


def device_arg(value: str) -> str:
    """``--device``: ``cpu`` or a CUDA device this machine has (``cuda``, ``cuda:1``)."""
    try:
        device = torch.device(value)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: the benchmarks run on cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: torch sees no CUDA device here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return value


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default cpu) and ``--dtype`` (default float32): where the model runs, and in what; and
    ``--out``, whose default follows the device (``output_path``)."""
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the model's dtype (default: float32)")
    parser.add_argument("--out", default=None, help="result JSON (default: bench/results/NAME.json; "
                                                   "bench/results/gpu/NAME.json for a CUDA device)")


def on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def output_path(out: str | None, name: str, device: str) -> Path:
    """``--out`` if given; else bench/results/<name>.json for the CPU, bench/results/gpu/<name>.json for CUDA."""
    if out:
        return Path(out)
    return ROOT / "bench" / "results" / ("gpu" if on_cuda(device) else "") / f"{name}.json"


def device_name(device: str) -> str:
    if on_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or "unknown CPU")


def environment(device: str, dtype: str) -> dict:
    """Where and with what a benchmark ran: the device as given and its name, the dtype, torch's CPU threads, and
    the versions of python and the libraries."""
    import peftlab

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"device": device, "device_name": device_name(device), "dtype": dtype, "threads": torch.get_num_threads(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": version("transformers"), "peft": version("peft"),
                         "accelerate": version("accelerate"), "peftlab": peftlab.__version__}}


@dataclass(frozen=True)
class Base:
    """A base model as the benchmark runs it: ``load()`` gives a fresh copy in ``dtype`` on ``device``."""

    name: str | None
    device: str = "cpu"
    dtype: str = "float32"

    def load(self):
        from peftlab import load_model

        return load_model(self.name, dtype=self.dtype, device=self.device)

    def environment(self) -> dict:
        return environment(self.device, self.dtype)

    def argv(self) -> list[str]:
        """``--device``/``--dtype`` for a child process of the same benchmark."""
        return ["--device", self.device, "--dtype", self.dtype]


def to_device(batch: dict, device: str | torch.device) -> dict:
    """``batch`` with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def clock(device: str | torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done (CUDA runs asynchronously)."""
    if on_cuda(device):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn, device: str | torch.device) -> float:
    """Seconds ``fn()`` takes, its work on ``device`` included."""
    start = clock(device)
    fn()
    return clock(device) - start


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def memory_mb(field: str = "VmRSS") -> float:
    """This process's memory from /proc/self/status in MiB: ``VmRSS`` now, ``VmHWM`` its peak. (Not ru_maxrss: a
    child started by exec inherits its parent's, so it would report the parent's peak.)"""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))) / 1024


@torch.no_grad()
def generation_times(model, batch: dict, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the whole generation) with exactly ``new_tokens`` tokens."""
    device = model_device(model)
    settings = {"do_sample": False, "eos_token_id": None, "pad_token_id": batch["pad"]}
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    first = timed(lambda: model.generate(**inputs, max_new_tokens=1, **settings), device)
    whole = timed(lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         **settings), device)
    return first, whole


def train_step_time(model, batch: dict) -> float:
    """One forward + backward + AdamW step, after a warm-up step."""
    device = model_device(model)
    batch = to_device(batch, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    return timed(step, device)


def print_trainable(reports: dict) -> None:
    """One line per contender: trainable parameters and their share of the frozen base model."""
    for name, report in reports.items():
        print(f"trainable        {name:<6} {report['trainable_parameters']:>9,} "
              f"({report['trainable_percent']:.4f}% of {report['base_parameters']:,})")

"""``peftlab serve``: the OpenAI-compatible server, and a handle that runs it in a thread (tests, benchmarks)."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from peftlab.arguments import add_model_arguments, named_folders
from peftlab.config import ConfigError

if TYPE_CHECKING:  # the server's packages (the `serve` extra) are imported when a server is built
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from peftlab.serve.engine import Engine


def build_engine(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_name: str,
                 adapters: dict[str, str | Path] | None = None, max_batch: int = 64, max_queue: int = 256) -> Engine:
    """An engine over ``model`` with the module folders ``adapters`` (name -> folder) loaded. A folder of several
    adapters (a MultiLoRA module) serves each as ``name/adapter``."""
    from peftlab.serve.engine import Engine
    from peftlab.serve.registry import read_single

    engine = Engine(model, tokenizer, base_name, max_batch=max_batch, max_queue=max_queue)
    for name, folder in (adapters or {}).items():
        for sub, module in read_single(folder):
            engine.add(name if sub is None else f"{name}/{sub}", module, str(folder))
    return engine


class Server:
    """uvicorn serving ``app`` on a pre-bound loopback socket in a background thread: ``url`` is ready when
    ``start()`` returns; ``stop()`` shuts it down gracefully (in-flight requests finish)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, timeout: float = 30) -> Server:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from peftlab.models import DEFAULT_MODEL, load_model
    from peftlab.serve.app import Limits, create_app

    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise ConfigError(f"--adapter-dir {args.adapter_dir!r}: no such folder")
    adapters = named_folders(args.adapter, "--adapter")
    base = args.base or DEFAULT_MODEL
    model, tokenizer = load_model(base, dtype=args.dtype, device=args.device,
                                  quantize=None if args.quantize in (None, "none") else args.quantize)
    engine = build_engine(model, tokenizer, args.served_name or base, adapters, args.max_batch, args.max_queue)
    app = create_app(engine, api_key=args.api_key, adapter_dir=args.adapter_dir,
                     limits=Limits(max_tokens=args.max_tokens, max_model_len=args.max_model_len))
    names = ", ".join(engine.served)
    print(f"peftlab serve: {names} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve the base model and adapters of any method over an OpenAI-compatible API",
                       description="An OpenAI-compatible server (/v1/models, /v1/chat/completions, /v1/completions, "
                                   "vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, /health, /metrics). "
                                   "A request's `model` names the base model or an adapter; requests for any mix "
                                   "of LoRA adapters share one batch, other methods batch per module.")
    add_model_arguments(p, flag="--base", model_help="base model: a Hugging Face id or folder (default: the embedded "
                                                     "SmolLM2-135M-Instruct)", quantize=True)
    p.add_argument("--served-name", default=None, help="the name the base model is served under (default: --base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the module in DIR as NAME (any method; repeatable)")
    p.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="allow /v1/load_lora_adapter to load module folders from inside DIR (and nowhere else)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every route but /health")
    p.add_argument("--max-batch", type=int, default=64, help="rows decoded together per lane (default: 64)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences queued or running before new requests get 429 (default: 256)")
    p.add_argument("--max-tokens", type=int, default=1024, help="the most new tokens a request may ask for")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + new tokens (default: the model's max_position_embeddings)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    p.set_defaults(func=cmd_serve)

"""Does llama.cpp answer like peftlab? The demo's LoRA (examples/emoji-lora.yaml on the default model) exported as
GGUF and run by llama.cpp's own runtime (llama-cpp-python), greedy, against peftlab's greedy answers.

    pip install 'peftlab[llama]'          # builds llama.cpp from source (minutes; see docs/export.md)
    python examples/gguf_agreement.py     # trains the demo LoRA first if runs/emoji-lora/module is missing

Three exports: the LoRA merged into the base in f16, the same in q8_0, and the f16 base with the LoRA as llama.cpp's
adapter file applied at run time. peftlab's side is the unmerged LoRA in float32. Every prompt (the demo's 20
unseen prompts and 10 general ones, in the chat template) goes in as the same token ids on both sides; llama.cpp's
own tokenisation of the rendered text is compared too (the GGUF's tokenizer). Reported per export: prompts answered
with the same tokens throughout, the share of tokens before the first difference, and where answers part.
Writes examples/results/gguf-agreement.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERAL = ["What is 12 times 7?", "Name three primary colours.", "Translate 'good morning' into French.",
           "Write one sentence about the sea.", "What is the boiling point of water in Celsius?",
           "List the days of the week.", "Who wrote Romeo and Juliet?", "Give me a synonym for happy.",
           "How many legs does a spider have?", "Spell the word 'banana' backwards."]


def peftlab_answers(module: Path, prompts: list[list[int]], tokens: int, eos: int) -> list[list[int]]:
    import torch

    from peftlab.adapters import load_for_inference

    model = load_for_inference(str(module)).model.eval()
    answers = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(input_ids=torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=eos, eos_token_id=eos)
            answers.append(out[0, len(ids):].tolist())
    return answers


def llama_cpp_answers(model_path: Path, prompts: list[list[int]], tokens: int, eos: int,
                      lora: Path | None = None) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=1024, n_threads=2,
                verbose=False, logits_all=False)
    answers = []
    for ids in prompts:
        answer = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            answer.append(int(token))
            if token == eos or len(answer) == tokens:
                break
        answers.append(answer)
    return answers


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    prefixes, parted = [], []
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        same = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefixes.append(same / max(len(a), 1))
        if a != b:
            parted.append({"prompt": i, "at_token": same, "peftlab": a[same:same + 5], "llama_cpp": b[same:same + 5]})
    return {"identical_answers": sum(a == b for a, b in zip(ours, theirs, strict=True)), "prompts": len(ours),
            "mean_share_before_first_difference": statistics.fmean(prefixes), "parted": parted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", default=str(ROOT / "runs" / "emoji-lora" / "module"))
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per answer (default: 32)")
    parser.add_argument("--out", default=str(ROOT / "examples" / "results" / "gguf-agreement.json"))
    args = parser.parse_args()
    from importlib.metadata import version

    import llama_cpp
    import torch
    import transformers

    from peftlab import __version__
    from peftlab.adapters import load_for_inference
    from peftlab.export.gguf import export_gguf
    from peftlab.report import write_json

    module = Path(args.module)
    if not module.exists():
        subprocess.run([sys.executable, "-m", "peftlab.cli", "train", str(ROOT / "examples" / "emoji-lora.yaml")],
                       check=True, cwd=ROOT)
    loaded = load_for_inference(str(module))
    tokenizer, fmt = loaded.tokenizer, loaded.prompt_format
    texts = [line.strip() for line in (ROOT / "examples" / "data" / "emoji-heldout.txt").read_text().splitlines()
             if line.strip()] + GENERAL
    prompts = [fmt.encode_prompt(tokenizer, t) for t in texts]
    eos = tokenizer.eos_token_id
    ours = peftlab_answers(module, prompts, args.tokens, eos)
    results = {}
    with tempfile.TemporaryDirectory(prefix="peftlab-gguf-") as tmp:
        files = {"merged_f16": export_gguf(module, Path(tmp) / "merged-f16.gguf", kind="f16"),
                 "merged_q8_0": export_gguf(module, Path(tmp) / "merged-q8_0.gguf", kind="q8_0"),
                 "base_f16": export_gguf(None, Path(tmp) / "base-f16.gguf", kind="f16"),
                 "lora": export_gguf(module, Path(tmp) / "lora.gguf", lora=True)}
        from llama_cpp import Llama

        vocab_only = Llama(model_path=str(files["merged_f16"]), vocab_only=True, verbose=False)
        tokenised = [vocab_only.tokenize(fmt.render(tokenizer, t).encode(), add_bos=False, special=True)
                     for t in texts]
        results["tokenizer_same_ids"] = sum(a == b for a, b in zip(tokenised, prompts, strict=True))
        for name, path, lora in (("merged_f16", files["merged_f16"], None),
                                 ("merged_q8_0", files["merged_q8_0"], None),
                                 ("base_f16_plus_lora_adapter", files["base_f16"], files["lora"])):
            results[name] = agreement(ours, llama_cpp_answers(path, prompts, args.tokens, eos, lora))
            print(f"{name}: {results[name]['identical_answers']}/{len(prompts)} identical, "
                  f"{results[name]['mean_share_before_first_difference']:.3f} of tokens before the first difference",
                  flush=True)
    write_json(args.out, {"command": "python examples/gguf_agreement.py", "module": "runs/emoji-lora/module",
                          "tokens": args.tokens, "prompts": texts, "peftlab_side": "unmerged LoRA, float32, greedy",
                          "llama_cpp_side": "greedy (top_k 1), n_threads 2",
                          "tokenizer_same_ids_of": len(prompts), "results": results,
                          "versions": {"peftlab": __version__, "llama_cpp_python": llama_cpp.__version__,
                                       "gguf": version("gguf"),
                                       "torch": torch.__version__, "transformers": transformers.__version__}})
    print(f"tokenizer: llama.cpp gives the same ids for {results['tokenizer_same_ids']}/{len(prompts)} prompts; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()

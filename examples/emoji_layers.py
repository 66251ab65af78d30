"""Why the emoji demo intervenes at layer 22: the demo's LoReFT at the middle layer (15) and at layer 22, with the
held-out answers scored along the way.

    python examples/emoji_layers.py        # ~15 min on 2 CPU cores

Both runs use examples/emoji-loreft.yaml but for the layer, a longer schedule (80 steps) and an intervention on the
prompt only (``generation: prompt``, as the demo was when this was measured; docs/reft.md). Every 20
steps the 20 held-out prompts are answered (greedy, 48 new tokens) and scored: emoji only, stopped by itself before
the cap, more than one distinct emoji. Writes examples/results/emoji-loreft-curves.json and .png.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from peftlab import TrainConfig, generate, load_model, train
from peftlab.evals.scoring import is_emoji_only
from peftlab.report import plot, write_json

HERE = Path(__file__).parent
LAYERS, STEPS, EVERY, MAX_NEW = (15, 22), 80, 20, 48


def rates(answers: list[str], tokenizer) -> dict[str, float]:
    n = len(answers)
    capped = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) >= MAX_NEW - 3 for a in answers)
    return {"emoji_only": sum(map(is_emoji_only, answers)) / n, "stopped_by_itself": 1 - capped / n,
            "more_than_one_distinct_emoji": sum(is_emoji_only(a) and len(set(a) - {" ", "\n", "\ufe0f", "\u200d"}) > 1
                                                for a in answers) / n}


class HeldOut(TrainerCallback):
    """Answer the held-out prompts every ``EVERY`` steps and keep the scores with the latest logged loss."""

    def __init__(self, prompts: list[str], tokenizer, fmt) -> None:
        self.prompts, self.tokenizer, self.fmt, self.points = prompts, tokenizer, fmt, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % EVERY:
            return
        answers = generate(model, self.tokenizer, self.prompts, self.fmt, max_new_tokens=MAX_NEW,
                           batch_size=len(self.prompts), progress=False)
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        self.points.append({"step": state.global_step, "loss": loss, **rates(answers, self.tokenizer),
                            "answers": answers})
        print(f"step {state.global_step}: loss {loss}, {self.points[-1]['emoji_only']:.0%} emoji only")


def main() -> None:
    prompts = [p.strip() for p in (HERE / "data" / "emoji-heldout.txt").read_text().splitlines() if p.strip()]
    runs = []
    for layer in LAYERS:
        config = TrainConfig.from_yaml(HERE / "emoji-loreft.yaml", [
            f"method.layers=[{layer}]", "method.generation=prompt", f"training.max_steps={STEPS}",
            f"training.output_dir=runs/emoji-layer{layer}",
            f"output=runs/emoji-layer{layer}/module", "overwrite=true"])
        model, tokenizer = load_model(config.model)
        callback = HeldOut(prompts, tokenizer, config.data.prompt_format)
        train(config, model, tokenizer, callbacks=[callback])
        runs.append({"layer": layer, "curve": callback.points})
    result = {"command": "python examples/emoji_layers.py", "config": "examples/emoji-loreft.yaml",
              "changes": f"method.layers, method.generation=prompt, training.max_steps={STEPS}",
              "prompts": len(prompts), "runs": runs}
    write_json(HERE / "results" / "emoji-loreft-curves.json", result)
    with plot(HERE / "results" / "emoji-loreft-curves.png", "training step", "share of 20 held-out answers",
              title="Emoji LoReFT at layer 15 and 22") as ax:
        for run, colour in zip(runs, ("tab:blue", "tab:orange"), strict=True):
            steps = [p["step"] for p in run["curve"]]
            ax.plot(steps, [p["emoji_only"] for p in run["curve"]], "o-", color=colour,
                    label=f"layer {run['layer']}: emoji only")
            ax.plot(steps, [p["stopped_by_itself"] for p in run["curve"]], "s--", color=colour,
                    label=f"layer {run['layer']}: stopped by itself")
        ax.set_ylim(0, 1.05)
    for run in runs:
        print(f"layer {run['layer']}: " + ", ".join(f"step {p['step']} loss {p['loss']:.2f} emoji-only "
                                                      f"{p['emoji_only']:.0%}" for p in run["curve"]))


if __name__ == "__main__":
    main()

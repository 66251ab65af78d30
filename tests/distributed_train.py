"""Train methods one after another on the tiny model, each into ``OUT/METHOD``: run by tests/test_distributed.py
alone and under ``torchrun`` (CPU: gloo). One launch trains them all, since starting the processes is most of the
cost.

    torchrun --standalone --nproc_per_node 2 tests/distributed_train.py METHOD,METHOD MODEL_DIR OUT PER_DEVICE_BATCH

Four examples of equal length, one global batch per step: every step sees all four in either setting, so two
processes with batch 2 must train what one process with batch 4 trains. MultiLoRA trains two adapters on two
examples each (every batch holds ``batch / 2`` examples of each adapter).
"""

import sys

from peftlab import DataConfig, TrainConfig, train

METHODS = {"lora": {"name": "lora", "r": 4}, "ia3": {"name": "ia3"},
           "loreft": {"name": "loreft", "layers": [1], "rank": 4, "positions": "f1+l1", "share_weights": False},
           "bitune": {"name": "bitune", "adapter": {"name": "lora", "r": 4}},
           "multilora": {"name": "multilora", "r": 4}}
RECORDS = [{"prompt": f"say {w}", "response": f"{w} {w} {w}"} for w in ("abcd", "efgh", "ijkl", "mnop")]


def main(methods: list[str], model: str, out: str, batch: int) -> None:
    for method in methods:
        train_one(method, model, f"{out}/{method}", batch)


def train_one(method: str, model: str, out: str, batch: int) -> None:
    training = {"output_dir": out, "max_steps": 3, "learning_rate": 0.05, "per_device_train_batch_size": batch,
                "seed": 0, "logging_steps": 1, "save_strategy": "no", "use_cpu": True}
    records, data = RECORDS, DataConfig(pack=False)
    if method == "multilora":
        records = [{**r, "adapter": "xy"[i // 2]} for i, r in enumerate(RECORDS)]
        data = DataConfig(pack=False, rows_per_adapter=batch // 2)
    config = TrainConfig(model=model, method=METHODS[method], data=data, training=training, output=f"{out}/module")
    train(config, train_data=records)


if __name__ == "__main__":
    main(sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4]))

"""Multi-process training as with Trainer: two processes under torchrun (gloo, CPU) with batch 2 save the module
that one process with batch 4 saves (up to float32 rounding: only the order of float sums differs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from floats import assert_close
from peftlab.module import read

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "distributed_train.py"


def _run(args, nproc):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(HERE.parent / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("method", ["lora", "ia3", "loreft", "bitune", "multilora"])
def test_two_processes_train_what_one_process_trains(method, tiny_dir, tmp_path):
    _run([method, tiny_dir, tmp_path / "one", 4], nproc=1)
    _run([method, tiny_dir, tmp_path / "two", 2], nproc=2)
    one, two = read(tmp_path / "one" / "module"), read(tmp_path / "two" / "module")
    assert one.manifest == two.manifest
    assert one.tensors.keys() == two.tensors.keys()
    for name in one.tensors:  # every adapter (two for multilora)
        a, b = one.tensors[name], two.tensors[name]
        assert a.keys() == b.keys()
        for key in a:
            assert_close(b[key], a[key], f"{name}: {key}, two processes vs one")
    losses = [h["loss"] for h in json.loads((tmp_path / "one" / "train_log.json").read_text())["log_history"]
              if "loss" in h]
    assert losses[-1] < losses[0]  # it trained, so equal modules are not two untouched ones

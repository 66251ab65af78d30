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


METHODS = ["lora", "ia3", "loreft", "bitune", "multilora"]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """Every method trained by one process with batch 4 (``one/METHOD``) and by two with batch 2 (``two/METHOD``),
    in one launch each."""
    root = tmp_path_factory.mktemp("distributed")
    _run([",".join(METHODS), tiny_dir, root / "one", 4], nproc=1)
    _run([",".join(METHODS), tiny_dir, root / "two", 2], nproc=2)
    return root


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_what_one_process_trains(method, trained):
    one, two = read(trained / "one" / method / "module"), read(trained / "two" / method / "module")
    assert one.manifest == two.manifest
    assert one.tensors.keys() == two.tensors.keys()
    for name in one.tensors:  # every adapter (two for multilora)
        a, b = one.tensors[name], two.tensors[name]
        assert a.keys() == b.keys()
        for key in a:
            assert_close(b[key], a[key], f"{name}: {key}, two processes vs one")
    losses = [h["loss"] for h in json.loads((trained / "one" / method / "train_log.json").read_text())["log_history"]
              if "loss" in h]
    assert losses[-1] < losses[0]  # it trained, so equal modules are not two untouched ones

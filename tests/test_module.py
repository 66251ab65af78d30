"""Module folders: atomic saves, refusal of incomplete or foreign folders, info."""

import os
import subprocess
import sys

import pytest
import torch

from peftlab import attach, load, read_info, save, tiny_model
from peftlab.io import INCOMPLETE_MARKER, atomic_dir, write_text
from peftlab.methods import get_method
from peftlab.module import ModuleError


def _lora_model():
    model, _ = tiny_model()
    wrapped = attach(model, "lora", {"r": 2})
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return wrapped


def test_save_then_load_restores_the_weights(tmp_path):
    wrapped = _lora_model()
    save(wrapped, tmp_path / "m")
    restored = load(tmp_path / "m", tiny_model()[0])
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(wrapped(input_ids=ids).logits, restored(input_ids=ids).logits)  # same tensors, same forward


def test_failed_save_leaves_nothing_and_keeps_the_old_folder(tmp_path, monkeypatch):
    wrapped = _lora_model()
    target = tmp_path / "m"
    save(wrapped, target)
    old = (target / "adapter_model.safetensors").read_bytes()

    method = get_method("lora")

    def broken(folder, config, tensors, base_model):
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(method, "write_files", broken)
    with pytest.raises(OSError, match="disk full"):
        save(wrapped, target, overwrite=True)
    assert (target / "adapter_model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(OSError, match="disk full"):
        save(wrapped, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_killed_save_leaves_only_a_folder_that_load_refuses(tmp_path):
    """SIGKILL mid-save runs no cleanup: what remains is hidden, marked, and refused."""
    code = (
        "import os, signal, sys\n"
        "from peftlab.io import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'adapter_config.json').write_text('{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")])
    assert proc.returncode == -9
    assert not (tmp_path / "m").exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".m.") and (leftover / INCOMPLETE_MARKER).exists()
    with pytest.raises(ModuleError, match="interrupted save"):
        read_info(leftover)
    with pytest.raises(ModuleError, match="interrupted save"):
        load(leftover, tiny_model()[0])


def test_overwrite_replaces_only_when_asked(tmp_path):
    with atomic_dir(tmp_path / "x") as d:
        (d / "a").write_text("1")
    with pytest.raises(FileExistsError, match="overwrite"), atomic_dir(tmp_path / "x") as d:
        pass
    with atomic_dir(tmp_path / "x", overwrite=True) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert oct((tmp_path / "x").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_saved_files_get_the_usual_mode_not_private(tmp_path):
    """safetensors and mkstemp create files 0600; a saved module or report must be readable as any file is."""
    save(_lora_model(), tmp_path / "m")
    written = write_text(tmp_path / "report.json", "{}\n")
    files = [written, *(tmp_path / "m").iterdir()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~_umask()) for f in files}


def test_read_info_names_the_bad_file(tmp_path):
    with pytest.raises(ModuleError, match="no such module folder"):
        read_info(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModuleError, match="neither peftlab.json nor adapter_config.json"):
        read_info(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "peftlab.json").write_text("{not json")
    with pytest.raises(ModuleError, match=r"bad/peftlab\.json: not valid JSON"):
        read_info(tmp_path / "bad")


def test_plain_peft_folder_is_read_as_lora(tmp_path):
    wrapped = _lora_model()
    wrapped.save_pretrained(tmp_path / "peft-only")  # no peftlab.json: a folder from peft itself
    info = read_info(tmp_path / "peft-only")
    assert info.method == "lora"
    assert info.trainable_parameters == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def test_adapter_for_another_shape_names_both_shapes(tmp_path):
    save(_lora_model(), tmp_path / "m")
    wider, _ = tiny_model(hidden_size=32)
    with pytest.raises(RuntimeError, match=r"size mismatch.*torch.Size\(\[\d+, \d+\]\)"):
        load(tmp_path / "m", wider)


def test_save_refuses_a_model_without_a_method(tmp_path):
    with pytest.raises(ValueError, match="no peftlab method attached"):
        save(tiny_model()[0], tmp_path / "m")

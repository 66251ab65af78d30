"""Atomic writes: a folder or file is built as a hidden sibling and renamed into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INCOMPLETE_MARKER = ".peftlab-incomplete"


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` in one rename, on failure it is removed.

    The temporary folder carries a marker file until the very end, so a save killed mid-way (even by SIGKILL,
    when no cleanup runs) leaves only a hidden ``.NAME.*.incomplete`` folder that loaders refuse.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".incomplete", dir=target.parent))
    umask = _umask()
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the saved folder should not be
    (tmp / INCOMPLETE_MARKER).touch()
    try:
        yield tmp
        (tmp / INCOMPLETE_MARKER).unlink()
        for file in tmp.rglob("*"):  # safetensors writes its files private (0600); give them the usual mode
            if file.is_file():
                file.chmod(0o666 & ~umask)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def is_incomplete(folder: str | Path) -> bool:
    """True for a folder an interrupted save left behind."""
    folder = Path(folder)
    return (folder / INCOMPLETE_MARKER).exists() or folder.name.endswith(".incomplete")


@contextmanager
def atomic_file(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed onto ``path``, on failure removed,
    so a reader (or a crash) never leaves half a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".incomplete", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the written file should not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """``text`` into ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """One JSON object per line, written atomically."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

"""The files of an export folder, for :mod:`fusiontrain.checkpoint.export`: safetensors shards with
their index (:class:`ShardWriter`), JSON and copied side files, and the output folder itself, which
is written as ``<out>.tmp`` and renamed into place only when complete (a crash leaves no half
export under ``<out>``, and what ``<out>`` held is deleted only after the new folder is in place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fusiontrain.weights.hf_checkpoint import INDEX_FILE, SINGLE_FILE

_IN_PROGRESS = ".fusiontrain-export-in-progress"  # marks <out>.tmp as ours while it is written


class ExportError(ValueError):
    """The export cannot be made as asked (wrong format for the family, output exists, the
    checkpoint does not match its base, ...). The message says what to change."""


class ShardWriter:
    """Collects tensors into safetensors files of at most ``max_shard_bytes`` each (a larger tensor
    gets a file of its own), writing each file as soon as it is full.

    :meth:`finish` names a single file ``model.safetensors`` (no index), and several
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, as
    ``save_pretrained`` does.
    """

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.total_parameters += tensor.numel()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self._files) + 1:05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last file, give every file its final name, write the index; returns the files."""
        if self._pending or not self._files:
            self._flush()
        count = len(self._files)
        if count == 1:
            final = self.folder / SINGLE_FILE
            os.replace(self._files[0][0], final)
            return [final]
        weight_map: dict[str, str] = {}
        finals = []
        for number, (path, names) in enumerate(self._files, start=1):
            final = self.folder / f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": self.total_parameters},
            "weight_map": weight_map,
        }
        write_json(self.folder / INDEX_FILE, index)
        return finals


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON with sorted keys (stable, diffable configs)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_files(source: Path, target: Path, names: Sequence[str], folders: Sequence[str] = ()) -> list[str]:
    """Copy the files ``names`` and folders ``folders`` that ``source`` has and ``target`` lacks;
    returns the names copied."""
    copied = []
    for name in names:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    for name in folders:
        if (source / name).is_dir() and not (target / name).exists():
            shutil.copytree(source / name, target / name)
            copied.append(name)
    return copied


def tmp_out(out: Path) -> Path:
    """The folder ``out`` is written as until it is complete: ``<out>.tmp``."""
    return out.with_name(out.name + ".tmp")


def check_out(out: Path, force: bool, protected: list[Path]) -> None:
    """Refuse an ``out`` that is (or holds) one of the ``protected`` inputs, or that exists with
    content and no ``force``."""
    resolved = out.resolve()
    for path in protected:
        path = path.resolve()
        if resolved == path or path.is_relative_to(resolved):
            raise ExportError(f"--out {out} would overwrite {path}, which the export reads; choose another folder")
    if out.exists() and not out.is_dir():
        if not force:
            raise ExportError(f"--out {out} exists and is not a folder; pass --force to replace it")
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty; pass --force to overwrite it")


def start_tmp(out: Path) -> Path:
    """Create ``<out>.tmp`` (with an in-progress marker), first removing one a crashed export left."""
    tmp = tmp_out(out)
    if tmp.exists() or tmp.is_symlink():
        if not (tmp / _IN_PROGRESS).is_file():
            raise ExportError(f"{tmp} exists and is not a partial export; move it away first")
        remove(tmp)
    tmp.mkdir(parents=True)
    (tmp / _IN_PROGRESS).touch()
    return tmp


def commit(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; what ``out`` held is moved aside first and deleted
    only once ``tmp`` is in place."""
    (tmp / _IN_PROGRESS).unlink()
    aside = None
    if out.exists() or out.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        os.replace(out, aside / out.name)
    os.replace(tmp, out)
    if aside is not None:
        shutil.rmtree(aside)


def remove(path: Path) -> None:
    """Delete a file, link or folder tree at ``path`` if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

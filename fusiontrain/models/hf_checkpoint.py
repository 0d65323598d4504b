"""Reading Hugging Face checkpoint folders, and filling a model from them through a weight map.

A folder holds ``config.json`` and either ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` files with ``model.safetensors.index.json``. Only safetensors
are read: nothing is ever unpickled.

A weight map is a list of :class:`TensorRoute`: which HF tensor (or which rows of it) fills which
of our parameters. Loading walks the routes one tensor at a time and copies into parameters that
already exist (materialised from the meta device), so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorRoute:
    """``hf_key`` (rows ``rows[0]:rows[1]`` of it, or all of it) fills our parameter ``our_key``."""

    hf_key: str
    our_key: str
    rows: tuple[int, int] | None = None


class HFCheckpoint:
    """A HF model folder: its config and a lazy, sliceable view of its safetensors tensors.

    Args:
        folder: the folder.
        key_renamer: maps a stored tensor name to the canonical one (e.g. legacy layouts).
    """

    def __init__(self, folder: str | Path, key_renamer: Callable[[str], str] = lambda key: key) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.folder} does not exist")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: is {self.folder} a Hugging Face model folder?")
        self.config: dict = json.loads(config_path.read_text())
        self._file_of: dict[str, Path] = {}
        self._stored_name: dict[str, str] = {}
        for stored, file in self._stored_keys().items():
            canonical = key_renamer(stored)
            self._file_of[canonical] = file
            self._stored_name[canonical] = stored

    def _stored_keys(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, framework="pt") as handle:
                files = {name: self.folder / SINGLE_FILE for name in handle.keys()}
        else:
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.folder}; only safetensors checkpoints are read"
            )
        for file in set(files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"{file} is listed in {INDEX_FILE} but missing")
        return files

    def keys(self) -> list[str]:
        """Canonical tensor names."""
        return list(self._file_of)

    def files(self) -> list[Path]:
        """The safetensors files, sorted."""
        return sorted(set(self._file_of.values()))

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key`` (canonical name), or only its rows ``rows[0]:rows[1]``."""
        if key not in self._file_of:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.folder}")
        with safe_open(self._file_of[key], framework="pt") as handle:
            if rows is None:
                return handle.get_tensor(self._stored_name[key])
            return handle.get_slice(self._stored_name[key])[rows[0] : rows[1]]


def load_routes(
    model: nn.Module,
    checkpoint: HFCheckpoint,
    routes: Iterable[TensorRoute],
    *,
    strict: bool = True,
) -> list[str]:
    """Copy every routed tensor into ``model``'s (already materialised) parameters.

    Args:
        model: the model; parameters keep their dtype and device, values are cast into them.
        checkpoint: where the tensors come from.
        routes: the weight map.
        strict: require that every parameter is filled and every stored tensor is used.

    Returns:
        The names of the model's parameters that no route filled (empty when ``strict``).
    """
    params = dict(model.named_parameters())
    routes = list(routes)
    filled: set[str] = set()
    used: set[str] = set()
    with torch.no_grad():
        for route in routes:
            if route.our_key not in params:
                raise KeyError(f"weight map names {route.our_key!r}, which the model does not have")
            target = params[route.our_key]
            source = checkpoint.read(route.hf_key, route.rows)
            if source.shape != target.shape:
                raise ValueError(
                    f"{route.hf_key} {tuple(source.shape)} does not fit {route.our_key} {tuple(target.shape)}: "
                    "does config.json match the weights?"
                )
            target.copy_(source)
            filled.add(route.our_key)
            used.add(route.hf_key)
    unfilled = sorted(set(params) - filled)
    if strict:
        unused = sorted(set(checkpoint.keys()) - used)
        if unfilled or unused:
            raise ValueError(
                f"checkpoint {checkpoint.folder} does not match the model: "
                f"unfilled parameters {unfilled[:5]}, unused tensors {unused[:5]}"
            )
    return unfilled


def materialize(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Allocate (uninitialised) storage for a model built on the meta device."""
    return model.to_empty(device=device)

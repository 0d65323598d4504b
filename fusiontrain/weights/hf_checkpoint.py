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
from torch.distributed.tensor import DTensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors header dtype names -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorRoute:
    """``hf_key`` (rows ``rows[0]:rows[1]`` of it, or all of it) fills our parameter ``our_key``."""

    hf_key: str
    our_key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class HFLayout:
    """How a model is stored as a transformers checkpoint (what an ``hf`` export writes).

    Attributes:
        routes: from each stored tensor (current transformers naming) to our parameters.
        shapes: stored tensor name -> its shape.
        dtypes: stored tensor name -> the dtype the model's base stores it in.
        legacy_names: whether the base uses the family's older naming (see
            ``ModelFamily.hf_stored_name``), which an export in ``base`` naming keeps.
    """

    routes: list[TensorRoute]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    legacy_names: bool


class HFCheckpoint:
    """A HF model folder: its config and a lazy, sliceable view of its safetensors tensors.

    Args:
        folder: the folder.
        key_renamer: maps a stored tensor name to the canonical one (e.g. legacy layouts).
        require_config: fail when there is no ``config.json`` (not every safetensors folder has
            one, e.g. fusiontrain's own export).
    """

    def __init__(
        self, folder: str | Path, key_renamer: Callable[[str], str] = lambda key: key, *, require_config: bool = True
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.folder} does not exist")
        config_path = self.folder / "config.json"
        if require_config and not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: is {self.folder} a Hugging Face model folder?")
        self.config: dict = json.loads(config_path.read_text()) if config_path.is_file() else {}
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

    def shape(self, key: str) -> list[int]:
        """Shape of tensor ``key`` (canonical name), read from the file header only."""
        with safe_open(self._file_of[self._known(key)], framework="pt") as handle:
            return handle.get_slice(self._stored_name[key]).get_shape()

    def dtype(self, key: str) -> torch.dtype:
        """The dtype tensor ``key`` (canonical name) is stored in, read from the file header only."""
        with safe_open(self._file_of[self._known(key)], framework="pt") as handle:
            stored = handle.get_slice(self._stored_name[key]).get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r} of {self.folder} has safetensors dtype {stored}, which torch does not read")
        return SAFETENSORS_DTYPES[stored]

    def _known(self, key: str) -> str:
        if key not in self._file_of:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.folder}")
        return key

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key`` (canonical name), or only its rows ``rows[0]:rows[1]`` (0-dim tensors
        are read whole)."""
        with safe_open(self._file_of[self._known(key)], framework="pt") as handle:
            tensor_slice = handle.get_slice(self._stored_name[key])
            if rows is None or not tensor_slice.get_shape():
                return handle.get_tensor(self._stored_name[key])
            return tensor_slice[rows[0] : rows[1]]


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the full parameter that this rank holds.

    A plain tensor holds them all. A DTensor (FSDP2 shards dim 0, replicates across HSDP replica
    groups) holds the ``torch.chunk`` share of its mesh coordinates along every sharded mesh dim.
    """
    start, stop = 0, param.shape[0] if param.dim() else 1
    if not isinstance(param, DTensor):
        return start, stop
    mesh = param.device_mesh
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard(dim=0):
            raise ValueError(f"only row (dim-0) sharding is supported, got {placement}")
        rows, ranks = stop - start, mesh.size(mesh_dim)
        chunk = -(-rows // ranks)
        coordinate = mesh.get_local_rank(mesh_dim)
        start, stop = start + min(coordinate * chunk, rows), start + min((coordinate + 1) * chunk, rows)
    return start, stop


def copy_rows_into(param: torch.Tensor, read_rows: Callable[[int, int], torch.Tensor]) -> None:
    """Fill this rank's part of ``param`` with ``read_rows(start, stop)`` of the full tensor.

    Only the local rows are ever read, so a rank's peak memory is its shard plus one slice.
    """
    start, stop = local_rows(param)
    local = param.to_local() if isinstance(param, DTensor) else param
    if local.numel() == 0:
        return
    rows = read_rows(start, stop)
    if param.dim() == 0:
        rows = rows.reshape(())
    if rows.shape != local.shape:
        raise ValueError(f"rows {start}:{stop} have shape {tuple(rows.shape)}, the local shard {tuple(local.shape)}")
    local.copy_(rows)


def load_routes(
    params: dict[str, torch.Tensor],
    checkpoint: HFCheckpoint,
    routes: Iterable[TensorRoute],
    *,
    strict: bool = True,
) -> list[str]:
    """Copy every routed tensor into the (already materialised) parameters ``params``.

    Args:
        params: the model's parameters by (canonical) name; plain tensors or DTensor shards.
            They keep their dtype and device; values are cast into them.
        checkpoint: where the tensors come from.
        routes: the weight map.
        strict: require that every parameter is filled and every stored tensor is used.

    Returns:
        The names of the parameters that no route filled (empty when ``strict``).
    """
    routes = list(routes)
    filled: set[str] = set()
    used: set[str] = set()
    with torch.no_grad():
        for route in routes:
            if route.our_key not in params:
                raise KeyError(f"weight map names {route.our_key!r}, which the model does not have")
            target = params[route.our_key]
            stored_shape = checkpoint.shape(route.hf_key)
            first = route.rows[0] if route.rows else 0
            routed_shape = (route.rows[1] - route.rows[0], *stored_shape[1:]) if route.rows else stored_shape
            if tuple(routed_shape) != tuple(target.shape):
                raise ValueError(
                    f"{route.hf_key} {tuple(routed_shape)} does not fit {route.our_key} {tuple(target.shape)}: "
                    "does config.json match the weights?"
                )
            copy_rows_into(
                target, lambda start, stop, r=route: checkpoint.read(r.hf_key, (first + start, first + stop))
            )
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

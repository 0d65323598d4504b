"""Reading the DCP folders of a training checkpoint: the one reader that resuming, the
``fusion_init`` start, inference and export share.

A checkpoint (layout in :mod:`fusiontrain.checkpoint.layout`) keeps each trained model part
(``fusion/``, ``decoder/``, ``encoder/``) and the optimizer state as DCP folders, keyed by canonical
parameter names.

- :func:`save_tensors` writes a flat ``{name: tensor or DTensor}`` dict as one DCP checkpoint in
  safetensors: each rank writes ``shard-<rank+1>-model-00001-of-00001.safetensors`` holding its own
  chunks, each chunk's offset in the full tensor in the file's safetensors header. There is no
  other metadata file.
- :func:`read_part_metadata` rebuilds DCP's metadata (names, full shapes, dtypes, chunks) from the
  safetensors headers of a folder (JSON); :class:`SafetensorsReader` is DCP's
  ``HuggingFaceStorageReader`` with that metadata read once.
- :class:`CheckpointPart` is one model part, its metadata read once: which tensors it holds and
  their shapes, checked against a model's parameters (:meth:`~CheckpointPart.check_shapes`);
  :meth:`~CheckpointPart.load` fills tensors in place (plain tensors or sharded DTensors, a
  collective when a process group is up, DCP resharding as needed), and
  :meth:`~CheckpointPart.read` reads one full tensor alone (the exporter streams that way).
- :func:`load_part` loads one part of a checkpoint into tensors (a run's ``model.fusion_init``);
  :func:`load_parts_into_model` every listed part into a single-process model (inference).

A part that does not fit the model raises :class:`PartMismatch`, a
:class:`~fusiontrain.checkpoint.layout.CheckpointError`; callers with their own error type
translate it. Nothing is unpickled: the state dicts hold tensors only (so DCP's planner never
``torch.load``s a non-tensor entry), and the storage reads safetensors headers (JSON) and raw bytes.
A folder is checked for unsafe files (:func:`~fusiontrain.checkpoint.layout.refuse_unsafe_files`)
before anything of it is read.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from fusiontrain.checkpoint.layout import (
    MANIFEST,
    CheckpointError,
    part_dir,
    refuse_unsafe_files,
    verify_checkpoint,
)

SUFFIX = ".safetensors"


class PartMismatch(CheckpointError):
    """A part of a checkpoint does not fit the model it is loaded into (other names or shapes)."""


def _no_dist(single_process: bool = False) -> bool:
    return single_process or not dist.is_initialized()


class _ReportingWriter(HuggingFaceStorageWriter):
    """DCP's safetensors writer that keeps the names of the files this rank wrote itself (from its
    own write results), so that nobody has to list a shared folder to learn them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: set[str] = set()

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)  # written when it returns: a completed future
        self.written.update(result.storage_data.relative_path for result in future.wait())
        return future


def save_tensors(
    tensors: Mapping[str, torch.Tensor], folder: Path, *, process_group: dist.ProcessGroup | None = None
) -> list[str]:
    """Write ``tensors`` (a flat ``{name: tensor or DTensor}``) into ``folder`` as safetensors, each
    rank its own chunks (a collective over ``process_group``, default the default group, when a
    process group is up). Returns the names (in ``folder``) of the files this rank wrote."""
    bad = [name for name, value in tensors.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise TypeError(f"only tensors are saved as safetensors; not tensors: {_first(bad)}")
    writer = _ReportingWriter(str(folder), save_distributed=True)
    no_dist = _no_dist()
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(dict(tensors), storage_writer=writer, no_dist=no_dist, process_group=process_group)
    return sorted(writer.written)


def stage_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A host copy of ``tensors`` (DTensors stay DTensors, with their local shards copied), for a
    write that runs while training goes on changing the originals: DCP's own stager, blocking."""
    stager = DefaultStager(StagingOptions(False, False, False, False))
    try:
        return stager.stage(dict(tensors))
    finally:
        stager.close()


class SafetensorsReader(HuggingFaceStorageReader):
    """DCP's ``HuggingFaceStorageReader`` (metadata from the safetensors headers, JSON; tensor bytes
    through ``safe_open``), its metadata read once, not on every load."""

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if args or kwargs:
            raise CheckpointError(f"{self.path}: rank-local metadata is not part of a fusiontrain checkpoint")
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


def read_part_metadata(folder: Path, checkpoint: Path, reader: SafetensorsReader | None = None) -> Metadata:
    """DCP's metadata of safetensors folder ``folder`` (a folder of checkpoint ``checkpoint``),
    rebuilt from the files' safetensors headers. The folder is refused first if it holds anything
    but safetensors and JSON files.

    Raises:
        CheckpointError: naming the checkpoint and the folder: no safetensors file, an unsafe
            file, or an unreadable header.
    """
    where = folder.relative_to(checkpoint).as_posix() if folder.is_relative_to(checkpoint) else str(folder)
    refuse_unsafe_files(folder)
    if not folder.is_dir() or not any(path.suffix == SUFFIX for path in folder.iterdir()):
        raise CheckpointError(f"checkpoint {checkpoint}: {where}/ holds no DCP checkpoint (no safetensors files)")
    try:
        return (reader or SafetensorsReader(str(folder))).read_metadata()
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: unusable
        raise CheckpointError(f"checkpoint {checkpoint}: cannot read the safetensors headers of {where}/ ({error})") from None


def load_tensors(tensors: Mapping[str, torch.Tensor], folder: Path, *, single_process: bool = False) -> None:
    """Fill ``tensors`` in place from safetensors folder ``folder`` (see :func:`save_tensors`),
    resharding as needed; a collective when a process group is up, unless ``single_process``."""
    _dcp_load(dict(tensors), SafetensorsReader(str(folder)), single_process=single_process)


def _dcp_load(tensors: dict[str, torch.Tensor], reader: SafetensorsReader, *, single_process: bool) -> None:
    """``dcp.load`` in place; without a process group (or when asked) as one process, without
    DCP's warning that it assumes so (that is the intent)."""
    no_dist = _no_dist(single_process)
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(tensors, storage_reader=reader, no_dist=no_dist)


def _first(names: Sequence[str], count: int = 5) -> str:
    return f"{list(names[:count])}{' ...' if len(names) > count else ''}"


class CheckpointPart:
    """One model part (``fusion``, ``decoder`` or ``encoder``) of a checkpoint folder.

    Args:
        checkpoint: the checkpoint folder (``.../checkpoints/step_<N>``).
        part: the part's name.

    Raises:
        CheckpointError: the part's folder holds no complete DCP checkpoint.
        PartMismatch: it holds something other than tensors.
    """

    def __init__(self, checkpoint: str | Path, part: str) -> None:
        self.checkpoint = Path(checkpoint)
        self.name = part
        self.folder = part_dir(self.checkpoint, part)
        self._reader = SafetensorsReader(str(self.folder))
        metadata = read_part_metadata(self.folder, self.checkpoint, self._reader)
        self.entries: dict[str, TensorStorageMetadata] = {}
        for name, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise PartMismatch(f"checkpoint {self.checkpoint}: {part}/{name} is not a tensor")
            self.entries[name] = entry

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        """The names of the tensors the part holds."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape tensor ``name`` was saved with."""
        return tuple(self.entries[name].size)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` was saved in."""
        return self.entries[name].properties.dtype

    def check_shapes(self, shapes: Mapping[str, Sequence[int]], *, whole: bool, what: str = "the model") -> None:
        """Check the part against a model's parameter shapes: it may hold no other name, each of
        the same shape, and with ``whole`` it must hold every name of ``shapes``.

        Args:
            shapes: parameter name -> full (global) shape.
            whole: the part must hold every one of ``shapes`` (not just a subset).
            what: how the message names the model.

        Raises:
            PartMismatch: naming the first offenders.
        """
        unexpected = sorted(set(self.entries) - set(shapes))
        missing = sorted(set(shapes) - set(self.entries)) if whole else []
        if unexpected or missing:
            raise PartMismatch(
                f"checkpoint {self.checkpoint}: part {self.name!r} does not match {what}'s {self.name} parameters: "
                f"missing {_first(missing)}, unexpected {_first(unexpected)}"
            )
        for name in self.entries:
            if self.shape(name) != tuple(shapes[name]):
                raise PartMismatch(
                    f"checkpoint {self.checkpoint}: {self.name}/{name} has shape {self.shape(name)}, {what}'s "
                    f"parameter {tuple(shapes[name])}: was it trained from this base?"
                )

    def load(self, tensors: Mapping[str, torch.Tensor], *, single_process: bool = False) -> None:
        """Fill ``tensors`` (plain tensors or DTensor shards, by canonical name) in place from the
        part, values cast to their dtypes. Their names must be exactly the part's, of the same
        (global) shapes. A collective over the process group when one is up, unless
        ``single_process``: DCP reshards the saved tensors onto the current sharding.

        Raises:
            PartMismatch: the names or shapes differ.
        """
        self.check_shapes({name: tensor.shape for name, tensor in tensors.items()}, whole=True)
        _dcp_load(dict(tensors), self._reader, single_process=single_process)

    def read(self, name: str) -> torch.Tensor:
        """The full tensor ``name``, on the CPU, in the dtype it was saved in (one process; only
        its bytes are read)."""
        entry = self.entries[name]
        target = {name: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)}
        _dcp_load(target, self._reader, single_process=True)
        return target[name]


def open_parts(checkpoint: str | Path, parts: Iterable[str]) -> dict[str, CheckpointPart]:
    """The named parts of checkpoint ``checkpoint``, each opened (metadata read and checked)."""
    return {part: CheckpointPart(checkpoint, part) for part in parts}


def load_part(checkpoint: str | Path, part: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load one part of checkpoint ``checkpoint`` (e.g. another run's ``fusion`` weights) into
    ``tensors`` in place, resharding as needed (a collective when a process group is up). Its
    names must match exactly.

    Raises:
        CheckpointError: the checkpoint is incomplete or has no such part; PartMismatch when it
            does not fit ``tensors``.
    """
    manifest = verify_checkpoint(checkpoint, checksums=False)  # sizes; refuses unsafe files unread
    if part not in manifest["parts"]:
        raise CheckpointError(f"checkpoint {checkpoint} has no {part!r} part ({MANIFEST} lists {manifest['parts']})")
    CheckpointPart(checkpoint, part).load(tensors)


def load_parts_into_model(checkpoint: str | Path, parts: Iterable[str], model: nn.Module) -> None:
    """Load every part in ``parts`` of checkpoint ``checkpoint`` into the parameters of
    ``model`` (one process, not sharded), in place, values cast to the parameters' dtype. Each
    part may hold any of the model's parameters, none other, of the same shapes.

    Raises:
        CheckpointError: a part is incomplete; PartMismatch: it does not fit the model.
    """
    verify_checkpoint(checkpoint, checksums=False)  # sizes; refuses unsafe files unread
    params = dict(model.named_parameters())
    shapes = {name: param.shape for name, param in params.items()}
    for part in open_parts(checkpoint, parts).values():
        part.check_shapes(shapes, whole=False, what="the model")
        part.load({name: params[name].detach() for name in part.names()}, single_process=True)

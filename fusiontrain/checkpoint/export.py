"""Export a training checkpoint as one consolidated model folder, base and trained weights merged.

A training checkpoint (see :mod:`fusiontrain.checkpoint.layout`) holds only what trained (DCP
parts ``fusion/``, optionally ``decoder/`` and ``encoder/``) and names the pretrained folders the
rest comes from. :func:`export_checkpoint` joins the two into one folder in either format:

``hf`` (Mllama only; its default)
    What ``transformers.MllamaForConditionalGeneration.from_pretrained`` loads: ``config.json``
    (the base's, with ``dtype`` / ``torch_dtype`` set to the export dtype), ``model.safetensors``
    (or ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``),
    ``generation_config.json`` and the base's tokenizer, processor and chat-template files. Tensor
    names are the reverse of :func:`~fusiontrain.models.mllama.mllama_weight_map`, in the naming
    the base folder uses (``language_model.model.*``, which transformers 5.23's own
    ``save_pretrained`` writes and the Hub holds, or ``model.language_model.*``; transformers 5.23
    loads both).

``fusiontrain`` (any family; the default for composed models)
    Our own, self-contained layout, read back by :func:`load_fusiontrain_export`:
    ``fusiontrain_config.json`` (family, fusion settings, provenance), the base configs stored
    verbatim (``mllama_config.json``, or ``decoder_config.json`` + ``encoder_config.json``),
    ``model.safetensors`` (or shards + index) with every parameter under its canonical name, and
    the tokenizer files (from the decoder folder) and image processor files (from the encoder
    folder).

Export is a single CPU process and streams: it reads one tensor at a time (from the base with
:meth:`HFCheckpoint.read`, from a DCP part by loading just that key), casts it and appends it to
the current shard, which is written once it reaches ``max_shard_bytes``. Peak memory is about one
shard plus one tensor. Everything is written into ``<out>.tmp`` and renamed to ``<out>`` at the
end, so a crash leaves no half export under ``<out>``. Only safetensors and DCP files are read:
nothing is unpickled.

CLI: ``python -m fusiontrain export --checkpoint DIR --out OUT [--format hf|fusiontrain]
[--dtype bf16|fp32] [--max-shard-size 5GB] [--force]`` (see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.layout import CheckpointError
from fusiontrain.models.hf_checkpoint import INDEX_FILE, SINGLE_FILE, HFCheckpoint, TensorRoute, materialize
from fusiontrain.models.pretrained import PretrainedModel, WeightSource, check_routes_cover
from fusiontrain.modules import DeepFusionModel, get_fusion_params

EXPORT_CONFIG = "fusiontrain_config.json"
EXPORT_FORMAT = "fusiontrain-export"
EXPORT_VERSION = 1
FORMATS = ("hf", "fusiontrain")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

# Files copied from the base folders when they exist. Tokenizer side (with the chat templates):
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)
TOKENIZER_FOLDERS = ("additional_chat_templates",)
# Image processor side (an Mllama folder's processor_config.json embeds its image processor):
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
GENERATION_CONFIG = "generation_config.json"
_IN_PROGRESS = ".fusiontrain-export-in-progress"  # marks <out>.tmp as ours while it is written

# The stored Mllama tensor names transformers 5.23 writes (the Hub's), from the in-memory ones.
_MLLAMA_CURRENT_TO_LEGACY = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
HF_NAMINGS = ("base", "legacy", "current")

_CONFIG_FILES = {"mllama": {"mllama": "mllama_config.json"}, "composed": {"decoder": "decoder_config.json", "encoder": "encoder_config.json"}}


class ExportError(ValueError):
    """The export cannot be made as asked (wrong format for the family, output exists, the
    checkpoint does not match its base, ...). The message says what to change."""


# -- the checkpoint and its base ------------------------------------------------------------------


@dataclass
class _Base:
    """The pretrained side of a checkpoint: the model skeleton (meta device) and where each
    parameter that did not train comes from."""

    family: str
    pretrained: PretrainedModel
    folders: dict[str, Path]
    configs: dict[str, dict]  # name -> config.json dict: {"mllama": ...} or {"decoder": ..., "encoder": ...}
    fusion_interval: int | None = None
    fusion_vocab_size: int | None = None

    @property
    def model(self) -> DeepFusionModel:
        return self.pretrained.model  # type: ignore[return-value]

    def routes(self) -> dict[str, tuple[HFCheckpoint, TensorRoute]]:
        """Our parameter name -> (base checkpoint, route) for every parameter a base folder holds."""
        found: dict[str, tuple[HFCheckpoint, TensorRoute]] = {}
        for source in self.pretrained.sources:
            for route in source.routes:
                if route.our_key in found:
                    raise ExportError(f"two base tensors fill {route.our_key!r}; the weight map is ambiguous")
                found[route.our_key] = (source.checkpoint, route)
        return found


def _open_base(manifest: dict, checkpoint: Path) -> _Base:
    base = manifest["base"]
    family = base["family"]
    try:
        paths = layout.base_folders(manifest, checkpoint)
    except layout.BaseFolderMissing as error:
        raise ExportError(str(error)) from None
    if "fusiontrain_export" in paths:  # a run that started from a fusiontrain-format export
        exported = read_export_config(paths["fusiontrain_export"])
        return _Base(
            family,
            prepare_fusiontrain_export(paths["fusiontrain_export"]),
            paths,
            exported["config_dicts"],
            exported.get("fusion_interval"),
            exported.get("fusion_vocab_size"),
        )
    try:
        if family == "mllama":
            from fusiontrain.models.mllama import prepare_mllama

            pretrained = prepare_mllama(paths["hf_mllama"])
            configs = {"mllama": pretrained.sources[0].checkpoint.config}
            return _Base(family, pretrained, paths, configs)
        from fusiontrain.models.compose import prepare_composed

        interval, vocab = base["fusion_interval"], base["fusion_vocab_size"]  # checked by the manifest reader
        pretrained = prepare_composed(
            paths["decoder"], paths["encoder"], fusion_interval=interval, fusion_vocab_size=vocab
        )
        configs = {"decoder": pretrained.sources[0].checkpoint.config, "encoder": pretrained.sources[1].checkpoint.config}
        return _Base(family, pretrained, paths, configs, interval, vocab)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise ExportError(f"the base of checkpoint {checkpoint} cannot be read: {error}") from error


def _check_base_unchanged(manifest: dict, base: _Base, checkpoint: Path, *, verify_hashes: bool) -> None:
    """Refuse a base folder whose weight files differ from those the checkpoint trained on, as
    recorded in the manifest's ``fingerprint`` (``{"<role>/<file>": {"size", "sha256"}}``): file
    sizes always (free), sha256 too with ``verify_hashes`` (reads every byte)."""
    saved = manifest.get("fingerprint")
    if not isinstance(saved, dict) or not saved:
        return
    folders = {role: str(path) for role, path in base.folders.items()}
    if verify_hashes:
        from fusiontrain.checkpoint.fingerprint import differences, fingerprint

        changed = differences(saved, fingerprint(folders))
    else:
        changed = []
        for name, entry in sorted(saved.items()):
            role, _, file = name.partition("/")
            path = base.folders.get(role, Path("/nonexistent")) / file
            if not path.is_file():
                changed.append(f"{name} is gone")
            elif isinstance(entry, dict) and entry.get("size") not in (None, path.stat().st_size):
                changed.append(f"{name} changed size ({entry['size']} -> {path.stat().st_size} bytes)")
    if changed:
        raise ExportError(
            f"checkpoint {checkpoint} was trained on other base weights than {sorted(folders.values())}: "
            f"{'; '.join(changed[:3])}. Restore the original base, or pass --allow-base-mismatch"
        )


def _part_of(name: str, fusion: set[str]) -> str:
    if name in fusion:
        return "fusion"
    return "decoder" if name.startswith("decoder.") else "encoder"


def _metadata_caching_reader(folder: Path) -> Any:
    """A DCP ``FileSystemReader`` of ``folder`` that reads (unpickles) its ``.metadata`` once, not on
    every one-tensor load."""
    from torch.distributed.checkpoint import FileSystemReader

    class _Reader(FileSystemReader):
        _metadata = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if self._metadata is None:
                self._metadata = super().read_metadata(*args, **kwargs)
            return self._metadata

    return _Reader(folder)


class _TrainedParts:
    """The DCP parts of a checkpoint: which parameters they hold, and reading one at a time."""

    def __init__(self, checkpoint: Path, parts: list[str], model: nn.Module) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self._where: dict[str, tuple[Any, Any]] = {}
        params = dict(model.named_parameters())
        fusion = set(get_fusion_params(model))
        for part in parts:
            folder = layout.part_dir(checkpoint, part)
            if not (folder / layout.DCP_METADATA).is_file():
                raise CheckpointError(
                    f"checkpoint folder {checkpoint}: part {part!r} is listed in {layout.MANIFEST} but {folder} holds "
                    f"no DCP checkpoint (no {layout.DCP_METADATA})"
                )
            reader = _metadata_caching_reader(folder)
            try:
                entries = reader.read_metadata().state_dict_metadata
            except Exception as error:  # a truncated or foreign .metadata file
                raise CheckpointError(f"checkpoint folder {checkpoint}: cannot read the DCP metadata of {folder}: {error}") from error
            expected = {name for name in params if _part_of(name, fusion) == part}
            unexpected = sorted(set(entries) - expected)
            missing = sorted(expected - set(entries))
            if unexpected or missing:
                raise ExportError(
                    f"checkpoint {checkpoint}: part {part!r} does not match the base model's {part} parameters: "
                    f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                    f"{' ...' if len(unexpected) > 5 else ''}"
                )
            for name, entry in entries.items():
                if not isinstance(entry, TensorStorageMetadata):
                    raise ExportError(f"checkpoint {checkpoint}: {part}/{name} is not a tensor")
                if tuple(entry.size) != tuple(params[name].shape):
                    raise ExportError(
                        f"checkpoint {checkpoint}: {part}/{name} has shape {tuple(entry.size)}, the base model's "
                        f"parameter {tuple(params[name].shape)}: was it trained from this base?"
                    )
                self._where[name] = (reader, entry)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str) -> torch.Tensor:
        """The full tensor ``name``, in the dtype it was saved in (only its bytes are read)."""
        import torch.distributed.checkpoint as dcp

        reader, entry = self._where[name]
        target = {name: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)}
        # no_dist: a plain single-process read, also when a process group happens to be initialised
        # (DCP still warns that it assumes a single process; that is the intent).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(target, storage_reader=reader, no_dist=True)
        return target[name]


class _Parameters:
    """Every parameter of the merged model, full and one at a time: trained ones from the DCP parts,
    the others from the base folders."""

    def __init__(self, base: _Base, trained: _TrainedParts) -> None:
        self._shapes = {name: tuple(param.shape) for name, param in base.model.named_parameters()}
        self._trained = trained
        self._routes = base.routes()
        orphans = sorted(name for name in self._shapes if name not in trained and name not in self._routes)
        if orphans:
            raise ExportError(
                f"parameters {orphans[:5]}{' ...' if len(orphans) > 5 else ''} are in no base folder and in no part of "
                "the checkpoint (a composed model's fusion parameters exist only in its 'fusion' part)"
            )

    def names(self) -> list[str]:
        return list(self._shapes)

    def read(self, name: str) -> torch.Tensor:
        if name in self._trained:
            tensor = self._trained.read(name)
        else:
            checkpoint, route = self._routes[name]
            tensor = checkpoint.read(route.hf_key, route.rows)
        shape = self._shapes[name]
        if tuple(tensor.shape) != shape:
            if tensor.numel() != torch.Size(shape).numel():
                raise ExportError(f"{name}: read shape {tuple(tensor.shape)}, the model's {shape}")
            tensor = tensor.reshape(shape)
        return tensor


# -- writing ----------------------------------------------------------------------------------------


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
        _write_json(self.folder / INDEX_FILE, index)
        return finals


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_files(source: Path, target: Path, names: Sequence[str], folders: Sequence[str] = ()) -> list[str]:
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


def _to_legacy_mllama_name(name: str) -> str:
    for current, legacy in _MLLAMA_CURRENT_TO_LEGACY:
        if name.startswith(current):
            return legacy + name[len(current) :]
    return name


def _base_uses_legacy_names(folder: Path) -> bool:
    return any(key.startswith("language_model.") for key in HFCheckpoint(folder).keys())


def _hf_tensors(base: _Base, params: _Parameters) -> Iterator[tuple[str, torch.Tensor]]:
    """``(current HF name, full tensor)`` of every tensor of the Mllama base, in weight-map order,
    each assembled from the parameters its routes fill (``embed_tokens`` from two row ranges)."""
    source = base.pretrained.sources[0]
    by_key: dict[str, list[TensorRoute]] = {}
    for route in source.routes:
        by_key.setdefault(route.hf_key, []).append(route)
    for hf_key, routes in by_key.items():
        shape = tuple(source.checkpoint.shape(hf_key))
        if len(routes) == 1 and routes[0].rows is None:
            yield hf_key, params.read(routes[0].our_key).reshape(shape)
            continue
        if any(route.rows is None for route in routes):
            raise ExportError(f"{hf_key} is routed both whole and by rows")
        routes = sorted(routes, key=lambda route: route.rows[0])  # type: ignore[index]
        stops = [0] + [route.rows[1] for route in routes]  # type: ignore[index]
        if [route.rows[0] for route in routes] != stops[:-1] or stops[-1] != shape[0]:  # type: ignore[index]
            raise ExportError(f"the routes of {hf_key} do not tile its {shape[0]} rows: {[r.rows for r in routes]}")
        yield hf_key, torch.cat([params.read(route.our_key) for route in routes], dim=0)


def _generation_config_from(config: dict) -> dict:
    text = config.get("text_config", {})
    generation = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key, text.get(key))
        if value is not None:
            generation[key] = value
    return generation


def _write_hf(base: _Base, params: _Parameters, folder: Path, dtype: torch.dtype, max_shard_bytes: int, naming: str) -> None:
    hf_folder = _text_folder(base)
    config = dict(base.configs["mllama"])
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    config["torch_dtype"] = dtype_name  # what transformers 4.x and other readers look at
    _write_json(folder / "config.json", config)
    if not _copy_files(hf_folder, folder, [GENERATION_CONFIG]):
        _write_json(folder / GENERATION_CONFIG, _generation_config_from(config))
    _copy_files(hf_folder, folder, TOKENIZER_FILES + PROCESSOR_FILES, TOKENIZER_FOLDERS)

    legacy = _base_uses_legacy_names(hf_folder) if naming == "base" else naming == "legacy"
    writer = ShardWriter(folder, max_shard_bytes)
    for name, tensor in _hf_tensors(base, params):
        writer.add(_to_legacy_mllama_name(name) if legacy else name, tensor.to(dtype))
    writer.finish()


def _write_fusiontrain(
    base: _Base, params: _Parameters, folder: Path, dtype: torch.dtype, max_shard_bytes: int, provenance: dict
) -> None:
    files = _CONFIG_FILES[base.family]
    export_config: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "family": base.family,
        "dtype": str(dtype).removeprefix("torch."),
        "configs": files,
        "source": provenance,
    }
    if base.family == "composed":
        export_config["fusion_interval"] = base.fusion_interval
        export_config["fusion_vocab_size"] = base.fusion_vocab_size
    _write_json(folder / EXPORT_CONFIG, export_config)
    for name, file in files.items():
        _write_json(folder / file, base.configs[name])
    _copy_files(_text_folder(base), folder, TOKENIZER_FILES + (GENERATION_CONFIG,), TOKENIZER_FOLDERS)
    _copy_files(_image_folder(base), folder, PROCESSOR_FILES)

    writer = ShardWriter(folder, max_shard_bytes)
    for name in params.names():
        writer.add(name, params.read(name).to(dtype))
    writer.finish()


def _text_folder(base: _Base) -> Path:
    """Where the base's tokenizer and chat template live."""
    folders = base.folders
    return folders.get("hf_mllama") or folders.get("decoder") or folders["fusiontrain_export"]


def _image_folder(base: _Base) -> Path:
    """Where the base's image processor lives."""
    folders = base.folders
    return folders.get("hf_mllama") or folders.get("encoder") or folders["fusiontrain_export"]


# -- the output folder ----------------------------------------------------------------------------


def _tmp_out(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def _check_out(out: Path, force: bool, protected: list[Path]) -> None:
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


def _start_tmp(out: Path) -> Path:
    """Create ``<out>.tmp`` (with an in-progress marker), first removing one a crashed export left."""
    tmp = _tmp_out(out)
    if tmp.exists() or tmp.is_symlink():
        if not (tmp / _IN_PROGRESS).is_file():
            raise ExportError(f"{tmp} exists and is not a partial export; move it away first")
        _remove(tmp)
    tmp.mkdir(parents=True)
    (tmp / _IN_PROGRESS).touch()
    return tmp


def _commit(tmp: Path, out: Path) -> None:
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- API --------------------------------------------------------------------------------------------


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    dtype: str = "bf16",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    hf_naming: str = "base",
    verify_base: bool = False,
    allow_base_mismatch: bool = False,
) -> Path:
    """Write one consolidated model folder from training checkpoint ``checkpoint``.

    Args:
        checkpoint: a checkpoint folder (``<output_dir>/checkpoints/step_<N>``).
        out: the folder to write; it must not exist or be empty unless ``force``.
        format: ``"hf"`` (Mllama only) or ``"fusiontrain"``; default ``"hf"`` for an Mllama base,
            ``"fusiontrain"`` for a composed one.
        dtype: ``"bf16"`` or ``"fp32"``: every tensor is cast to it.
        max_shard_bytes: the most bytes of tensors per safetensors file (a larger tensor gets a file
            of its own).
        force: replace an existing, non-empty ``out``.
        hf_naming: tensor names of the ``hf`` format: ``"base"`` (as the base folder names them),
            ``"legacy"`` (``language_model.model.*``, what transformers 5.23 ``save_pretrained``
            writes) or ``"current"`` (``model.language_model.*``).
        verify_base: check the base files' sha256 against the checkpoint's fingerprint (reads the
            whole base); by default only their sizes are compared.
        allow_base_mismatch: export even when the base files differ from the fingerprint.

    Returns:
        ``out``.

    Raises:
        CheckpointError: the checkpoint folder is missing, incomplete or corrupt.
        ExportError: the output exists, the format does not fit the family, or the checkpoint does
            not match its base.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    manifest = layout.read_manifest(checkpoint)
    family = manifest["base"]["family"]
    format = format or ("hf" if family == "mllama" else "fusiontrain")
    if format not in FORMATS:
        raise ExportError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if format == "hf" and family != "mllama":
        raise ExportError(
            f"the hf format needs an Mllama base; checkpoint {checkpoint} is a {family} model, which no transformers "
            "class loads: use --format fusiontrain"
        )
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if hf_naming not in HF_NAMINGS:
        raise ExportError(f"hf_naming must be one of {list(HF_NAMINGS)}, got {hf_naming!r}")
    if max_shard_bytes < 1:
        raise ExportError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    base = _open_base(manifest, checkpoint)
    if not allow_base_mismatch:
        _check_base_unchanged(manifest, base, checkpoint, verify_hashes=verify_base)
    trained = _TrainedParts(checkpoint, manifest["parts"], base.model)
    params = _Parameters(base, trained)
    _check_out(out, force, [checkpoint, *base.folders.values()])

    tmp = _start_tmp(out)
    try:
        if format == "hf":
            _write_hf(base, params, tmp, DTYPES[dtype], max_shard_bytes, hf_naming)
        else:
            provenance = {
                "checkpoint": str(checkpoint.resolve()),
                "step": manifest["step"],
                "parts": manifest["parts"],
                "base": manifest["base"],
            }
            _write_fusiontrain(base, params, tmp, DTYPES[dtype], max_shard_bytes, provenance)
    except BaseException:
        _remove(tmp)
        raise
    _commit(tmp, out)
    return out


# -- reading a fusiontrain export -------------------------------------------------------------------


def read_export_config(path: str | Path) -> dict:
    """The ``fusiontrain_config.json`` of an export, checked, with the base configs it names
    loaded under ``"config_dicts"``."""
    folder = Path(path)
    config_path = folder / EXPORT_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {EXPORT_CONFIG}: not a fusiontrain export")
    config = json.loads(config_path.read_text())
    if config.get("format") != EXPORT_FORMAT or not isinstance(config.get("version"), int):
        raise ValueError(f"{config_path} is not a {EXPORT_FORMAT} config")
    if config["version"] > EXPORT_VERSION:
        raise ValueError(f"{config_path} has version {config['version']}, newer than {EXPORT_VERSION}")
    family = config.get("family")
    if family not in _CONFIG_FILES:
        raise ValueError(f"{config_path}: unknown family {family!r}")
    config["config_dicts"] = {
        name: json.loads((folder / file).read_text()) for name, file in config["configs"].items()
    }
    return config


def _safetensors_folder(folder: str | Path) -> HFCheckpoint:
    return HFCheckpoint(folder, require_config=False)


def prepare_fusiontrain_export(
    path: str | Path,
    *,
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> PretrainedModel:
    """The model of a ``fusiontrain``-format export, built on the meta device from the configs the
    export stores (the base folders are not needed), with the export's safetensors as its only
    weight source: :meth:`PretrainedModel.load` fills every parameter (also sharded)."""
    folder = Path(path)
    config = read_export_config(folder)
    configs = config["config_dicts"]
    flags = dict(decoder_trainable=decoder_trainable, encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable)
    with torch.device("meta"):
        if config["family"] == "mllama":
            from fusiontrain.models.mllama import build_mllama, mllama_args_from_config

            model = build_mllama(mllama_args_from_config(configs["mllama"]), **flags)
        else:
            from fusiontrain.models.compose import build_composed_model

            model = build_composed_model(
                configs["decoder"],
                configs["encoder"],
                fusion_interval=config["fusion_interval"],
                fusion_vocab_size=config["fusion_vocab_size"],
                **flags,
            )
    source = WeightSource(_safetensors_folder(folder), [TensorRoute(name, name) for name, _ in model.named_parameters()])
    check_routes_cover(source, set(source.checkpoint.keys()), "fusiontrain export")
    return PretrainedModel(model, [source], init_buffers=_init_buffers)


def load_fusiontrain_export(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    decoder_trainable: bool = False,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
) -> DeepFusionModel:
    """Rebuild the :class:`DeepFusionModel` of a ``fusiontrain``-format export and fill every
    parameter from its safetensors (see :func:`prepare_fusiontrain_export`).

    Args:
        path: the export folder.
        dtype: parameter dtype (values are cast from the export's dtype).
        device: where the parameters live.
        decoder_trainable, encoder_trainable, fusion_trainable: what trains (see DeepFusionModel).
    """
    pretrained = prepare_fusiontrain_export(
        path, decoder_trainable=decoder_trainable, encoder_trainable=encoder_trainable, fusion_trainable=fusion_trainable
    )
    materialize(pretrained.model.to(dtype), device)
    pretrained.load()
    return pretrained.model


def _init_buffers(model: nn.Module) -> None:
    init = getattr(model.encoder, "init_buffers", None)
    if init is not None:
        init()
    known = {name for name, _ in model.encoder.named_buffers(prefix="encoder")} if init is not None else set()
    unknown = [name for name, _ in model.named_buffers() if name not in known]
    if unknown:
        raise RuntimeError(f"load_fusiontrain_export does not know how to initialise buffers {unknown[:5]}")


# -- CLI --------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"`` (10**9 per GB, as transformers' ``max_shard_size``), ``"5GiB"``
    (2**30), ``"300KB"``, ``"1048576"``."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        if not match or (match.group(3) and match.group(3).upper() not in ("B", "IB")) or (
            match.group(3).upper() == "IB" and not match.group(2)
        ):
            raise ValueError(f"cannot read size {text!r}; write it like 5GB, 500MB, 2GiB or a number of bytes")
        number, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3).upper()
        power = "KMGT".index(unit) + 1 if unit else 0
        value = int(number * ((1024 if suffix == "IB" else 1000) ** power))
    if value < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` command's options to ``parser`` (for wiring into ``fusiontrain.cli``)."""
    parser.add_argument("--checkpoint", required=True, help="training checkpoint folder (.../checkpoints/step_N)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --force)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="hf: what transformers' MllamaForConditionalGeneration loads (Mllama only; its default); "
        "fusiontrain: our own layout, read by load_fusiontrain_export (the default for composed models)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="dtype of the exported tensors")
    parser.add_argument(
        "--max-shard-size", default="5GiB", help="most bytes per safetensors file, e.g. 5GB, 2GiB, 500MB (default 5GiB)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")
    parser.add_argument(
        "--verify-base",
        action="store_true",
        help="check the base files' sha256 against the checkpoint's fingerprint (default: sizes only)",
    )
    parser.add_argument(
        "--allow-base-mismatch", action="store_true", help="export even if the base files changed since training"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``export`` for parsed arguments; 0 on success, 2 with a one-line error."""
    try:
        max_shard_bytes = parse_size(args.max_shard_size)
    except ValueError as error:
        print(f"error: --max-shard-size: {error}", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            format=args.format,
            dtype=args.dtype,
            max_shard_bytes=max_shard_bytes,
            force=args.force,
            verify_base=args.verify_base,
            allow_base_mismatch=args.allow_base_mismatch,
        )
    except (CheckpointError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fusiontrain export --checkpoint DIR --out OUT [--format hf|fusiontrain]
    [--dtype bf16|fp32] [--max-shard-size 5GB] [--force]``."""
    parser = add_arguments(
        argparse.ArgumentParser(
            prog="python -m fusiontrain export",
            description="Export a training checkpoint as one consolidated model folder (base and trained weights).",
        )
    )
    return run(parser.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())

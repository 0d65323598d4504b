"""Where training checkpoints live on disk and how to tell a complete one, shared by the side that
saves them, the side that resumes from them and the exporter.

::

    <output_dir>/checkpoints/step_<N>/     written as .tmp-step_<N>/, renamed once complete
        manifest.json    {"format": "fusiontrain-checkpoint", "version": 1, "step": N,
                          "parts": [...], "base": {...}, ...}
        fusion/          DCP checkpoint {canonical parameter name: tensor} of every fusion parameter
        decoder/         optional DCP checkpoints of the non-fusion decoder / encoder parameters
        encoder/
        train_state/     optimizer, data loader, ... (not described here)

``base`` says which pretrained folders the parameters that no part holds come from::

    {"family": "mllama", "folders": {"hf_mllama": "/abs/path"}}
    {"family": "composed", "folders": {"decoder": "/abs/path", "encoder": "/abs/path"},
     "fusion_interval": 4, "fusion_vocab_size": 8}

Only the standard library is imported at module level, so listing checkpoints stays cheap; checking a
manifest asks the family registry (:mod:`fusiontrain.families`) about its ``base``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

FORMAT = "fusiontrain-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"  # sub-folder of the run's output_dir
PARTS = ("encoder", "decoder", "fusion")
DCP_METADATA = ".metadata"  # the file DCP writes last, once every rank has written its data
TMP_PREFIX = ".tmp-"

_STEP_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or not a fusiontrain checkpoint. The message
    names the folder."""


class BaseFolderMissing(CheckpointError):
    """A base folder a checkpoint was trained on is gone (its frozen weights live only there)."""


def base_folders(manifest: dict[str, Any], checkpoint: str | Path) -> dict[str, Path]:
    """The base folders of a (validated) manifest, by role (``hf_mllama``, ``decoder`` +
    ``encoder``, or ``fusiontrain_export``), each checked to exist.

    Raises:
        BaseFolderMissing: naming the folder, its role and the manifest that records it.
    """
    folders = manifest["base"]["folders"]
    paths = {role: Path(folders[role]) for role in _base_roles(manifest["base"])}
    for role, path in paths.items():
        if not path.is_dir():
            raise BaseFolderMissing(
                f"base folder {path} ({role}), recorded in {Path(checkpoint) / MANIFEST}, does not exist: the "
                "checkpoint holds only what trained, the rest comes from there"
            )
    return paths


def checkpoints_root(output_dir: str | Path) -> Path:
    """``<output_dir>/checkpoints``."""
    return Path(output_dir) / CHECKPOINTS


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """``<output_dir>/checkpoints/step_<step>``: the folder of a complete checkpoint."""
    return checkpoints_root(output_dir) / f"step_{_check_step(step)}"


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    """``<output_dir>/checkpoints/.tmp-step_<step>``: where a checkpoint is written before it is
    renamed to :func:`checkpoint_dir` (a crash leaves only a folder that no reader lists)."""
    return checkpoints_root(output_dir) / f"{TMP_PREFIX}step_{_check_step(step)}"


def part_dir(path: str | Path, part: str) -> Path:
    """The DCP folder of ``part`` (one of :data:`PARTS`) in checkpoint folder ``path``."""
    if part not in PARTS:
        raise ValueError(f"unknown checkpoint part {part!r}; expected one of {list(PARTS)}")
    return Path(path) / part


def step_of(path: str | Path) -> int | None:
    """The step of a folder named ``step_<N>``, else None (temporary folders included)."""
    match = _STEP_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def new_manifest(step: int, parts: list[str] | tuple[str, ...], base: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A manifest dict with the format fields filled in, validated like :func:`read_manifest`.

    Args:
        step: the optimizer step the checkpoint was taken after.
        parts: the DCP parts the checkpoint holds (a subset of :data:`PARTS`).
        base: the base description (see the module docstring).
        extra: more fields (``fingerprint``, ...), stored as they are.
    """
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "parts": list(parts), "base": base, **extra}
    _validate(manifest, Path("<new manifest>"))
    return manifest


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` into checkpoint folder ``path`` atomically (temporary file, then
    ``os.replace``); returns the file. Validates it first."""
    folder = Path(path)
    _validate(manifest, folder)
    target = folder / MANIFEST
    partial = folder / f"{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(partial, target)
    return target


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint folder ``path``.

    Raises:
        CheckpointError: the folder or its manifest is missing, unreadable, not JSON, or not a
            fusiontrain checkpoint manifest of a version this code reads. The message names the folder.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is not a folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        hint = " (an unfinished checkpoint: its save did not complete)" if folder.name.startswith(TMP_PREFIX) else ""
        raise CheckpointError(f"checkpoint folder {folder} has no {MANIFEST}: not a fusiontrain checkpoint{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint folder {folder}: cannot read {MANIFEST}: {error}") from error
    _validate(manifest, folder)
    return manifest


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a finished checkpoint: a ``step_<N>`` folder (not a temporary one) with a
    valid manifest and, for every part it lists, a DCP folder whose metadata was written."""
    folder = Path(path)
    if step_of(folder) is None:
        return False
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        return False
    return all((part_dir(folder, part) / DCP_METADATA).is_file() for part in manifest["parts"])


def list_complete(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``<output_dir>/checkpoints``, by step."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [(step_of(entry), entry) for entry in root.iterdir() if entry.is_dir() and step_of(entry) is not None]
    return sorted((step, entry) for step, entry in found if is_complete(entry))


def latest_complete(output_dir: str | Path) -> tuple[int, Path] | None:
    """``(step, folder)`` of the complete checkpoint with the highest step, or None."""
    complete = list_complete(output_dir)
    return complete[-1] if complete else None


# -- validation --------------------------------------------------------------------------------------


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"a checkpoint step must be a non-negative int, got {step!r}")
    return step


def _validate(manifest: Any, folder: Path) -> None:
    where = f"checkpoint folder {folder}: {MANIFEST}"
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{where} has no integer 'version'")
    if version > VERSION:
        raise CheckpointError(f"{where} has version {version}, newer than {VERSION}: upgrade fusiontrain to read it")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{where} has no non-negative integer 'step' (got {step!r})")
    parts = manifest.get("parts")
    if not isinstance(parts, list) or not parts or any(part not in PARTS for part in parts):
        raise CheckpointError(f"{where} 'parts' must be a non-empty list drawn from {list(PARTS)}, got {parts!r}")
    if len(set(parts)) != len(parts):
        raise CheckpointError(f"{where} lists a part twice: {parts!r}")
    from fusiontrain.families import MODEL_FAMILIES  # the family seam; imported late to keep listing cheap

    base = manifest.get("base")
    if not isinstance(base, dict) or base.get("family") not in MODEL_FAMILIES:
        raise CheckpointError(
            f"{where} 'base' must be an object with 'family' one of {sorted(MODEL_FAMILIES)}, got {base!r}"
        )
    folders = base.get("folders")
    if not isinstance(folders, dict) or not all(isinstance(value, str) for value in folders.values()):
        raise CheckpointError(f"{where} 'base.folders' must map names to folder paths, got {folders!r}")
    missing = [role for role in _base_roles(base) if role not in folders]
    if missing:
        raise CheckpointError(f"{where} base.folders lacks {missing}")
    try:
        MODEL_FAMILIES[base["family"]].check_settings(base)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None


def _base_roles(base: dict[str, Any]) -> tuple[str, ...]:
    """The folders a base description must name: a fusiontrain export, or the HF folders."""
    from fusiontrain.families import EXPORT_ROLE, MODEL_FAMILIES

    if EXPORT_ROLE in base["folders"]:
        return (EXPORT_ROLE,)
    return MODEL_FAMILIES[base["family"]].roles

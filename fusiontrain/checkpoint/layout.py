"""Where training checkpoints live on disk, how to tell a complete and intact one, and which files
a checkpoint may hold, shared by the side that saves them, the side that resumes from them, the
exporter, inference and ``python -m fusiontrain verify``.

::

    <output_dir>/checkpoints/step_<N>/     written as .tmp-step_<N>/, fsynced, renamed once complete
        manifest.json    {"format": "fusiontrain-checkpoint", "version": 2, "step": N,
                          "parts": [...], "base": {...}, "files": {...}, ...}
        fusion/          safetensors shards (one per rank) of {canonical parameter name: tensor}
        decoder/         optional: the same for the non-fusion decoder / encoder parameters
        encoder/
        lora/            with LoRA: the LoRA matrices (``...lora_A.weight``, ``...lora_B.weight``); the
                         manifest's ``lora`` records rank, alpha, dropout and the adapted linears
        train_state/     optimizer/ (safetensors shards + optimizer.json), rank_<r>.json

``base`` says which pretrained folders the parameters that no part holds come from::

    {"family": "mllama", "folders": {"hf_mllama": "/abs/path"}}
    {"family": "composed", "folders": {"decoder": "/abs/path", "encoder": "/abs/path"},
     "fusion_interval": 4, "fusion_vocab_size": 8}

``files`` records every other file of the folder, ``{"fusion/shard-...safetensors": {"size": bytes,
"sha256": hex}}``: :func:`check_files` compares the folder with it (sizes alone are free; checksums
read every byte).

Trust model: a checkpoint folder may hold only JSON files and safetensors files
(:func:`refuse_unsafe_files`). Anything else, in particular the pickled ``.metadata`` of DCP's
default format (the layout of version 1) or a ``.pt`` / ``.bin`` / ``.distcp`` file, makes the whole
folder refused before any file of it is read. Nothing is ever unpickled.

Only the standard library is imported at module level, so listing checkpoints stays cheap; checking a
manifest asks the family registry (:mod:`fusiontrain.families`) about its ``base``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

FORMAT = "fusiontrain-checkpoint"
VERSION = 2  # 2: safetensors + JSON only, with a file list; 1 (refused): DCP's pickled .metadata
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"  # sub-folder of the run's output_dir
PARTS = ("encoder", "decoder", "fusion", "lora")
TMP_PREFIX = ".tmp-"
SAFE_SUFFIXES = (".json", ".safetensors")  # the only files a checkpoint may hold
CHUNK = 8 * 2**20

_STEP_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, or not a fusiontrain checkpoint. The message
    names the folder."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint folder holds a file that is not JSON or safetensors (a pickle, such as DCP's
    ``.metadata``): it is refused unread."""


class BaseFolderMissing(CheckpointError):
    """A base folder a checkpoint was trained on is gone (its frozen weights live only there)."""


def base_folders(manifest: dict[str, Any], checkpoint: str | Path) -> dict[str, Path]:
    """The base folders of a (validated) manifest, by role (``hf_mllama``, ``decoder`` +
    ``encoder``, or ``fusiontrain_export``), each checked to exist.

    Raises:
        BaseFolderMissing: naming the folder, its role and the manifest that records it.
    """
    from fusiontrain.source.model_source import ModelSource  # imported late to keep listing cheap

    folders = manifest["base"]["folders"]
    paths = {role: Path(folders[role]) for role in ModelSource.recorded_roles(manifest["base"])}
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
    _validate(manifest, Path("<new manifest>"), require_files=False)
    return manifest


def write_manifest(path: str | Path, manifest: dict[str, Any], files: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``manifest`` into checkpoint folder ``path`` atomically (temporary file, fsync, then
    ``os.replace``); returns the file. Its ``files`` entry is ``files`` when given (see
    :func:`file_records`), else every file now in the folder, measured and checksummed here.
    Validates it first."""
    folder = Path(path)
    refuse_unsafe_files(folder)
    manifest = {**manifest, "files": file_records(folder) if files is None else files}
    _validate(manifest, folder)
    target = folder / MANIFEST
    partial = folder / f"{MANIFEST}.partial"
    with partial.open("w") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    fsync_dir(folder)
    return target


# -- files: safety, sizes and checksums -------------------------------------------------------------


def checksum(path: str | Path) -> str:
    """The sha256 digest (hex) of a file, read in 8 MiB blocks (with SHA-NI, faster than blake2b on current x86 CPUs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def data_files(folder: str | Path) -> list[str]:
    """Every file under checkpoint folder ``folder`` but the manifest (and its partial), as
    sorted POSIX paths relative to it."""
    root = Path(folder)
    found = []
    for path in root.rglob("*"):
        if path.is_file() or path.is_symlink():
            name = path.relative_to(root).as_posix()
            if name not in (MANIFEST, f"{MANIFEST}.partial"):
                found.append(name)
    return sorted(found)


def file_records(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of ``names`` (default: every data file)."""
    root = Path(folder)
    return {
        name: {"size": (root / name).stat().st_size, "sha256": checksum(root / name)}
        for name in (data_files(root) if names is None else names)
    }


def refuse_unsafe_files(folder: str | Path) -> None:
    """Refuse checkpoint folder ``folder`` if it holds any file other than JSON and safetensors,
    before anything of it is read (nothing is ever unpickled).

    Raises:
        UnsafeCheckpoint: naming the folder and the file; DCP's pickled ``.metadata`` is named as
            the older checkpoint layout.
    """
    root = Path(folder)
    if not root.is_dir():
        return
    for name in data_files(root):
        path = root / name
        if path.is_symlink():
            raise UnsafeCheckpoint(f"checkpoint {root}: {name} is a symbolic link; a checkpoint holds plain files only")
        if Path(name).name == ".metadata":
            raise UnsafeCheckpoint(
                f"checkpoint {root}: {name} is a pickle (DCP's metadata, the checkpoint layout of fusiontrain before "
                "version 2); fusiontrain never unpickles checkpoint files, since unpickling runs code. Refused unread: "
                "retrain, or convert it yourself only if you trust its origin"
            )
        if not name.endswith(SAFE_SUFFIXES):
            raise UnsafeCheckpoint(
                f"checkpoint {root}: {name} is neither JSON nor safetensors (the only formats a checkpoint may hold; "
                "fusiontrain never unpickles checkpoint files). Refused unread"
            )


def checksums_of(paths: Sequence[Path], workers: int = 1) -> list[str]:
    """:func:`checksum` of each of ``paths``, on ``workers`` processes (one reads a file at a time:
    sha256 runs at about 1.3 GB/s on one core here, below what fast local or parallel storage gives)."""
    if workers <= 1 or len(paths) <= 1:
        return [checksum(path) for path in paths]
    context = multiprocessing.get_context("fork")  # the children only hash: no torch, no threads
    with ProcessPoolExecutor(max_workers=min(workers, len(paths)), mp_context=context) as pool:
        return list(pool.map(checksum, paths))


def check_files(folder: str | Path, manifest: dict[str, Any], *, checksums: bool, workers: int = 1) -> list[str]:
    """What is wrong with the files of checkpoint ``folder`` against its manifest's ``files``,
    human-readable (empty when intact): missing, unexpected or resized files, and with
    ``checksums`` files whose contents changed (reads every byte, on ``workers`` processes)."""
    root = Path(folder)
    recorded: dict[str, dict[str, Any]] = manifest["files"]
    problems = []
    present = set(data_files(root))
    for name in sorted(present - set(recorded)):
        problems.append(f"{name} is not in {MANIFEST}")
    sized = []
    for name, entry in sorted(recorded.items()):
        if name not in present:
            problems.append(f"{name} is missing")
            continue
        size = (root / name).stat().st_size
        if size != entry["size"]:
            problems.append(f"{name} is {size} bytes, {MANIFEST} says {entry['size']} (truncated or overwritten)")
        else:
            sized.append(name)
    if checksums:
        for name, digest in zip(sized, checksums_of([root / name for name in sized], workers)):
            if digest != recorded[name]["sha256"]:
                problems.append(f"{name} has other contents than when it was saved (sha256 differs)")
    return problems


def verify_checkpoint(folder: str | Path, *, checksums: bool = True, workers: int = 1) -> dict[str, Any]:
    """The manifest of checkpoint ``folder`` once it is checked safe (JSON and safetensors only),
    complete and intact (sizes, and with ``checksums`` contents, read on ``workers`` processes).

    Raises:
        CheckpointError: naming the folder and the first problems.
    """
    manifest = read_manifest(folder)
    problems = check_files(folder, manifest, checksums=checksums, workers=workers)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems[:3])}{more}")
    return manifest


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder (its entries: new, renamed or removed files)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder under ``folder`` (itself included)."""
    root = Path(folder)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [*sorted(p for p in root.rglob("*") if p.is_dir()), root]:
        fsync_dir(path)


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
    refuse_unsafe_files(folder)  # before anything else of it is read
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
    valid manifest, only safe files, each of the size the manifest records, and data for every
    part it lists. Checksums are not read (see :func:`verify_checkpoint`)."""
    folder = Path(path)
    if step_of(folder) is None:
        return False
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        return False
    return not check_files(folder, manifest, checksums=False) and all(
        any(name.startswith(f"{part}/") for name in manifest["files"]) for part in manifest["parts"]
    )


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


def list_step_folders(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step_<N>`` folder under ``<output_dir>/checkpoints``, complete
    or not, by step."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((step_of(entry), entry) for entry in root.iterdir() if entry.is_dir() and step_of(entry) is not None)


def newest_intact(
    output_dir: str | Path, *, report: Callable[[str], None] | None = None
) -> tuple[int, Path] | None:
    """``(step, folder)`` of the newest checkpoint that :func:`verify_checkpoint` finds intact
    (checksums included), or None. Newer ``step_<N>`` folders that are not are skipped, each
    reported through ``report`` with the reason."""
    for step, folder in reversed(list_step_folders(output_dir)):
        try:
            verify_checkpoint(folder, checksums=True)
        except CheckpointError as error:
            if report is not None:
                report(f"skipping checkpoint {folder}: {error}")
            continue
        return step, folder
    return None


# -- validation --------------------------------------------------------------------------------------


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"a checkpoint step must be a non-negative int, got {step!r}")
    return step


def _validate(manifest: Any, folder: Path, *, require_files: bool = True) -> None:
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
    if version < VERSION:
        raise UnsafeCheckpoint(
            f"{where} has version {version}: a checkpoint layout from before version {VERSION}, whose DCP metadata is "
            "a pickle. fusiontrain never unpickles checkpoint files (unpickling runs code), so it is refused unread"
        )
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{where} has no non-negative integer 'step' (got {step!r})")
    parts = manifest.get("parts")
    if not isinstance(parts, list) or not parts or any(part not in PARTS for part in parts):
        raise CheckpointError(f"{where} 'parts' must be a non-empty list drawn from {list(PARTS)}, got {parts!r}")
    if len(set(parts)) != len(parts):
        raise CheckpointError(f"{where} lists a part twice: {parts!r}")
    files = manifest.get("files")
    if files is not None and not (
        isinstance(files, dict)
        and all(
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()
        )
    ):
        raise CheckpointError(f"{where} 'files' must map file names to {{'size', 'sha256'}}")
    if files is None and require_files:
        raise CheckpointError(f"{where} has no 'files' list")
    from fusiontrain.families import MODEL_FAMILIES  # the family seam; imported late to keep listing cheap
    from fusiontrain.source.model_source import ModelSource

    base = manifest.get("base")
    if not isinstance(base, dict) or base.get("family") not in MODEL_FAMILIES:
        raise CheckpointError(
            f"{where} 'base' must be an object with 'family' one of {sorted(MODEL_FAMILIES)}, got {base!r}"
        )
    folders = base.get("folders")
    if not isinstance(folders, dict) or not all(isinstance(value, str) for value in folders.values()):
        raise CheckpointError(f"{where} 'base.folders' must map names to folder paths, got {folders!r}")
    missing = [role for role in ModelSource.recorded_roles(base) if role not in folders]
    if missing:
        raise CheckpointError(f"{where} base.folders lacks {missing}")
    try:
        MODEL_FAMILIES[base["family"]].check_settings(base)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None

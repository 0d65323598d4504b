"""Fingerprints of the pretrained base: which files, of what size and content, a run built on.

A fusion-only checkpoint holds the trained parameters only; the frozen base comes back from its
HF folders on resume. The fingerprint (a sha256 per safetensors file and per config.json) proves
that those folders still hold the same weights. Hashing is shared out over the ranks, and results
are cached per (path, size, mtime), so a restart does not hash a 180 GB base again.

Resuming compares two fingerprints (:func:`differences`); the readers of a finished checkpoint
(export, inference) compare its recorded fingerprint with the base folders as they are
(:func:`check_base_unchanged`: sizes for free, sha256 on request).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist

CHUNK = 16 * 2**20


def _files(folders: dict[str, str]) -> list[tuple[str, Path]]:
    """``(role/name, path)`` of every file that defines the base's weights."""
    found = []
    for role, folder in sorted(folders.items()):
        for path in sorted(Path(folder).iterdir()):
            if path.suffix == ".safetensors" or path.name == "config.json":
                found.append((f"{role}/{path.name}", path))
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(folders: dict[str, str], cache_file: Path | None = None) -> dict[str, dict[str, object]]:
    """``{role/file: {"size": bytes, "sha256": hex}}`` of the base folders (a collective when a
    process group is up: every rank hashes its share of the files, all ranks get the result)."""
    files = _files(folders)
    cache = _read_cache(cache_file)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {}
    for index, (name, path) in enumerate(files):
        if index % world != rank:
            continue
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = cache.get(key) or _sha256(path)
        cache[key] = digest
        mine[name] = {"size": stat.st_size, "sha256": digest, "_cache_key": key}
    if world > 1:
        gathered: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        merged = {name: entry for part in gathered for name, entry in part.items()}
    else:
        merged = mine
    if cache_file is not None and rank == 0:
        cache.update({entry["_cache_key"]: entry["sha256"] for entry in merged.values()})
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(".partial")
        partial.write_text(json.dumps(cache))
        os.replace(partial, cache_file)  # other ranks may be reading it: never show a half file
    return {name: {"size": e["size"], "sha256": e["sha256"]} for name, e in sorted(merged.items())}


def _read_cache(cache_file: Path | None) -> dict[str, str]:
    """The hash cache, or an empty one when it is absent or unreadable (it is only a cache)."""
    if cache_file is None or not cache_file.is_file():
        return {}
    try:
        return json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}


def differences(saved: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    lines = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            lines.append(f"{name} is gone")
        elif name not in saved:
            lines.append(f"{name} is new")
        elif saved[name] != current[name]:
            lines.append(f"{name} changed (sha256 {saved[name]['sha256'][:12]} -> {current[name]['sha256'][:12]})")
    return lines


def base_changes(saved: dict[str, dict], folders: dict[str, Path], *, verify_hashes: bool = False) -> list[str]:
    """What differs between the base files a checkpoint recorded (its manifest's ``fingerprint``)
    and the base folders as they are now, human-readable (empty when nothing did).

    Without ``verify_hashes`` only existence and sizes are compared (free: no file is read);
    with it, every file's sha256 too (reads the whole base, and reports new files as well).

    Args:
        saved: the recorded fingerprint, ``{"<role>/<file>": {"size": bytes, "sha256": hex}}``.
        folders: the base folders now, by role.
        verify_hashes: compare contents, not only sizes.
    """
    if verify_hashes:
        return differences(saved, fingerprint({role: str(path) for role, path in folders.items()}))
    changed = []
    for name, entry in sorted(saved.items()):
        role, _, file = name.partition("/")
        path = Path(folders[role]) / file if role in folders else None
        if path is None or not path.is_file():
            changed.append(f"{name} is gone")
        elif isinstance(entry, dict) and entry.get("size") not in (None, path.stat().st_size):
            changed.append(f"{name} changed size ({entry['size']} -> {path.stat().st_size} bytes)")
    return changed


def check_base_unchanged(
    manifest: dict,
    folders: dict[str, Path],
    checkpoint: Path,
    *,
    verify_hashes: bool = False,
    error: type[Exception] = ValueError,
) -> None:
    """Refuse base folders whose weight files differ from those checkpoint ``checkpoint`` was
    trained on, as its manifest's ``fingerprint`` records them (see :func:`base_changes`). A
    manifest without a fingerprint passes.

    Args:
        manifest: the checkpoint's manifest.
        folders: its base folders, by role.
        checkpoint: the checkpoint folder (for the message).
        verify_hashes: compare sha256 too, not only sizes.
        error: the exception class raised, so each caller keeps its own error type.

    Raises:
        error: naming the checkpoint, the folders and the first changes, and the way out
            (``--allow-base-mismatch``).
    """
    saved = manifest.get("fingerprint")
    if not isinstance(saved, dict) or not saved:
        return
    changed = base_changes(saved, folders, verify_hashes=verify_hashes)
    if changed:
        raise error(
            f"checkpoint {checkpoint} was trained on other base weights than {sorted(str(p) for p in folders.values())}: "
            f"{'; '.join(changed[:3])}. Restore the original base, or pass --allow-base-mismatch"
        )

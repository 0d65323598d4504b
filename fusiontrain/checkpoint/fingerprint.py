"""Fingerprints of the pretrained base: which files, of what size and content, a run built on.

A fusion-only checkpoint holds the trained parameters only; the frozen base comes back from its
HF folders on resume. The fingerprint (a sha256 per safetensors file and per config.json) proves
that those folders still hold the same weights. Hashing is shared out over the ranks, and results
are cached per (path, size, mtime), so a restart does not hash a 180 GB base again.
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

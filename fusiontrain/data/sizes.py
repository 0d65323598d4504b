"""Per-sample sizes: what the row planner needs to know of a sample without building it.

For every sample ``i`` of a dataset the table holds its text tokens, its image count, its encoder
tokens (what its images occupy in a row's cross-attention columns) and, for a sample that cannot
be used, why (a :data:`~fusiontrain.data.errors.REASONS` key: a malformed line, too long, ...).
Datasets measure one sample with ``dataset.size(i)`` (tokenizing it; decoding its images only
when the encoder's token count varies from image to image, see ``ImageFormat.tokens_vary``).

A table is computed once and cached, keyed by a fingerprint of everything the sizes depend on
(the data files, the tokenizer and image-processor files, the sample format, ``batch.seq_len``,
the image format), so a changed input gives another key and is measured anew. A cache is two
files, ``sizes-<key>.npy`` (int64 ``[n, 4]``: tokens, images, encoder tokens, skip code, then two
columns per other modality of a model with an encoder per modality (:func:`columns`); read with
``allow_pickle=False``) and ``sizes-<key>.json`` (the fingerprint's parts, the reason names of the
skip codes). Nothing is unpickled.

Columns: ``skip`` is 0 for a usable sample, else ``1 + SKIP_REASONS.index(reason)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusiontrain.data.errors import REASONS, BadSample

logger = logging.getLogger("fusiontrain.data")

# Bumped whenever what a size means changes, or the skip codes do (they are positions in the sorted
# REASONS: a reason added shifts them): every older cache is then ignored.
# 2: the audio reasons (missing_audio, corrupt_audio, empty_audio, bad_sample_rate),
#    item_count_mismatch and too_many_items; other modalities' columns after the four.
SIZES_VERSION = 2
SKIP_REASONS = tuple(sorted(REASONS))
COLUMNS = ("tokens", "images", "encoder_tokens", "skip")


def columns(others: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The table's columns: :data:`COLUMNS`, then each other modality's ``<m>_items`` and
    ``<m>_encoder_tokens`` (a model with an encoder per modality)."""
    return COLUMNS + tuple(f"{m}_{part}" for m in others for part in ("items", "encoder_tokens"))
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")

# Measures one sample: (text tokens, images, encoder tokens, then each other modality's items and
# encoder tokens); raises BadSample.
SizeFn = Callable[[int], tuple[int, ...]]


@dataclass
class SampleSizes:
    """The size table of a dataset.

    Attributes:
        table: int64 ``[n, 4 + 2 k]``, columns :func:`columns` of ``others``.
        others: the other modalities (beyond images) whose items the table counts, in order.
    """

    table: torch.Tensor
    others: tuple[str, ...] = ()

    def other_sizes(self, row: list[int]) -> list[tuple[int, int]]:
        """``(items, encoder tokens)`` per other modality of one table row (as a list)."""
        return [(row[4 + 2 * k], row[5 + 2 * k]) for k in range(len(self.others))]

    def __len__(self) -> int:
        return int(self.table.shape[0])

    def reason(self, index: int) -> str | None:
        """Why sample ``index`` is unusable, or None."""
        code = int(self.table[index, 3])
        return SKIP_REASONS[code - 1] if code else None

    def skip_counts(self) -> dict[str, int]:
        """Unusable samples of the whole table, by reason."""
        codes = Counter(self.table[:, 3].tolist())
        return {SKIP_REASONS[code - 1]: n for code, n in sorted(codes.items()) if code}


def measure(
    size_of: SizeFn, num_samples: int, indices: Iterable[int], *, strict: bool = False, others: tuple[str, ...] = ()
) -> torch.Tensor:
    """Sizes of the samples ``indices`` as an int64 ``[num_samples, 4 + 2 k]`` table (``k``
    other modalities), zero elsewhere (so that the tables of disjoint index sets add up to the
    whole one).

    A sample that raises :class:`BadSample` gets its reason's code (and a logged warning), or the
    error propagates with ``strict``.
    """
    table = torch.zeros(num_samples, len(columns(others)), dtype=torch.long)
    for index in indices:
        try:
            sizes = size_of(index)
            if len(sizes) != 3 + 2 * len(others):
                raise ValueError(f"a size of {len(sizes)} values for {len(others)} other modalities (3 + 2 each)")
            table[index, :3] = torch.tensor(sizes[:3])
            table[index, 4:] = torch.tensor(sizes[3:], dtype=torch.long)
        except BadSample as error:
            if strict:
                raise
            logger.warning("skipping a sample (%s): %s", error.reason, error)
            table[index, 3] = 1 + SKIP_REASONS.index(error.reason)
    return table


# -- the fingerprint ----------------------------------------------------------------------------


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of ``parts`` (JSON-able: what the sizes depend on), with :data:`SIZES_VERSION`."""
    text = json.dumps({"version": SIZES_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def folder_digest(folder: str | Path | None) -> str | None:
    """sha256 of the files of a model folder that tokenization and image processing read
    (tokenizer, chat template, processor and model configs); weight files are left out."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    for file in sorted(Path(folder).iterdir()):
        if file.is_file() and not file.name.endswith(_WEIGHT_SUFFIXES) and not file.name.startswith("."):
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def files_identity(path: str | Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime in ns) of a local data file, or of every file under a data
    folder: a changed, added or removed file changes it."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    return [(str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


# -- the cache ------------------------------------------------------------------------------------


def cache_dirs(data_path: str | None, output_dir: str | Path) -> list[Path]:
    """Where a size cache may be, in the order looked at: ``.fusiontrain_sizes/`` beside a local
    data file or folder, then ``<output_dir>/sizes/`` (hub data, synthetic data, or a read-only
    data folder)."""
    dirs = []
    if data_path is not None and Path(data_path).exists():
        dirs.append(Path(data_path).resolve().parent / ".fusiontrain_sizes")
    dirs.append(Path(output_dir) / "sizes")
    return dirs


def _files(folder: Path, key: str) -> tuple[Path, Path]:
    return folder / f"sizes-{key[:24]}.npy", folder / f"sizes-{key[:24]}.json"


def load_cached(dirs: list[Path], key: str, num_samples: int, others: tuple[str, ...] = ()) -> tuple[SampleSizes, Path] | None:
    """The cached table of fingerprint ``key`` in the first of ``dirs`` holding one, and its file;
    None when none does. A cache whose fingerprint, shape or reason names do not match is ignored
    (logged)."""
    for folder in dirs:
        table_file, info_file = _files(folder, key)
        if not (table_file.is_file() and info_file.is_file()):
            continue
        info = json.loads(info_file.read_text())
        table = torch.from_numpy(np.load(table_file, allow_pickle=False))
        good = (
            info.get("fingerprint") == key
            and tuple(info.get("reasons", ())) == SKIP_REASONS
            and table.dtype == torch.long
            and tuple(table.shape) == (num_samples, len(columns(others)))
        )
        if good:
            return SampleSizes(table, others), table_file
        logger.warning("ignoring the size cache %s: it does not match this data (fingerprint, shape or reasons)", table_file)
    return None


def save_cache(sizes: SampleSizes, dirs: list[Path], key: str, parts: dict[str, Any]) -> Path:
    """Write the table to the first writable of ``dirs`` (atomically: a temporary file, then a
    rename); returns the table's file.

    Raises:
        OSError: no folder of ``dirs`` is writable.
    """
    errors = []
    for folder in dirs:
        table_file, info_file = _files(folder, key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for target, write in (
                (table_file, lambda f: np.save(f, sizes.table.numpy(), allow_pickle=False)),
                (info_file, lambda f: f.write(json.dumps(_info(sizes, key, parts), indent=1, default=str).encode())),
            ):
                partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                with partial.open("wb") as handle:
                    write(handle)
                os.replace(partial, target)
            return table_file
        except OSError as error:
            errors.append(f"{folder}: {error}")
    raise OSError(f"cannot write the size cache anywhere: {'; '.join(errors)}")


def _info(sizes: SampleSizes, key: str, parts: dict[str, Any]) -> dict[str, Any]:
    return {
        "fingerprint": key,
        "version": SIZES_VERSION,
        "columns": list(columns(sizes.others)),
        "reasons": list(SKIP_REASONS),
        "num_samples": len(sizes),
        "skipped": sizes.skip_counts(),
        "parts": parts,
    }

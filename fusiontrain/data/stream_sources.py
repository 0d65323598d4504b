"""Reading records as a stream, through Hugging Face ``datasets`` streaming: local webdataset
``.tar`` shards, or a hub (or local file) dataset opened with ``load_dataset(..., streaming=True)``.

:func:`open_stream` gives a :class:`StreamSource`: a ``datasets.IterableDataset`` of raw examples
(split into shards, which is what ranks and dataloader workers divide) plus :meth:`StreamSource.record`,
which turns one example into a :class:`~fusiontrain.data.sources.Record` for
:class:`~fusiontrain.data.formats.SampleBuilder`. Nothing is decoded while reading: a bad example
becomes a Record that carries its :class:`~fusiontrain.data.errors.BadSample`, and the stream skips
and counts it like any other bad sample.

Webdataset shards (``data.train.path`` a ``.tar`` file or glob, e.g. ``/data/shards/*.tar``) are
read by our own tar reader (:func:`read_tar_shards`) wrapped in ``IterableDataset.from_generator``,
not by the packaged ``webdataset`` builder: that builder decodes ``.json`` members inside its
generator, so one malformed member ends the whole stream (and cannot be skipped on resume, since
the generator fails again at the same place); it also infers one schema from the first five
examples and silently drops fields the later examples add, and it would ``torch.load`` ``.pth``
members. Ours groups members by key (``000.jpg`` + ``000.json`` -> sample ``000``) and keeps every
member's bytes; :meth:`StreamSource.record` then builds the record:

- the ``.json`` member's object is the record (``{"text": ...}`` for ``data.format=caption``,
  ``{"messages": [...]}`` for ``chat``); a ``.txt`` member is the caption ``text`` when there is
  no ``.json`` member;
- the image members (``jpg``, ``png``, ``webp``, ...; several per sample as ``000.0.jpg``,
  ``000.1.jpg``) become ``images`` in member-name order, and ``image`` when there is exactly one;
  the audio members (``wav``, ``flac``, ``ogg``, ``mp3``, ...) likewise become ``audios`` and
  ``audio`` (clips for a model with an audio encoder; records of other models ignore them); a
  ``.json`` that has its own ``image`` / ``images`` key as well as image members (or ``audio`` /
  ``audios`` as well as audio members) is a ``bad_record``;
- the record's origin is ``<shard path>:<key>``.

Any other path goes to ``datasets.load_dataset(path, split=split, streaming=True)`` (a hub name,
or a local ``.jsonl`` / ``.json`` / ``.parquet`` file or glob, read with the ``text`` / ``json`` /
``parquet`` builders; JSON Lines through ``text`` so that a malformed line is one bad record;
relative image and audio paths are relative to the folder of the path or glob). Their ``Image``
and ``Audio`` columns are read undecoded (:mod:`fusiontrain.data.hf_features`): the stream decodes
each image and clip itself (an ``Audio`` column's bytes, or its file when the bytes are None), so a
bad one is a counted skip. There an example ``datasets`` itself cannot read ends the stream with
datasets' error.
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from fusiontrain.data.errors import BadSample
from fusiontrain.data.hf_features import without_decoding
from fusiontrain.data.sources import Record, _parse_json_line

StreamReader = Literal["tar", "jsonl", "json", "parquet", "hub"]

# Image member extensions (lower case) of a webdataset sample.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"})
# Audio member extensions (lower case): what libsndfile reads (fusiontrain.data.audio).
AUDIO_EXTENSIONS = frozenset({"wav", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff"})
# Per media kind, its member extensions; a sample's members of a kind become its record's
# ``<kind>s`` list (and ``<kind>`` when there is one), as records spell images and clips.
MEDIA_MEMBERS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS}
_FILE_BUILDERS = {".jsonl": ("jsonl", "text"), ".json": ("json", "json"), ".parquet": ("parquet", "parquet")}


def is_tar_shards(path: str) -> bool:
    """Whether ``path`` names webdataset shards (a ``.tar`` file or glob)."""
    return str(path).lower().endswith(".tar")


def expand_shards(pattern: str) -> list[str]:
    """The files ``pattern`` (a path or glob) matches, sorted; raises ValueError when none."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(f"data.train.path={pattern} matches no file; point it at the data's files (a glob like /data/*.tar)")
    return files


@dataclass
class StreamSource:
    """A streamed data source.

    Attributes:
        dataset: the ``datasets.IterableDataset`` of raw examples (not split, not shuffled).
        name: the configured path or hub name.
        reader: which reader turns its examples into records.
        num_shards: how many shards it has (what ranks and workers divide).
        base_dir: the folder relative image and audio paths are relative to (local files: the
            folder of the path or glob); None for tar shards and hub datasets.
    """

    dataset: Any
    name: str
    reader: StreamReader
    num_shards: int
    base_dir: Path | None = None

    def record(self, example: dict[str, Any], where: str) -> Record:
        """The :class:`Record` of one raw ``example``; ``where`` locates it for messages when the
        example does not (non-tar sources: the pass, rank, worker and index in the stream)."""
        if self.reader == "tar":
            return tar_record(example)
        origin = f"{self.name} ({where})"
        if self.reader == "jsonl":
            data, error = _parse_json_line(example["text"])
            error = None if error is None else error.at(origin)
            return Record(data=data, origin=origin, base_dir=self.base_dir, error=error)
        return Record(data=example, origin=origin, base_dir=self.base_dir)

    def split(self, rank: int, world: int, strategy: str, *, seed: int) -> Any:
        """Rank ``rank``'s part of the stream (``split_dataset_by_node``, ``strategy`` "shards" or
        "examples"); ``seed`` is a mixture's (unused here)."""
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(self.dataset, rank=rank, world_size=world, strategy=strategy)


#: The column a mixture's interleaved examples carry their source's index in.
SOURCE_COLUMN = "fusiontrain_source"


def _tag(source: int, example: dict[str, Any]) -> dict[str, Any]:
    return {SOURCE_COLUMN: source}


@dataclass
class MixedStreamSource:
    """Several streamed sources interleaved record by record (``datasets.interleave_datasets``):
    each record comes from source ``k`` with probability ``weights[k] / sum(weights)`` (without
    weights, the sources take turns), until every source has run out once in the pass
    (``stopping_strategy="all_exhausted"``: the smaller sources come round again meanwhile). Each
    source is split over the ranks first, so every rank interleaves its own part of every source.

    Attributes:
        sources: the sources, in order (a record's ``source`` is its index here).
        names: their names (for messages and the resume identity).
        weights: their weights, or None.
    """

    sources: list[StreamSource]
    names: tuple[str, ...]
    weights: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        weights = "" if self.weights is None else f" at weights {list(self.weights)}"
        return f"the mixture of {', '.join(self.names)}{weights}"

    @property
    def num_shards(self) -> int:
        """What the ranks and workers divide: the fewest shards of a source."""
        return min(source.num_shards for source in self.sources)

    def split(self, rank: int, world: int, strategy: str, *, seed: int) -> Any:
        """Rank ``rank``'s interleaving of its part of every source, the draw seeded by ``seed``.
        The sources' columns may differ: ``datasets`` aligns them (a column another source has
        comes as None), so the sources' columns must not clash in type."""
        import datasets

        parts = [
            source.split(rank, world, strategy, seed=seed).map(partial(_tag, index))
            for index, source in enumerate(self.sources)
        ]
        probabilities = None if self.weights is None else [w / sum(self.weights) for w in self.weights]
        try:
            return datasets.interleave_datasets(
                parts, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted"
            )
        except ValueError as error:
            raise ValueError(
                f"cannot interleave the streamed sources {list(self.names)}: {error}. Sources whose columns share a "
                "name must give them the same type; stream them from files of one layout, or mix them map-style"
            ) from error

    def record(self, example: dict[str, Any], where: str) -> Record:
        """The record of an interleaved example, read by its own source, with its ``source`` set;
        the columns only other sources have (None here) are dropped."""
        index = int(example[SOURCE_COLUMN])
        own = {key: value for key, value in example.items() if key != SOURCE_COLUMN and value is not None}
        return replace(self.sources[index].record(own, f"{self.names[index]}, {where}"), source=index)


def open_stream(
    path: str, *, split: str = "train", subset: str | None = None, image_root: str | Path | None = None
) -> StreamSource:
    """The stream of records at ``path`` (see the module docstring).

    Args:
        path: ``.tar`` shards (a file or glob), a local ``.jsonl`` / ``.json`` / ``.parquet`` file
            or glob, or a hub dataset name.
        split: the split of a hub dataset (local files have only ``"train"``).
        subset: a hub dataset's configuration.
        image_root: the folder relative image paths are relative to, instead of the files' folder.
    """
    import datasets

    root = None if image_root is None else Path(image_root)
    hub = not is_tar_shards(path) and Path(path).suffix.lower() not in _FILE_BUILDERS and not Path(path).is_dir()
    if subset is not None and not hub:
        raise ValueError(f"subset={subset!r} names a hub dataset's configuration, but {path} is local data; drop it")

    if is_tar_shards(path):
        shards = expand_shards(path)
        dataset = datasets.IterableDataset.from_generator(read_tar_shards, gen_kwargs={"shards": shards})
        return StreamSource(dataset, str(path), "tar", len(shards), base_dir=root)
    suffix = Path(path).suffix.lower()
    if Path(path).is_dir():
        raise ValueError(
            f"data.train.path={path} is a folder: streaming reads .tar shards, .jsonl/.json/.parquet files or globs, "
            "or a hub dataset; read an imagefolder with data.streaming=false"
        )
    if suffix in _FILE_BUILDERS:
        reader, builder = _FILE_BUILDERS[suffix]
        files = expand_shards(path)
        dataset = without_decoding(datasets.load_dataset(builder, data_files=files, split="train", streaming=True))
        return StreamSource(dataset, str(path), reader, dataset.num_shards, base_dir=root or Path(path).parent)
    dataset = without_decoding(datasets.load_dataset(str(path), subset, split=split, streaming=True))
    name = str(path) if subset is None else f"{path}/{subset}"
    return StreamSource(dataset, name, "hub", dataset.num_shards, base_dir=root)


# -- webdataset shards ------------------------------------------------------------------------------


def read_tar_shards(shards: list[str]) -> Iterator[dict[str, Any]]:
    """The webdataset samples of ``shards``, in order: per sample, ``{"shard": path, "key": key,
    "members": {extension: bytes}}`` (members grouped by the key before the first dot of their
    file name) and ``"error"`` (empty, or what is wrong: a member extension given twice). A shard
    that cannot be read further (not a tar, truncated) yields, for the sample being read, one
    example with ``"error"`` set and no members, and ends there; its earlier samples stand."""
    for shard in shards:
        sample: dict[str, Any] | None = None
        try:
            with tarfile.open(shard, mode="r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, dot, extension = name.partition(".")
                    if not dot or not stem:
                        continue  # not a sample member (no extension), as in the webdataset format
                    key = f"{folder}/{stem}" if folder else stem
                    if sample is not None and sample["key"] != key:
                        yield sample
                        sample = None
                    if sample is None:
                        sample = {"shard": shard, "key": key, "members": {}, "error": ""}
                    if extension in sample["members"]:
                        sample["error"] = f"two members with the extension {extension!r}"
                    sample["members"][extension] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as error:
            # The sample being read may miss members: it is reported bad with the error, not used.
            key = "" if sample is None else sample["key"]
            yield {"shard": shard, "key": key, "members": {}, "error": f"cannot read the tar shard further: {error}"}
            continue
        if sample is not None:
            yield sample


def tar_record(example: dict[str, Any]) -> Record:
    """The record of one webdataset sample (see the module docstring); bad samples carry their
    BadSample (``malformed_json``, ``bad_record``)."""
    origin = f"{example['shard']}:{example['key']}"
    members: dict[str, bytes] = example["members"]

    def bad(reason: str, detail: str) -> Record:
        return Record(data=None, origin=origin, base_dir=None, error=BadSample(reason, detail, origin=origin))

    if example["error"]:
        return bad("bad_record", example["error"])
    if "json" in members:
        try:
            data = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return bad("malformed_json", f"the .json member is not JSON: {error}")
        if not isinstance(data, dict):
            return bad("malformed_json", f"the .json member holds a {type(data).__name__}, not an object")
    elif "txt" in members:
        try:
            data = {"text": members["txt"].decode("utf-8")}
        except UnicodeDecodeError as error:
            return bad("bad_record", f"the .txt member is not UTF-8: {error}")
    else:
        return bad("bad_record", f"no .json or .txt member (members: {sorted(members)})")

    for kind, extensions in MEDIA_MEMBERS.items():
        items = [
            {"bytes": data_, "path": f"{origin}.{extension}"}
            for extension, data_ in sorted(members.items())
            if extension.rsplit(".", 1)[-1].lower() in extensions
        ]
        if not items:
            continue
        if kind in data or f"{kind}s" in data:
            return bad(
                "bad_record", f"the .json member has a '{kind}'/'{kind}s' key and the sample has {kind} members too"
            )
        data = {**data, f"{kind}s": items, **({kind: items[0]} if len(items) == 1 else {})}
    return Record(data=data, origin=origin, base_dir=None)

"""Reading records: local JSON Lines / JSON / Parquet / imagefolder data, or a hub dataset, through
Hugging Face ``datasets``; and opening the images records refer to.

:func:`load_records` gives a :class:`RecordSource`, a sequence of :class:`Record` s. Nothing is
decoded up front: a JSON Lines line is parsed when its record is read, and images and clips stay
references (a path, bytes, or HF ``Image`` / ``Audio`` storage ``{"bytes", "path"}``,
:mod:`fusiontrain.data.hf_features`) until :func:`open_image` or
:func:`~fusiontrain.data.audio.load_audio` decodes them, in the dataloader workers.

JSON Lines files are read with the ``"text"`` builder, one row per line, so one malformed line
becomes one bad record naming its line instead of failing the file. A blank line is a bad record
too (reason ``empty_line``): the loader counts it with the other skipped input rather than dropping
it silently, and ``source[i]`` is always line ``i + 1``. (A file's final newline does not make a
blank line; only an empty line between or after records does.)
"""

from __future__ import annotations

import io
import json
import operator
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageFile, ImageOps

from fusiontrain.data.errors import BadSample
from fusiontrain.data.hf_features import without_decoding

SourceKind = Literal["jsonl", "json", "parquet", "imagefolder", "hub"]

_SUFFIX_KINDS: dict[str, SourceKind] = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Record:
    """One raw record.

    Attributes:
        data: the record's fields (image features as references, not decoded), or None when the
            record could not be read (see ``error``).
        origin: ``path:line`` (1-based line) for JSON Lines; ``path[index]`` (0-based row) for the
            other sources.
        base_dir: the folder relative image paths are relative to (the data file's folder, or the
            imagefolder itself); None for hub datasets.
        error: why the record could not be read (``malformed_json``, ``empty_line``), else None.
        source: the index of its source in a streamed mixture of sources; 0 otherwise.
    """

    data: dict[str, Any] | None
    origin: str
    base_dir: Path | None
    error: BadSample | None = None
    source: int = 0


class RecordSource:
    """The records of one data source, indexable like a sequence (``len``, ``source[i]``, iteration).

    Wraps a ``datasets.Dataset`` whose image features do not decode. Picklable, so it can be
    handed to dataloader workers.

    Attributes:
        name: the path or hub name the records come from.
        kind: which reader produced them.
        base_dir: see :attr:`Record.base_dir`.
    """

    def __init__(self, dataset: Any, *, name: str, kind: SourceKind, base_dir: Path | None) -> None:
        self.dataset = dataset
        self.name = name
        self.kind = kind
        self.base_dir = base_dir

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"RecordSource indices must be integers, not {type(index).__name__}") from None
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range for {n} records of {self.name}")
        index %= n
        row = self.dataset[index]
        if self.kind != "jsonl":
            return Record(data=row, origin=f"{self.name}[{index}]", base_dir=self.base_dir)
        origin = f"{self.name}:{index + 1}"
        data, error = _parse_json_line(row["text"])
        error = None if error is None else error.at(origin)
        return Record(data=data, origin=origin, base_dir=self.base_dir, error=error)

    def __iter__(self) -> Iterator[Record]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return f"RecordSource({self.name!r}, kind={self.kind!r}, records={len(self)})"


def load_records(
    path: str | Path, *, split: str = "train", subset: str | None = None, image_root: str | Path | None = None
) -> RecordSource:
    """The records at ``path``.

    Args:
        path: a local ``.jsonl`` file (one JSON object per line), ``.json`` file (an array of
            objects), ``.parquet`` file, or an imagefolder directory (images plus a
            ``metadata.jsonl`` whose ``file_name`` column names each row's image, which becomes the
            ``image`` field); anything that is not an existing path is a hub dataset name, given to
            ``datasets.load_dataset(name, split=split)``.
        split: the split to read. A local file is a single split named ``"train"``.
        subset: a hub dataset's configuration (``datasets.load_dataset(name, subset, ...)``).
        image_root: the folder relative image paths are relative to, instead of the data file's
            folder (LLaVA's annotations name images under a separate image folder).

    Raises:
        ValueError: an existing path of a kind not listed above, or a subset for a local file.
    """
    import datasets

    local = Path(path)
    root = None if image_root is None else Path(image_root)
    if not local.exists():
        name = str(path)
        dataset = datasets.load_dataset(name, subset, split=split)
        label = name if subset is None else f"{name}/{subset}"
        return RecordSource(without_decoding(dataset), name=label, kind="hub", base_dir=root)
    if subset is not None:
        raise ValueError(f"subset={subset!r} names a hub dataset's configuration, but {path} is a local path; drop it")

    name = str(local)
    if local.is_dir():
        if not (local / "metadata.jsonl").is_file():
            raise ValueError(
                f"{name} is a directory without metadata.jsonl: an imagefolder needs one to give each image its text"
            )
        dataset = datasets.load_dataset("imagefolder", data_dir=name, split=split)
        return RecordSource(without_decoding(dataset), name=name, kind="imagefolder", base_dir=root or local)

    kind = _SUFFIX_KINDS.get(local.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot read {name}: expected a .jsonl, .json or .parquet file or an imagefolder directory")
    builder = {"jsonl": "text", "json": "json", "parquet": "parquet"}[kind]
    dataset = datasets.load_dataset(builder, data_files=name, split=split)
    return RecordSource(without_decoding(dataset), name=name, kind=kind, base_dir=root or local.parent)


def _parse_json_line(line: str) -> tuple[dict[str, Any] | None, BadSample | None]:
    if not line.strip():
        return None, BadSample("empty_line", "blank line")
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        return None, BadSample("malformed_json", f"invalid JSON: {error.msg} (column {error.colno})")
    if not isinstance(data, dict):
        return None, BadSample("malformed_json", f"expected a JSON object, got {type(data).__name__}")
    return data, None


# -- images ------------------------------------------------------------------------------------------

ImageRef = str | Path | bytes | bytearray | memoryview | dict | Image.Image

# PIL reads the module global ``ImageFile.LOAD_TRUNCATED_IMAGES`` while decoding; other libraries
# often set it to True, which makes truncated files decode silently (the missing part grey or
# black). :func:`open_image` holds it at False while it decodes, under this lock so concurrent
# threads restore the caller's value correctly.
_TRUNCATION_LOCK = threading.Lock()


@contextmanager
def _truncated_images_fail() -> Iterator[None]:
    with _TRUNCATION_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def open_image(ref: ImageRef, base_dir: Path | None) -> Image.Image:
    """Decode the image ``ref`` refers to, fully, as RGB.

    Args:
        ref: a path (relative to ``base_dir``, or absolute); raw encoded bytes; an HF ``Image``
            storage dict ``{"bytes": ..., "path": ...}`` (bytes win when both are set); or a PIL
            image (e.g. a decoded HF ``Image`` feature).
        base_dir: the folder relative paths are relative to (:attr:`Record.base_dir`).

    Returns:
        The image as ``transformers.image_utils.load_image`` gives it for a file: EXIF orientation
        applied (``ImageOps.exif_transpose``), then ``convert("RGB")``.

    Raises:
        BadSample: ``missing_image`` (no such file), ``unreadable_image`` (the file cannot be
            read), ``corrupt_image`` (not an image, truncated, failing its checksums), or
            ``bad_record`` (``ref`` is of no kind above). The message names the file.
    """
    if isinstance(ref, Image.Image):
        return _decode(lambda: ref, "the given PIL image")
    if isinstance(ref, dict):
        data, path = ref.get("bytes"), ref.get("path")
        if data is not None:
            return _decode_bytes(bytes(data), f"image bytes ({path})" if path else "image bytes")
        if path is not None:
            return _decode_file(path, base_dir)
        raise BadSample("bad_record", f"image reference {ref!r} has neither bytes nor path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(ref), "image bytes")
    if isinstance(ref, (str, Path)):
        return _decode_file(ref, base_dir)
    raise BadSample("bad_record", f"unsupported image reference of type {type(ref).__name__}")


def _decode_file(path: str | Path, base_dir: Path | None) -> Image.Image:
    file = Path(path)
    if not file.is_absolute():
        if base_dir is None:
            raise BadSample(
                "missing_image", f"relative image path {str(path)!r} but the records have no base directory"
            )
        file = base_dir / file
    try:
        data = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise BadSample("missing_image", f"image file {file} does not exist") from None
    except OSError as error:
        raise BadSample("unreadable_image", f"cannot read image file {file}: {error}") from error
    return _decode_bytes(data, f"image file {file}")


def _decode_bytes(data: bytes, what: str) -> Image.Image:
    def opened() -> Image.Image:
        # verify() checks what decoding does not, e.g. a PNG cut inside its last chunks (which
        # still decodes); it leaves the image unusable, so decode from a second handle.
        Image.open(io.BytesIO(data)).verify()
        return Image.open(io.BytesIO(data))

    return _decode(opened, what)


def _decode(opened: Any, what: str) -> Image.Image:
    try:
        with _truncated_images_fail():
            image = opened()
            image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise BadSample("corrupt_image", f"{what} is not a readable image: {error}") from error

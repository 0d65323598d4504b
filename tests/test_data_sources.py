"""Record readers (JSON Lines, JSON, Parquet, HF Image features, imagefolder) and open_image."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from fusiontrain.data.errors import BadSample
from fusiontrain.data.sources import Record, load_records, open_image


def draw_image(path: Path | None, width: int, height: int, *, seed: int = 0, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A noisy image with a drawn rectangle and ellipse; saved to ``path`` if given; its bytes."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 5, height // 5, width // 2, height // 2), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw.ellipse((width // 3, height // 3, width - 2, height - 2), outline=(255, 255, 0), width=2)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = buffer.getvalue()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- JSON Lines --------------------------------------------------------------------------------------


def test_jsonl_relative_and_absolute_image_paths(tmp_path: Path) -> None:
    draw_image(tmp_path / "imgs" / "a.png", 30, 20, seed=1)
    elsewhere = tmp_path / "elsewhere" / "b.jpg"
    draw_image(elsewhere, 17, 41, seed=2, fmt="JPEG")
    data = write_jsonl(
        tmp_path / "data" / "train.jsonl",
        [json.dumps({"image": "../imgs/a.png", "text": "rel"}), json.dumps({"image": str(elsewhere), "text": "abs"})],
    )
    source = load_records(data)
    assert len(source) == 2 and source.kind == "jsonl"
    first, second = source[0], source[1]
    assert first == Record({"image": "../imgs/a.png", "text": "rel"}, f"{data}:1", data.parent)
    assert second.origin == f"{data}:2" and second.error is None
    assert pixels(open_image(first.data["image"], first.base_dir)).tolist() == pixels(Image.open(tmp_path / "imgs" / "a.png")).tolist()
    opened = open_image(second.data["image"], second.base_dir)
    assert opened.mode == "RGB" and opened.size == (17, 41)
    assert np.array_equal(pixels(opened), pixels(Image.open(elsewhere)))


def test_jsonl_bad_lines_are_per_record_errors_with_their_line(tmp_path: Path) -> None:
    """A malformed line, a non-object line and blank lines are bad records naming their 1-based
    line; the good lines around them read normally; CRLF line ends count as one line break."""
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(
        b'{"text": "one"}\n'
        b"\n"  # line 2: blank
        b'{"text": "three"}\r\n'
        b'{"text": "four", oops}\n'  # line 4: malformed
        b"   \n"  # line 5: whitespace only
        b"[1, 2]\n"  # line 6: not an object
        b'{"text": "seven"}\n'
    )
    source = load_records(data)
    assert len(source) == 7
    good = {i: source[i].data["text"] for i in (0, 2, 6)}
    assert good == {0: "one", 2: "three", 6: "seven"}
    errors = {i + 1: source[i].error for i in (1, 3, 4, 5)}
    assert {line: e.reason for line, e in errors.items()} == {2: "empty_line", 4: "malformed_json", 5: "empty_line", 6: "malformed_json"}
    for line, error in errors.items():
        assert source[line - 1].data is None
        assert error.origin == f"{data}:{line}" and f"{data}:{line}:" in str(error)
    assert "column" in errors[4].detail


def test_record_source_is_a_sequence_and_pickles(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": str(i)}) for i in range(5)])
    source = load_records(data)
    assert [r.data["text"] for r in source] == ["0", "1", "2", "3", "4"]
    assert source[-1].origin == f"{data}:5"
    with pytest.raises(IndexError):
        source[5]
    with pytest.raises(TypeError):
        source[1:2]
    assert source[np.int64(2)].origin == f"{data}:3"  # samplers may yield numpy integers
    clone = pickle.loads(pickle.dumps(source))
    assert [r.origin for r in clone] == [r.origin for r in source]


# -- JSON, Parquet, HF Image features, imagefolder -------------------------------------------------


def test_json_array(tmp_path: Path) -> None:
    draw_image(tmp_path / "x.png", 25, 25, seed=3)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"image": "x.png", "text": "a"}, {"image": "x.png", "text": "b"}]))
    source = load_records(data)
    assert source.kind == "json" and len(source) == 2
    assert source[1] == Record({"image": "x.png", "text": "b"}, f"{data}[1]", tmp_path)
    assert open_image(source[1].data["image"], source[1].base_dir).size == (25, 25)


def test_parquet_with_image_bytes(tmp_path: Path) -> None:
    import datasets

    blobs = [draw_image(None, 20 + 7 * i, 33, seed=i) for i in range(3)]
    data = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"image": blobs, "text": ["a", "b", "c"]}).to_parquet(str(data))
    source = load_records(data)
    assert source.kind == "parquet" and len(source) == 3
    record = source[2]
    assert record.origin == f"{data}[2]" and isinstance(record.data["image"], bytes)
    assert np.array_equal(pixels(open_image(record.data["image"], record.base_dir)), pixels(Image.open(io.BytesIO(blobs[2]))))


def test_parquet_with_hf_image_features_is_not_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image and List(Image) features come back as {"bytes", "path"} references (embedded bytes,
    or a path relative to the data file), and open_image decodes both."""
    import datasets
    from datasets import Features, Image as ImageFeature, List, Value

    blob = draw_image(None, 40, 24, seed=5)
    draw_image(tmp_path / "imgs" / "p.png", 24, 40, seed=6)
    dataset = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": blob, "path": "embedded.png"}, "imgs/p.png"],
            "images": [[{"bytes": blob, "path": None}], ["imgs/p.png", {"bytes": blob, "path": None}]],
            "text": ["a", "b"],
        },
        features=Features({"image": ImageFeature(), "images": List(ImageFeature()), "text": Value("string")}),
    )
    data = tmp_path / "features.parquet"
    monkeypatch.chdir(tmp_path)  # to_parquet sizes path-only images relative to the working directory
    dataset.to_parquet(str(data))
    monkeypatch.chdir(Path(__file__).parent)
    source = load_records(data)
    first, second = source[0], source[1]
    assert first.data["image"] == {"bytes": blob, "path": "embedded.png"}
    assert second.data["image"] == {"bytes": None, "path": "imgs/p.png"}
    assert [ref["path"] for ref in second.data["images"]] == ["imgs/p.png", None]
    assert open_image(first.data["image"], first.base_dir).size == (40, 24)
    assert open_image(second.data["image"], second.base_dir).size == (24, 40)
    assert [open_image(ref, second.base_dir).size for ref in second.data["images"]] == [(24, 40), (40, 24)]


def test_imagefolder_with_metadata(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    draw_image(folder / "wide.png", 60, 20, seed=7)
    draw_image(folder / "tall.jpg", 20, 60, seed=8, fmt="JPEG")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "wide.png", "text": "wide"}) + "\n" + json.dumps({"file_name": "tall.jpg", "text": "tall"}) + "\n"
    )
    source = load_records(folder)
    assert source.kind == "imagefolder" and len(source) == 2
    by_text = {source[i].data["text"]: source[i] for i in range(2)}
    assert set(by_text) == {"wide", "tall"}
    for text, size in (("wide", (60, 20)), ("tall", (20, 60))):
        record = by_text[text]
        assert isinstance(record.data["image"], dict) and record.base_dir == folder
        assert record.origin.startswith(f"{folder}[")
        assert open_image(record.data["image"], record.base_dir).size == size


def test_paths_that_cannot_be_read(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected a .jsonl"):
        load_records(tmp_path / "data.csv")
    (tmp_path / "no_meta").mkdir()
    with pytest.raises(ValueError, match="metadata.jsonl"):
        load_records(tmp_path / "no_meta")


# -- open_image ------------------------------------------------------------------------------------


def test_open_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadSample) as caught:
        open_image("nope/none.png", tmp_path)
    assert caught.value.reason == "missing_image" and str(tmp_path / "nope" / "none.png") in str(caught.value)
    with pytest.raises(BadSample) as caught:
        open_image({"bytes": None, "path": str(tmp_path / "gone.jpg")}, None)
    assert caught.value.reason == "missing_image" and "gone.jpg" in str(caught.value)
    with pytest.raises(BadSample) as caught:
        open_image("relative.png", None)
    assert caught.value.reason == "missing_image"


def test_open_image_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"this is not an image" * 20)
    with pytest.raises(BadSample) as caught:
        open_image("junk.png", tmp_path)
    assert caught.value.reason == "corrupt_image" and str(tmp_path / "junk.png") in str(caught.value)
    with pytest.raises(BadSample) as caught:
        open_image(b"\x89PNG garbage", None)
    assert caught.value.reason == "corrupt_image"
    with pytest.raises(BadSample) as caught:
        open_image(12345, None)  # type: ignore[arg-type]
    assert caught.value.reason == "bad_record"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
@pytest.mark.parametrize("lenient_global", [False, True])
def test_open_image_truncated(tmp_path: Path, fmt: str, keep: float, lenient_global: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated files are corrupt, also when some library has set PIL's global
    LOAD_TRUNCATED_IMAGES (then PIL alone would decode them silently); the global is restored."""
    data = draw_image(None, 64, 48, seed=9, fmt=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_global)
    with pytest.raises(BadSample) as caught:
        open_image(path.name, tmp_path)
    assert caught.value.reason == "corrupt_image" and str(path) in str(caught.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is lenient_global
    assert open_image(data, None).size == (64, 48)  # the whole file is fine


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_open_image_matches_transformers_load_image(tmp_path: Path, mode: str) -> None:
    """RGB conversion and EXIF orientation as transformers' load_image does for a file path."""
    from transformers.image_utils import load_image

    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = tmp_path / f"m.{fmt.lower()}"
    draw_image(path, 31, 19, seed=10, fmt=fmt, mode=mode)
    assert np.array_equal(pixels(open_image(path, None)), np.asarray(load_image(str(path))))

    rotated = tmp_path / "exif.jpg"
    image = Image.open(io.BytesIO(draw_image(None, 40, 20, seed=11)))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    image.save(rotated, "JPEG", exif=exif)
    opened = open_image(rotated, None)
    assert opened.size == (20, 40)
    assert np.array_equal(pixels(opened), np.asarray(load_image(str(rotated))))

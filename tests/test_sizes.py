"""Sample sizes: measured from tokens (or decoded images for variable-resolution encoders) equal to
the built samples' sizes; the cache round-trips, is keyed by what the sizes depend on, falls back
to the output folder, and `prepare` writes it for `train` to use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusiontrain.cli import main as cli_main
from fusiontrain.config import load_config
from fusiontrain.data.errors import BadSample
from fusiontrain.data.sizes import SampleSizes, cache_dirs, load_cached, measure, save_cache
from fusiontrain.train.data import load_or_measure_sizes, sizes_key_parts
from fusiontrain.source.model_source import ModelSource
from fusiontrain.train.data import build_dataset
from fusiontrain.train.model import build_meta_model
from fusiontrain.data.sizes import fingerprint
from tests.helpers.launch import REPO_ROOT

TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")


def _caption_data(folder: Path) -> Path:
    """12 caption records with images of different shapes, a missing image, a malformed line and a
    record too long for 64 tokens."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(12):
        Image.new("RGB", (8 + 12 * (i % 4), 40 - 6 * (i % 3)), (40 * i % 255, 90, 200)).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "text": "a shape " + "word " * (i % 6)}))
    lines.insert(3, json.dumps({"image": "images/nowhere.png", "text": "missing"}))
    lines.insert(7, '{"image": ')
    lines.insert(10, json.dumps({"image": "images/0.png", "text": "long " * 200}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _setup(overrides: list[str]):
    config = load_config(TINY_CONFIG, ["batch.seq_len=64", *overrides])
    source = ModelSource.from_config(config.model)
    model = build_meta_model(config.model, source)
    image_format = source.family.image_format(model)
    inputs = source.input_folders(model)
    return config, build_dataset(config, image_format, inputs, model, split="train"), image_format, inputs


def _models(request, name: str) -> list[str]:
    if name == "mllama":
        return [f"model.hf_mllama={request.getfixturevalue('tiny_mllama_dir')}"]
    return [
        "model.hf_mllama=null",
        f"model.compose.decoder={request.getfixturevalue('tiny_qwen3_dir')}",
        f"model.compose.encoder={request.getfixturevalue('tiny_siglip2_naflex_dir')}",
    ]


@pytest.mark.parametrize("model", ["mllama", "qwen3_siglip2_naflex"])
def test_measured_sizes_equal_the_built_samples(tmp_path, request, model: str) -> None:
    """Fixed-size tiles (sizes from tokens alone) and NaFlex (tokens per image vary with the
    aspect ratio: images decoded) against each sample built in full."""
    data = _caption_data(tmp_path / "data")
    config, dataset, image_format, inputs = _setup(
        [*_models(request, model), "data.format=caption", f"data.train.path={data}", f"output_dir={tmp_path / 'run'}"]
    )
    assert image_format.tokens_vary == (model != "mllama")
    sizes = SampleSizes(measure(dataset.size, len(dataset), range(len(dataset))))
    encoder_tokens = set()
    for index in range(len(dataset)):
        try:
            sample = dataset[index]
        except BadSample as error:
            if error.reason == "missing_image" and not image_format.tokens_vary:
                assert sizes.reason(index) is None  # found only when built, by the loader
            else:
                assert sizes.reason(index) == error.reason
            continue
        want = [len(sample), len(sample.images), sum(image_format.num_tokens(image) for image in sample.images)]
        assert sizes.table[index, :3].tolist() == want and sizes.reason(index) is None
        encoder_tokens.add(want[2])
    assert len(encoder_tokens) > 1 or not image_format.tokens_vary  # the NaFlex counts really differ
    assert sizes.skip_counts() == {"malformed_json": 1, "too_long": 1, **({} if model == "mllama" else {"missing_image": 1})}


def test_cache_round_trip_and_fallback_to_the_output_folder(tmp_path) -> None:
    table = torch.tensor([[5, 1, 3, 0], [0, 0, 0, 2]])
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    dirs = [blocked / "sizes", tmp_path / "out" / "sizes"]  # the first cannot be created
    written = save_cache(SampleSizes(table), dirs, "k" * 64, {"what": "test"})
    assert written.parent == dirs[1] and not any(dirs[1].glob(".*.tmp"))
    loaded, path = load_cached(dirs, "k" * 64, 2)
    assert torch.equal(loaded.table, table) and path == written
    assert load_cached(dirs, "j" * 64, 2) is None  # another fingerprint
    assert load_cached(dirs, "k" * 64, 3) is None  # another dataset length


def test_the_fingerprint_changes_with_what_the_sizes_depend_on(tmp_path, tiny_mllama_dir) -> None:
    data = _caption_data(tmp_path / "data")
    base = [f"model.hf_mllama={tiny_mllama_dir}", "data.format=caption", f"data.train.path={data}"]

    def key(*overrides: str) -> str:
        config, dataset, image_format, inputs = _setup([*base, *overrides])
        return fingerprint(sizes_key_parts(config, dataset, image_format, inputs))

    first = key()
    assert key() == first and key("seed=7", "batch.micro_batch_size=1", "data.packing=false") == first
    assert key("batch.seq_len=48") != first
    assert key("data.train_on=all") != first
    assert key("data.too_long=truncate") != first
    stat = data.stat()
    data.write_text(data.read_text().replace("a shape", "a shapf"))  # same size, same records
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed_data = key()
    assert changed_data != first
    tokenizer = tmp_path / "mllama_copy"
    tokenizer.mkdir()
    for file in Path(tiny_mllama_dir).iterdir():
        os.symlink(file, tokenizer / file.name)
    assert key(f"model.hf_mllama={tokenizer}") == changed_data  # the same files elsewhere: same sizes
    (tokenizer / "tokenizer_config.json").unlink()
    config = json.loads((Path(tiny_mllama_dir) / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 12345}))
    assert key(f"model.hf_mllama={tokenizer}") != changed_data


def test_prepare_writes_the_cache_that_train_start_up_reads(tmp_path, tiny_mllama_dir, capsys) -> None:
    data = _caption_data(tmp_path / "data")
    overrides = [f"model.hf_mllama={tiny_mllama_dir}", "data.format=caption", f"data.train.path={data}", f"output_dir={tmp_path / 'run'}"]
    assert cli_main(["prepare", "--config", TINY_CONFIG, "batch.seq_len=64", *overrides]) == 0
    out = capsys.readouterr().out
    assert "measured 15 samples" in out and "13 usable" in out and "malformed_json" in out
    cached = list((tmp_path / "data" / ".fusiontrain_sizes").glob("sizes-*.npy"))
    assert len(cached) == 1 and str(cached[0]) in out
    assert cache_dirs(str(data), tmp_path / "run")[0] == cached[0].parent

    config, dataset, image_format, inputs = _setup(overrides)
    reference = SampleSizes(measure(dataset.size, len(dataset), range(len(dataset))))

    def must_not_measure(index: int) -> tuple[int, int, int]:
        raise AssertionError("the cache was not used")

    dataset.size = must_not_measure
    sizes, _ = load_or_measure_sizes(config, dataset, image_format, inputs, rank=0, world=1, combine=lambda t: t)
    assert torch.equal(sizes.table, reference.table)

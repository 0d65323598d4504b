"""Training on real image-text files: packed, on 2 ranks, with every kind of bad input mixed in.

The bad records are skipped, counted per reason in metrics.jsonl, and the rest trains; with
``data.strict=true`` the first bad record stops the run with a message naming its file and line.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.helpers.launch import REPO_ROOT, run_world

TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _draw(path: Path, color: str, size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((4, 4, size[0] - 4, size[1] - 4), fill=COLORS[color])
    image.save(path)


@pytest.fixture()
def caption_data(tmp_path: Path) -> Path:
    """48 good caption records and one of each kind of bad one, as JSON Lines."""
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(48):
        color = list(COLORS)[i % 3]
        _draw(images / f"{i}.png", color, (40 + 8 * (i % 4), 30 + 6 * (i % 5)))
        lines.append(json.dumps({"image": f"images/{i}.png", "text": f"a {color} circle"}))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    full = (images / "0.png").read_bytes()
    (images / "truncated.png").write_bytes(full[: len(full) // 2])
    bad = [
        json.dumps({"image": "images/nowhere.png", "text": "a missing image"}),
        json.dumps({"image": "images/corrupt.png", "text": "a corrupt image"}),
        json.dumps({"image": "images/truncated.png", "text": "a truncated image"}),
        '{"image": "images/1.png", "text": ',  # malformed JSON
        json.dumps({"image": "images/2.png", "text": "x" * 300}),  # longer than seq_len
        json.dumps({"image": "images/3.png", "text": "   "}),  # empty text
    ]
    for k, line in enumerate(bad):
        lines.insert(5 + 7 * k, line)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(tmp_path: Path, data: Path, mllama_dir: Path, *overrides: str, nproc: int = 2):
    out = tmp_path / "run"
    args = [
        "-m", "fusiontrain", "train", "--config", TINY_CONFIG,
        f"model.hf_mllama={mllama_dir}", f"output_dir={out}", "data.format=caption", f"data.train.path={data}",
        f"data.eval.path={data}", "batch.seq_len=64", "batch.global_batch_size=4", "max_steps=12",
        "eval.every_n_steps=6", "eval.num_samples=8", "logging.every_n_steps=0", *overrides,
    ]
    result = run_world(args, nproc=nproc, timeout=300)
    return result, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _times_seen(run: Path) -> Counter:
    """How many times each sample id was in a trained row (from every rank's sample-id log)."""
    seen: Counter = Counter()
    for log in (run / "sample_ids").glob("rank_*.jsonl"):
        for line in log.read_text().splitlines():
            for _, ids in json.loads(line)["rows"]:
                seen.update(ids)
    return seen


def test_packed_training_on_files_skips_and_counts_bad_records(tmp_path, caption_data, tiny_mllama_dir) -> None:
    result, rows = _train(
        tmp_path, caption_data, tiny_mllama_dir, "data.packing=true", "data.num_workers=1", "data.log_sample_ids=true"
    )
    skipped = rows[-1]["skipped"]
    seen = _times_seen(tmp_path / "run")
    # Records 5, 12 and 19 (missing, corrupt, truncated image) fail only when built: counted each
    # time a rank builds their row. Records 26, 33 and 40 (malformed JSON, too long, empty text)
    # are dropped by the planner: counted once per epoch begun, which is as often as the most
    # often seen record was trained on.
    assert seen[5] >= 1 and skipped["missing_image"] == seen[5]
    assert skipped["corrupt_image"] == seen[12] + seen[19]
    epochs = max(seen.values())
    assert epochs >= 2 and all(skipped[reason] == epochs for reason in ("malformed_json", "too_long", "empty_text"))
    assert not {26, 33, 40} & set(seen)
    assert all(r["real_token_share"] > 0.5 for r in rows)
    assert "eval_loss" in rows[5] and rows[-1]["loss"] == rows[-1]["loss"]  # not NaN
    assert "train.jsonl:" in result.stdout  # the skips are logged with file and line


def test_strict_mode_stops_at_the_first_bad_record(tmp_path, caption_data, tiny_mllama_dir) -> None:
    with pytest.raises(AssertionError, match=r"train\.jsonl:\d+"):
        _train(tmp_path, caption_data, tiny_mllama_dir, "data.strict=true", nproc=1)

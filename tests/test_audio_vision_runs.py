"""Training a composed model with an image and an audio encoder through the command line: a 2-rank
packed run on caption records that hold images, clips or both, with checkpoints; a resumed run
continues it bitwise, and elastically on 1 rank with the same rows and loss. (One run and one resume: the slow file budget; the model-level proofs are in
tests/test_audio_vision_model.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from tests.helpers.launch import REPO_ROOT, run_world

TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")


def _records(folder: Path) -> Path:
    """24 caption records: a red or blue square, a low or high tone, or both."""
    folder.mkdir(parents=True)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        Image.new("RGB", (40, 40), colour).save(folder / f"{name}.png")
    rate = 16_000
    for name, hertz, seconds in (("low", 220.0, 0.3), ("high", 880.0, 0.6)):
        t = np.arange(int(rate * seconds), dtype=np.float32) / rate
        soundfile.write(folder / f"{name}.wav", 0.4 * np.sin(2 * np.pi * hertz * t), rate)
    lines = []
    for k in range(24):
        colour, pitch = ("red", "blue")[k % 2], ("low", "high")[(k // 2) % 2]
        record = {"text": f"a {colour} square" if k % 3 == 0 else f"a {pitch} tone" if k % 3 == 1 else f"{colour}, {pitch}"}
        if k % 3 != 1:
            record["image"] = f"{colour}.png"
        if k % 3 != 0:
            record["audio"] = f"{pitch}.wav"
        lines.append(json.dumps(record))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_a_2_rank_packed_run_with_images_and_clips_trains_resumes_bitwise_and_on_1_rank(
    tmp_path: Path, tiny_llama_dir: Path, tiny_siglip_dir: Path, tiny_whisper_dir: Path
) -> None:
    data = _records(tmp_path / "data")
    args = [
        "-m", "fusiontrain", "train", "--config", TINY_CONFIG, "model.hf_mllama=null",
        f"model.compose.decoder={tiny_llama_dir}", f"model.compose.encoders={{image: {tiny_siglip_dir}, audio: {tiny_whisper_dir}}}",
        "model.compose.fusion_intervals={image: 2, audio: 4}", "model.compose.fusion_offsets={audio: 0}",
        "data.format=caption", f"data.train.path={data}", "data.packing=true", "data.max_items_per_row={audio: 2}",
        "batch.seq_len=48", "batch.micro_batch_size=1", "batch.global_batch_size=4", "max_steps=3",
        "checkpoint.every_n_steps=2", "eval.every_n_steps=0", "logging.every_n_steps=0",
        # both towers trained: the export must take Whisper's fixed positions from its base folder
        "model.encoder_trainable=true", "data.num_workers=0",
    ]
    run = tmp_path / "run"
    run_world([*args, f"output_dir={run}"], nproc=2, timeout=240)
    rows = _metrics(run)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["loss"] == row["loss"] and row["loss"] > 0 for row in rows), rows
    assert all(0 < row["mfu"] < 1 for row in rows)  # the FLOP count took both encoders
    # the run sized every record's clips (16 of the 24 hold one) in columns of their own
    (info,) = (tmp_path / "data" / ".fusiontrain_sizes").glob("sizes-*.json")
    table = np.load(info.with_suffix(".npy"), allow_pickle=False)
    columns = json.loads(info.read_text())["columns"]
    assert columns[4:] == ["audio_items", "audio_encoder_tokens"] and table[:, 4].sum() == 16
    assert sorted(set(table[:, 5].tolist())) == [0, 15, 30]  # 0.3 s and 0.6 s of a 1 s window of 50 tokens
    # per modality, the items and the encoder tokens text sees: a clip 15 or 30, an image 4 (28 px, 14 px patches)
    for row in rows:
        clips, clip_tokens = row["modality/audio/items"], row["modality/audio/encoder_tokens"]
        assert 15 * clips <= clip_tokens <= 30 * clips and clip_tokens % 15 == 0, row
        assert row["modality/image/encoder_tokens"] == 4 * row["modality/image/items"], row
    assert sum(row["modality/audio/items"] for row in rows) > 0 and sum(row["modality/image/items"] for row in rows) > 0

    # The same run on 1 rank, its loader in 2 worker processes, from scratch: the same rows (the row
    # plan does not depend on the world size), so the same losses up to the sums' order, and the
    # same items; the placeholders a 2-rank run adds to a rank without clips count nothing.
    single = tmp_path / "single"
    run_world([*args[:-1], "data.num_workers=2", f"output_dir={single}", "checkpoint.every_n_steps=0"], nproc=1, timeout=240)
    alone = _metrics(single)
    assert [row["step"] for row in alone] == [0, 1, 2]
    for one, two in zip(alone, rows):
        assert abs(one["loss"] - two["loss"]) <= 2e-6 * max(1.0, abs(two["loss"])), (one, two)
        assert {k: v for k, v in one.items() if k.startswith("modality/")} == {
            k: v for k, v in two.items() if k.startswith("modality/")
        }

    manifest = json.loads((run / "checkpoints" / "step_2" / "manifest.json").read_text())
    assert set(manifest["base"]["folders"]) == {"decoder", "encoder.image", "encoder.audio"}
    assert manifest["base"]["fusion_placements"] == {"image": [2, 1], "audio": [4, 0]}

    resumed = tmp_path / "resumed"
    run_world([*args, f"output_dir={resumed}", f"checkpoint.resume={run / 'checkpoints' / 'step_2'}"], nproc=2, timeout=240)
    again = _metrics(resumed)
    assert [row["step"] for row in again] == [2] and again[0]["loss"] == rows[2]["loss"]

    # Elastic: the same checkpoint resumed on 1 rank takes the same rows for step 3 (the row plan
    # does not depend on the world size), so its loss is the 2-rank run's up to the sums' order.
    elastic = tmp_path / "elastic"
    run_world([*args, f"output_dir={elastic}", f"checkpoint.resume={run / 'checkpoints' / 'step_2'}"], nproc=1, timeout=240)
    (one,) = _metrics(elastic)
    assert one["step"] == 2 and abs(one["loss"] - rows[2]["loss"]) <= 2e-6 * max(1.0, abs(rows[2]["loss"]))

    # Export the checkpoint in fusiontrain's format, then generate from it with an image and a clip:
    # the export gives the checkpoint's logits, and the command line prints a reply.
    import torch

    from fusiontrain.cli import main as cli_main
    from fusiontrain.inference.load import build_prompt_inputs, load_for_inference

    checkpoint, export = run / "checkpoints" / "step_2", tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(export), "--format", "fusiontrain"]) == 0
    assert (export / "encoder_audio_config.json").is_file() and (export / "encoder_image_config.json").is_file()
    logits = []
    for folder in (checkpoint, export):
        loaded = load_for_inference(folder)
        tokens, encoder_input, encoder_mask = build_prompt_inputs(
            loaded, [tmp_path / "data" / "red.png"], "what do you see and hear?", [tmp_path / "data" / "low.wav"]
        )
        assert set(encoder_input) == {"image", "audio"} and encoder_mask["audio"].shape[-1] == 15
        with torch.no_grad():
            logits.append(loaded.model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask))
    assert torch.equal(logits[0], logits[1])
    generate = ["generate", "--model", str(export), "--image", str(tmp_path / "data" / "blue.png"),
                "--audio", str(tmp_path / "data" / "high.wav"), "--prompt", "describe", "--max-new-tokens", "3"]
    assert cli_main(generate) == 0

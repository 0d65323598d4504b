"""Every shipped config trains, checkpoints, resumes and exports, with its own settings.

For each ``configs/*.yaml`` (a new config is picked up by itself), keeping all of its settings
(activation checkpointing, offloading, precision, storage dtypes, sharding policy, loss chunks,
LoRA, packing and image limits, dataloader workers, streaming where set) and swapping only what
cannot run here (``tests/helpers/shipped_configs.py``: tiny models of the same families, tiny data
of the same format, sizes, steps, 2 gloo ranks):

- ``train`` runs 3 steps on 2 ranks, checkpointing after steps 2 and 3;
- a second run resumes from the step-2 checkpoint in a fresh output folder and trains step 3: its
  step-3 loss and its step-3 checkpoint are bitwise the uninterrupted run's;
- ``export`` writes the step-3 checkpoint in the family's default format, and the export, loaded
  for inference, holds exactly the checkpoint's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusiontrain.cli import main as cli_main
from fusiontrain.inference.load import load_for_inference
from tests.helpers.launch import run_world
from tests.helpers.shipped_configs import (
    WORLD_SIZE,
    folder_fixtures,
    load_raw,
    shipped_configs,
    stand_in_overrides,
    write_caption_data,
    write_chat_data,
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shipped_data")
    return {"caption": write_caption_data(root / "caption"), "chat": write_chat_data(root / "chat")}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    model = load_for_inference(folder).model
    return {name: param.detach() for name, param in model.named_parameters()}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("config", shipped_configs(), ids=lambda path: path.stem)
def test_shipped_config_trains_resumes_and_exports(
    config: Path, tiny_data: dict[str, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    raw = load_raw(config)
    folders = {key: request.getfixturevalue(fixture) for key, fixture in folder_fixtures(raw).items()}
    train = ["-m", "fusiontrain", "train", "--config", str(config)]

    # Uninterrupted: 3 steps, checkpoints after steps 2 and 3.
    run = tmp_path / "run"
    overrides = stand_in_overrides(raw, folders=folders, data=tiny_data, output_dir=run, max_steps=3)
    first = run_world([*train, *overrides], nproc=WORLD_SIZE, timeout=300)
    # No warning that is not the user's business, whatever the family: FSDP2's about a unit handing
    # back a view (which says gradients may be wrong), torchdata's about a deprecated call.
    for noise in ("returned a view tensor", "set_vital"):
        assert noise not in first.stdout, first.stdout[-4000:]
    rows = _metrics(run)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["loss"] == row["loss"] and row["loss"] > 0 for row in rows), rows  # finite, trained
    step_2, step_3 = run / "checkpoints" / "step_2", run / "checkpoints" / "step_3"
    assert (step_2 / "manifest.json").is_file() and (step_3 / "manifest.json").is_file()

    # Resumed from step 2 in a fresh folder: step 3 again, bitwise.
    resumed = tmp_path / "resumed"
    overrides = stand_in_overrides(raw, folders=folders, data=tiny_data, output_dir=resumed, max_steps=3)
    result = run_world([*train, *overrides, f"checkpoint.resume={step_2}"], nproc=WORLD_SIZE, timeout=300)
    assert "resum" in result.stdout.lower(), result.stdout[-2000:]
    again = _metrics(resumed)
    assert [row["step"] for row in again] == [2] and again[0]["loss"] == rows[2]["loss"]
    final = _weights(step_3)
    resumed_final = _weights(resumed / "checkpoints" / "step_3")
    assert final.keys() == resumed_final.keys()
    for name, tensor in final.items():
        assert torch.equal(resumed_final[name], tensor), name

    # Export in the family's default format; the export holds the checkpoint's weights.
    export = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(step_3), "--out", str(export)]) == 0
    exported = _weights(export)
    assert exported.keys() == final.keys()
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor.to(exported[name].dtype)), name
    trained = json.loads((step_3 / "manifest.json").read_text())
    print(f"{config.name}: losses {[row['loss'] for row in rows]}; manifest parts {sorted(trained.get('parts', {}))}")

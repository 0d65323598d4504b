"""World-size independent packed training, through the CLI under torchrun on gloo:

- 8 packed steps on 1, 2 and 4 ranks train on the same rows of the same samples at every step
  (each rank's sample-id log) and give the same losses (fp32, relative 1e-5);
- the 4-rank run's step-4 checkpoint resumed on 2 ranks continues with exactly the next global
  rows and ends at the weights of the uninterrupted 2-rank run (fp32 reduction-order tolerance).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from fusiontrain.checkpoint.parts import CheckpointPart
from tests.helpers.launch import REPO_ROOT, run_world
from tests.helpers.shared import shared_folder

TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
# Without dataloader workers (a process per rank less on the 2-core CI machine): the row plan and
# the data position do not depend on them (tests/test_loader.py, and the preemption tests resume
# with a worker from a worker-less run).
RUN = [
    "max_steps=8", "data.packing=true", "data.synthetic_lengths=long_tail", "data.synthetic_max_text=30",
    "data.synthetic_samples=48", "data.num_workers=0", "data.log_sample_ids=true", "batch.micro_batch_size=2",
    "batch.global_batch_size=8", "batch.seq_len=64", "logging.every_n_steps=0", "eval.every_n_steps=0", "checkpoint.every_n_steps=4",
]


def _train(output_dir: Path, nproc: int, mllama: Path, *overrides: str) -> None:
    args = ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={mllama}", f"output_dir={output_dir}", *RUN, *overrides]
    run_world(args, nproc=nproc, timeout=300)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def _rows_per_step(run: Path) -> dict[int, list[list[int]]]:
    """Every step's global rows (sample ids), in the step's row order, from all ranks' logs."""
    rows: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for log in sorted((run / "sample_ids").glob("rank_*.jsonl")):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            for index, ids in entry["rows"]:
                assert index not in rows[entry["step"]], "a row dealt twice"
                rows[entry["step"]][index] = ids
    return {step: [by_index[i] for i in sorted(by_index)] for step, by_index in sorted(rows.items())}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    part = CheckpointPart(checkpoint, "fusion")
    return {name: part.read(name) for name in part.names()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mllama_dir) -> dict[int, Path]:
    """Output folders of the same 8-step run on 1, 2 and 4 ranks."""
    out = {}
    for nproc in (1, 2, 4):
        # once per test session, whichever pytest-xdist worker asks first (tests/helpers/shared.py)
        folder = shared_folder(tmp_path_factory, f"test_elastic_ranks{nproc}", lambda f, n=nproc: _train(f / "run", n, tiny_mllama_dir))
        out[nproc] = folder / "run"
    return out


def test_same_samples_and_losses_on_1_2_and_4_ranks(runs) -> None:
    reference_rows, reference_losses = _rows_per_step(runs[1]), _losses(runs[1])
    assert sorted(reference_rows) == list(range(8)) and all(len(rows) == 8 for rows in reference_rows.values())
    assert sum(len(row) > 1 for rows in reference_rows.values() for row in rows) > 8  # really packed
    for nproc in (2, 4):
        assert _rows_per_step(runs[nproc]) == reference_rows, f"{nproc} ranks trained on other rows"
        losses = _losses(runs[nproc])
        assert sorted(losses) == list(range(8))
        for step, loss in reference_losses.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5), (nproc, step)


def test_stopped_on_4_ranks_resumed_on_2_matches_the_uninterrupted_2_rank_run(tmp_path, runs, tiny_mllama_dir) -> None:
    resumed = tmp_path / "resumed"
    _train(resumed, 2, tiny_mllama_dir, f"checkpoint.resume={runs[4] / 'checkpoints' / 'step_4'}")
    uninterrupted_rows = _rows_per_step(runs[2])
    after = _rows_per_step(resumed)
    assert sorted(after) == [4, 5, 6, 7]
    assert {**{s: r for s, r in _rows_per_step(runs[4]).items() if s < 4}, **after} == uninterrupted_rows
    assert sorted(_losses(resumed)) == [4, 5, 6, 7]
    for step, loss in _losses(resumed).items():
        assert loss == pytest.approx(_losses(runs[2])[step], rel=1e-5), step
    final, reference = _weights(resumed / "checkpoints" / "step_8"), _weights(runs[2] / "checkpoints" / "step_8")
    moved = _weights(runs[2] / "checkpoints" / "step_4")
    assert final.keys() == reference.keys() and final
    assert any(not torch.equal(moved[name], reference[name]) for name in reference)  # steps 4-7 trained
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)

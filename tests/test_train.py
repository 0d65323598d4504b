"""The trainer end to end, on 1, 2 and 4 gloo ranks: sharded runs compute what one process does.

Unpacked (padded) batches make each step's global batch independent of the world size; packed
streams are per rank (tests/test_loader.py, tests/test_packing.py).

Each run goes through ``tests/helpers/train_harness.py`` (the real Trainer under torchrun), which
dumps per-step losses, the final trainable weights, and checks on frozen weights and optimizer
state. The reference is one process with 4 accumulation micro-steps of 2 samples; every other run
sees the same 8 samples per step (``batch.global_batch_size=8``), split differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.launch import REPO_ROOT, run_script_multinode, run_world
from tests.helpers.shared import shared_folder

HARNESS = str(REPO_ROOT / "tests" / "helpers" / "train_harness.py")
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
# No dataloader worker: these runs compare sharding, accumulation, padding and compilation, not the
# data path (tests/test_loader.py proves the batches are the same with and without workers).
COMMON = [
    "data.packing=false", "max_steps=4", "logging.every_n_steps=0", "eval.every_n_steps=2", "eval.num_samples=7",
    "batch.global_batch_size=8", "data.num_workers=0",
    # below the first steps' grad norms (about 0.4 to 0.7): clipping acts, so every comparison
    # with one process covers the global norm and the clipping of sharded gradients too
    "optim.max_grad_norm=0.5",
]


def _run(out: Path, nproc: int, model_args: list[str], *overrides: str) -> None:
    args = [HARNESS, str(out), "--config", TINY_CONFIG, *model_args, f"output_dir={out}/run", *COMMON, *overrides]
    run_world(args, nproc=nproc, timeout=300)


def _read(out: Path) -> tuple[dict, dict]:
    """(the harness report, the final trainable weights) of a run in ``out``."""
    return json.loads((out / "report.json").read_text()), load_file(out / "trainable.safetensors")


def _train(tmp_path: Path, name: str, nproc: int, model_args: list[str], *overrides: str) -> tuple[dict, dict]:
    _run(tmp_path / name, nproc, model_args, *overrides)
    return _read(tmp_path / name)


def _shared_train(
    tmp_path_factory: pytest.TempPathFactory, name: str, nproc: int, model_args: list[str], *overrides: str
) -> tuple[dict, dict]:
    """:func:`_train`, run once per test session whichever pytest-xdist worker asks first
    (tests/helpers/shared.py)."""
    folder = shared_folder(tmp_path_factory, f"test_train_{name}", lambda f: _run(f / name, nproc, model_args, *overrides))
    return _read(folder / name)


def _assert_same_run(got: tuple[dict, dict], want: tuple[dict, dict], *, weight_atol: float = 2e-5) -> None:
    """Losses agree to 2e-6 (summation order differs across ranks). Weights after 4 AdamW steps at
    lr 3e-3 agree to 2e-5 (0.02% of their size): Adam divides by sqrt(v), which turns 1e-7-sized
    gradient differences on near-zero gradients into visibly larger update differences."""
    (got_report, got_weights), (want_report, want_weights) = got, want
    torch.testing.assert_close(torch.tensor(got_report["losses"]), torch.tensor(want_report["losses"]), atol=2e-6, rtol=0)
    # the global grad norm from the shards (HSDP replicas counted once) is one process's norm
    torch.testing.assert_close(
        torch.tensor(got_report["grad_norms"]), torch.tensor(want_report["grad_norms"]), atol=0, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(got_report["eval_losses"]), torch.tensor(want_report["eval_losses"]), atol=2e-6, rtol=0
    )
    assert got_weights.keys() == want_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(got_weights[name], want_weights[name], atol=weight_atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def mllama_args(tiny_mllama_dir: Path) -> list[str]:
    return [f"model.hf_mllama={tiny_mllama_dir}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, mllama_args: list[str]) -> tuple[dict, dict]:
    """One process, 4 micro-steps of 2 samples per step."""
    return _shared_train(tmp_path_factory, "reference", 1, mllama_args, "batch.micro_batch_size=2")


def test_reference_run_trains_only_fusion_parameters(reference: tuple[dict, dict]) -> None:
    report, weights = reference
    assert report["frozen_unchanged"] and report["num_frozen"] > 50
    assert not report["unmoved_trainable"], "every fusion parameter must move"
    assert set(report["optimizer_state_params"]) == set(report["trainable"]) == set(weights)
    assert all(".fusion_layer." in n or n.startswith("encoder.projection.") or "fusion_embedding" in n for n in weights)
    assert report["losses"][-1] < report["losses"][0]


def test_fsdp_two_ranks_with_checkpointing_matches_one_process(tmp_path, mllama_args, reference) -> None:
    run = _train(
        tmp_path, "fsdp2", 2, mllama_args, "parallel.activation_checkpointing=full", "parallel.fusion_layer_sharding=split"
    )
    assert run[0]["frozen_unchanged"]
    _assert_same_run(run, reference)


@pytest.fixture(scope="module")
def fsdp_four_ranks(tmp_path_factory: pytest.TempPathFactory, mllama_args: list[str]) -> tuple[dict, dict]:
    """FSDP over 4 ranks, 2 accumulated micro-batches of 1 sample per rank and step."""
    return _shared_train(tmp_path_factory, "fsdp4", 4, mllama_args, "batch.micro_batch_size=1")


def test_fsdp_four_ranks_matches_one_process(fsdp_four_ranks, reference) -> None:
    _assert_same_run(fsdp_four_ranks, reference)


def test_hsdp_2x2_matches_fsdp_and_one_process(tmp_path, mllama_args, fsdp_four_ranks, reference) -> None:
    """HSDP (2 replicas x FSDP over 2) on the same split as the 4-rank FSDP run."""
    hsdp = _train(
        tmp_path, "hsdp", 4, mllama_args, "parallel.dp_replicate=2", "parallel.activation_checkpointing=2",
        "batch.micro_batch_size=1",
    )
    _assert_same_run(hsdp, fsdp_four_ranks)
    _assert_same_run(hsdp, reference)


def test_two_replicas_of_one_shard_match_one_process(tmp_path, mllama_args, reference) -> None:
    """HSDP over replicas of one shard (dp_replicate=2, dp_shard=1): the shard dimension has one
    rank, so the frozen parameters stay out of FSDP2 (plain tensors, never copied) while the
    trained ones are its DTensors, their gradients all-reduced across the two replicas."""
    replicas = _train(
        tmp_path, "replicas", 2, mllama_args, "parallel.dp_replicate=2", "parallel.dp_shard=1", "batch.micro_batch_size=1"
    )
    _assert_same_run(replicas, reference)


def test_eight_padded_rows_equal_four_accumulated_padding_free_rows_of_two(tmp_path, mllama_args, reference) -> None:
    """One micro-batch of 8 padded rows (data.padding_free=false) against the reference's 4
    accumulated micro-batches of 2 samples, each in one padding-free row."""
    big = _train(tmp_path, "big", 1, mllama_args, "batch.micro_batch_size=8", "data.padding_free=false")
    _assert_same_run(big, reference)


def test_compiled_step_equals_eager(tmp_path, mllama_args) -> None:
    """parallel.compile (inductor) composed with activation checkpointing and FSDP2, on packed
    rows (the packed attention is a graph break; the layouts change every step), against eager
    without checkpointing."""
    steps = ["max_steps=2", "eval.every_n_steps=0", "data.packing=true"]
    report, weights = _train(
        tmp_path, "compiled", 1, mllama_args, "parallel.compile=true", "parallel.activation_checkpointing=full", *steps
    )
    eager_report, eager_weights = _train(tmp_path, "eager", 1, mllama_args, *steps)
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(eager_report["losses"]), atol=1e-6, rtol=0)
    assert weights.keys() == eager_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], eager_weights[name], atol=5e-5, rtol=0, msg=name)


def test_run_folder_has_config_and_metrics(tmp_path, mllama_args, reference) -> None:
    out = tmp_path / "plain"
    run_world(["-m", "fusiontrain", "train", "--config", TINY_CONFIG, *mllama_args, f"output_dir={out}", *COMMON], nproc=2)
    assert (out / "config.yaml").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_memory_bytes", "mfu", "real_token_share"):
        assert all(key in row for row in rows), key
    assert all(0 < row["mfu"] < 1 for row in rows)
    assert "eval_loss" in rows[1] and "eval_loss" not in rows[0]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows]), torch.tensor(reference[0]["losses"]), atol=2e-6, rtol=0)


def test_multinode_script_trains_two_nodes_like_one_process(tmp_path, mllama_args, reference) -> None:
    """launch/multinode.sh as 2 "nodes" x 1 process on 127.0.0.1 runs the real train command."""
    out = tmp_path / "multinode"
    run_script_multinode(
        ["--config", TINY_CONFIG, *mllama_args, f"output_dir={out}", *COMMON], nnodes=2, nproc_per_node=1, timeout=240
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows]), torch.tensor(reference[0]["losses"]), atol=2e-6, rtol=0)


def test_text_only_micro_batches_on_one_rank_keep_ranks_in_step(tmp_path, mllama_args) -> None:
    """With 0-2 images per sample and one sample per micro-batch, a rank often has a text-only
    batch while the other has images; both must still run the encoder's collectives."""
    out = tmp_path / "mixed"
    run_world(
        ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, *mllama_args, f"output_dir={out}",
         "data.synthetic_lengths=long_tail", "data.synthetic_max_text=30", "batch.micro_batch_size=1",
         "batch.global_batch_size=2", "max_steps=6", "logging.every_n_steps=0", "eval.every_n_steps=3", "eval.num_samples=3"],
        nproc=2,
        timeout=180,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["loss"] == r["loss"] for r in rows)


def test_eval_then_checkpoint_with_a_trainable_decoder(tmp_path, mllama_args) -> None:
    """The eval applies the output projection outside the root forward with no backward after it;
    its FSDP unit must be resharded, or the optimizer's state no longer matches the parameters
    (a KeyError in get_optimizer_state_dict at the next checkpoint)."""
    out = tmp_path / "eval_ckpt"
    run_world(
        ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, *mllama_args, f"output_dir={out}", "max_steps=2",
         "model.decoder_trainable=true", "eval.every_n_steps=1", "checkpoint.every_n_steps=1", "logging.every_n_steps=0"],
        nproc=2,
        timeout=180,
    )
    assert (out / "checkpoints" / "step_2" / "manifest.json").is_file()

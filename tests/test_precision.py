"""fusiontrain.parallel.precision: which dtype trained and frozen parameters are stored in; a whole 2-rank run
with model.frozen_dtype=bfloat16 (resumed and exported) against fp32 storage. What FSDP does with
the dtypes, unit by unit, is tested in test_parallel.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fusiontrain.checkpoint.export import export_checkpoint
from fusiontrain.checkpoint.parts import CheckpointPart
from fusiontrain.families.mllama.model import MLLAMA_FUSION_VOCAB_SIZE
from fusiontrain.parallel.precision import StorageDtypes, storage_dtypes, store_parameters
from tests.helpers.launch import REPO_ROOT, run_world

HARNESS = str(REPO_ROOT / "tests" / "helpers" / "train_harness.py")
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"

F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(
    "model_dtype,frozen_dtype,mixed_precision,device_type,want",
    [
        ("float32", None, "auto", "cuda", (F32, F32)),  # the default follows model.dtype everywhere
        ("bfloat16", None, "auto", "cpu", (BF16, BF16)),
        ("float32", "bfloat16", "auto", "cpu", (F32, BF16)),
        ("float32", "auto", "auto", "cpu", (F32, F32)),  # 'auto' = the compute dtype
        ("float32", "auto", "bf16", "cpu", (F32, BF16)),
        ("float32", "auto", "auto", "cuda", (F32, BF16)),
        ("float32", "auto", "fp32", "cuda", (F32, F32)),
        ("bfloat16", "auto", "fp32", "cpu", (BF16, BF16)),
    ],
)
def test_storage_dtypes(model_dtype: str, frozen_dtype: str | None, mixed_precision: str, device_type: str, want) -> None:
    got = storage_dtypes(model_dtype, frozen_dtype, mixed_precision=mixed_precision, device_type=device_type)
    assert (got.trainable, got.frozen) == want


def test_frozen_weights_wider_than_trained_ones_are_refused() -> None:
    with pytest.raises(ValueError, match=r"model.frozen_dtype=float32 .* model.dtype=bfloat16"):
        storage_dtypes("bfloat16", "float32", mixed_precision="auto", device_type="cpu")


def test_store_parameters_casts_by_trainability_and_keeps_ties() -> None:
    with torch.device("meta"):
        model = nn.ModuleDict({"embed": nn.Embedding(8, 4), "head": nn.Linear(4, 8, bias=False), "new": nn.Linear(4, 4)})
    model["head"].weight = model["embed"].weight  # tied, frozen
    model["embed"].weight.requires_grad_(False)
    tied = model["embed"].weight
    store_parameters(model, StorageDtypes(trainable=F32, frozen=BF16))
    assert model["head"].weight is model["embed"].weight is tied and tied.dtype == BF16
    assert {p.dtype for p in model["new"].parameters()} == {F32} and model["new"].weight.requires_grad
    store_parameters(model, StorageDtypes(trainable=BF16, frozen=BF16))  # model.dtype=bfloat16: everything
    assert {p.dtype for p in model.parameters()} == {BF16}


def test_describe() -> None:
    assert StorageDtypes(F32, F32).describe() == "float32"
    assert StorageDtypes(F32, BF16).describe() == "float32, frozen bfloat16"


# -- a whole run -------------------------------------------------------------------------------------


def _train(out: Path, model_dir: Path, *overrides: str) -> list[str]:
    """The harness (the real Trainer) on 2 ranks: fusion-only, bf16 compute, 3 steps."""
    return [
        *(HARNESS, str(out)),
        *("--config", str(TINY_CONFIG), f"model.hf_mllama={model_dir}", f"output_dir={out}/run", "max_steps=3"),
        *("parallel.mixed_precision=bf16", "eval.every_n_steps=0", "logging.every_n_steps=0", "data.num_workers=0"),
        *overrides,
    ]


def test_two_rank_run_with_bf16_frozen_storage_equals_fp32_storage_and_resumes_and_exports(
    tiny_mllama_dir: Path, tmp_path: Path
) -> None:
    """Fusion-only on 2 ranks under bf16 compute: fp32 storage against model.frozen_dtype=bfloat16,
    the latter checkpointed with its frozen weights (checkpoint.save_frozen), stopped after step 2
    and resumed. Tolerance: none; losses and trained weights agree bit for bit. The frozen shards
    are bf16 and the trained fp32 in every FSDP unit, the checkpoint's frozen part is bf16, and the
    HF export is in the base's dtype (fp32): trained values as the fp32-storage run's export,
    untrained ones the base's rounded to bf16 (what the run computed with, from the frozen part)."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    frozen_bf16 = ["model.frozen_dtype=bfloat16", "checkpoint.save_frozen=true", "checkpoint.every_n_steps=2"]
    run_world(_train(fp32, tiny_mllama_dir, "checkpoint.every_n_steps=3"), nproc=2, timeout=300)
    run_world(_train(bf16, tiny_mllama_dir, *frozen_bf16, "stop_after_steps=2"), nproc=2, timeout=300)
    run_world(
        _train(bf16 / "resumed", tiny_mllama_dir, *frozen_bf16, f"output_dir={bf16}/run", "checkpoint.resume=auto"),
        nproc=2, timeout=300,
    )

    want = json.loads((fp32 / "report.json").read_text())
    stopped, resumed = (json.loads((folder / "report.json").read_text()) for folder in (bf16, bf16 / "resumed"))
    assert stopped["losses"] + resumed["losses"] == want["losses"] and len(want["losses"]) == 3
    trained_want, trained_got = load_file(fp32 / "trainable.safetensors"), load_file(bf16 / "resumed" / "trainable.safetensors")
    assert trained_got.keys() == trained_want.keys()
    assert all(torch.equal(trained_got[name], trained_want[name]) for name in trained_want)
    assert resumed["frozen_unchanged"] and not resumed["unmoved_trainable"] and not want["unmoved_trainable"]
    assert {kind for kinds in want["unit_dtypes"].values() for kind in kinds} == {"torch.float32 trained", "torch.float32 frozen"}
    for unit, kinds in resumed["unit_dtypes"].items():
        assert set(kinds) <= {"torch.float32 trained", "torch.bfloat16 frozen"}, unit
    assert resumed["unit_dtypes"]["decoder.tok_embeddings"] == ["torch.bfloat16 frozen", "torch.float32 trained"]

    step_2 = bf16 / "run" / "checkpoints" / "step_2"
    assert {CheckpointPart(step_2, "decoder").dtype(name) for name in CheckpointPart(step_2, "decoder").names()} == {BF16}
    assert {CheckpointPart(step_2, "fusion").dtype(name) for name in CheckpointPart(step_2, "fusion").names()} == {F32}

    exported = {}
    for name, run in (("fp32", fp32), ("bf16", bf16)):
        folder = export_checkpoint(run / "run" / "checkpoints" / "step_3", tmp_path / f"export_{name}")
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
        exported[name] = load_file(folder / "model.safetensors")
    base = load_file(tiny_mllama_dir / "model.safetensors")
    assert exported["bf16"].keys() == exported["fp32"].keys() == base.keys()
    rounded_somewhere = False
    for key, trained in exported["fp32"].items():
        # A whole tensor is frozen when the fp32-storage run left it as the base has it (every
        # trained parameter moved: unmoved_trainable is empty); the embeddings' base rows are frozen
        # and their last rows (the new tokens) train.
        frozen = torch.full(trained.shape, torch.equal(trained, base[key]))
        if key.endswith("embed_tokens.weight"):
            frozen[:-MLLAMA_FUSION_VOCAB_SIZE] = True
        expected = torch.where(frozen, base[key].to(BF16).float(), trained)
        assert exported["bf16"][key].dtype == F32 and torch.equal(exported["bf16"][key], expected), key
        rounded_somewhere |= not torch.equal(expected, trained)
    assert rounded_somewhere

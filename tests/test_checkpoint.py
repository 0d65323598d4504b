"""CheckpointManager in one process: atomic saves, crash safety, pruning, verification, async."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from fusiontrain.checkpoint.layout import CheckpointError, latest_complete, list_complete
from fusiontrain.checkpoint.manager import CheckpointManager, verify
from fusiontrain.checkpoint.optimizer_state import OptimizerState

BASE = {"family": "mllama", "folders": {"hf_mllama": "/base"}}
PRINT = {"m/model.safetensors": {"size": 10, "sha256": "ab" * 32}}


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _parts(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {"fusion": {name: p.detach() for name, p in model.named_parameters()}}


def _save(manager: CheckpointManager, step: int, model, optimizer) -> None:
    manager.save(
        step,
        model_parts=_parts(model),
        optimizer=OptimizerState(model, optimizer),
        rank_state={"loader": {"position": step}, "rng": {}},
        global_state={"step": step, "tokens_seen": 10 * step},
    )


def test_save_then_load_restores_weights_optimizer_and_state(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT)
    model, optimizer = _model_and_optimizer(0)
    _save(manager, 3, model, optimizer)
    step, path = latest_complete(tmp_path)
    assert step == 3 and path.name == "step_3" and (path / "manifest.json").is_file()
    other, other_optimizer = _model_and_optimizer(1)
    state, rank_state = manager.load(path, model_parts=_parts(other), optimizer=OptimizerState(other, other_optimizer))
    assert state == {"step": 3, "tokens_seen": 30} and rank_state["loader"] == {"position": 3}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), other_optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_a_crash_inside_the_writer_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT)
    model, optimizer = _model_and_optimizer(0)
    _save(manager, 2, model, optimizer)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}

    def explode(self, plan, planner):  # noqa: ANN001
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", explode)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(BaseException) as failure:  # DCP raises CheckpointException, a BaseException
        _save(manager, 4, model, optimizer)
    assert "disk full" in str(failure.value) or "disk full" in repr(failure.value.__dict__)
    monkeypatch.undo()
    assert [step for step, _ in list_complete(tmp_path)] == [2]
    assert latest_complete(tmp_path)[0] == 2
    fresh, fresh_optimizer = _model_and_optimizer(5)
    manager.load(manager.resolve("auto"), model_parts=_parts(fresh), optimizer=OptimizerState(fresh, fresh_optimizer))
    assert all(torch.equal(p, saved[n]) for n, p in fresh.named_parameters())
    _save(manager, 4, model, optimizer)  # the next save clears the abandoned folder
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keep_last_n_prunes_older_checkpoints(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT, keep_last_n=2)
    model, optimizer = _model_and_optimizer(0)
    for step in (1, 2, 3, 4):
        _save(manager, step, model, optimizer)
    assert [step for step, _ in list_complete(tmp_path)] == [3, 4]


def test_async_save_completes_on_wait(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT, async_save=True)
    model, optimizer = _model_and_optimizer(0)
    _save(manager, 1, model, optimizer)
    manager.wait()
    assert latest_complete(tmp_path)[0] == 1
    fresh, fresh_optimizer = _model_and_optimizer(3)
    manager.load(manager.resolve("auto"), model_parts=_parts(fresh), optimizer=OptimizerState(fresh, fresh_optimizer))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_missing_or_damaged_checkpoints_are_named_and_nothing_is_loaded(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT)
    with pytest.raises(CheckpointError, match="nowhere.*does not exist"):
        manager.resolve(str(tmp_path / "nowhere"))
    assert manager.resolve("auto") is None  # nothing yet: start fresh
    model, optimizer = _model_and_optimizer(0)
    _save(manager, 5, model, optimizer)
    path = latest_complete(tmp_path)[1]
    data = next((path / "fusion").glob("*.safetensors"))
    data.write_bytes(data.read_bytes()[:10])  # truncated
    with pytest.raises(CheckpointError, match=r"step_5.*fusion/.*truncated"):
        manager.resolve(str(path))
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="step_5"):
        verify(path)


def test_a_different_base_is_refused_unless_allowed(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    _save(CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT), 1, model, optimizer)
    changed = {"m/model.safetensors": {"size": 10, "sha256": "cd" * 32}}
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=changed)
    path = manager.resolve("auto")
    with pytest.raises(CheckpointError, match="other base weights.*allow_base_mismatch"):
        manager.load(path, model_parts=_parts(model), optimizer=OptimizerState(model, optimizer))
    manager.load(path, model_parts=_parts(model), optimizer=OptimizerState(model, optimizer), allow_base_mismatch=True)
    assert json.loads((path / "manifest.json").read_text())["fingerprint"] == PRINT


def test_the_part_reader_reads_one_tensor_loads_a_part_and_names_what_does_not_fit(tmp_path: Path) -> None:
    from fusiontrain.checkpoint.parts import CheckpointPart, PartMismatch, load_part, load_parts_into_model

    model, optimizer = _model_and_optimizer(0)
    _save(CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT), 4, model, optimizer)
    path = latest_complete(tmp_path)[1]
    part = CheckpointPart(path, "fusion")
    saved = dict(model.named_parameters())
    assert sorted(part.names()) == sorted(saved) and "0.weight" in part and "nope" not in part
    assert part.shape("0.weight") == (4, 4) and part.dtype("0.weight") == torch.float32
    for name, param in saved.items():  # one tensor at a time, as saved
        assert torch.equal(part.read(name), param.detach()), name

    # a whole part into tensors of another dtype (cast), through the trainer's entry point too
    target = {name: torch.zeros(p.shape, dtype=torch.bfloat16) for name, p in saved.items()}
    load_part(path, "fusion", target)
    assert all(torch.equal(target[name], p.detach().to(torch.bfloat16)) for name, p in saved.items())
    fresh, _ = _model_and_optimizer(7)
    load_parts_into_model(path, ["fusion"], fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))

    with pytest.raises(PartMismatch, match=r"missing \['extra'\], unexpected \[\]"):
        part.load({**{name: torch.empty(p.shape) for name, p in saved.items()}, "extra": torch.empty(1)})
    with pytest.raises(PartMismatch, match=r"missing \[\], unexpected \['1.bias'\]"):
        part.load({name: torch.empty(p.shape) for name, p in saved.items() if name != "1.bias"})
    with pytest.raises(PartMismatch, match=r"fusion/0.weight has shape \(4, 4\), the model's parameter \(4, 5\)"):
        part.check_shapes({**{name: p.shape for name, p in saved.items()}, "0.weight": (4, 5)}, whole=False)
    part.check_shapes({"extra": (1,), **{name: p.shape for name, p in saved.items()}}, whole=False)  # a subset is fine
    with pytest.raises(PartMismatch, match=r"unexpected \['0.bias', '0.weight'\]"):
        load_parts_into_model(path, ["fusion"], torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(4, 2)))
    with pytest.raises(CheckpointError, match="no 'decoder' part"):
        load_part(path, "decoder", target)
    for shard in (path / "fusion").glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(CheckpointError, match=r"step_4: fusion/ holds no DCP checkpoint"):
        CheckpointPart(path, "fusion")


def test_checkpoint_writes_get_a_gloo_group_of_their_own_whatever_the_device(monkeypatch) -> None:
    """A CUDA run's default group is nccl, and DCP's async save refuses a group without a CPU
    backend: checkpoint writing runs on a gloo group of its own (also on a CPU run, so that a save
    finishing in the background never shares a group with the training loop)."""
    import torch.distributed as dist

    from fusiontrain.parallel.distributed import checkpoint_group, init_distributed, process_group_backends, shutdown
    from tests.helpers.launch import free_port

    assert process_group_backends("cuda") == ("nccl", "gloo")
    assert process_group_backends("cpu") == ("gloo", "gloo")
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    init_distributed(timeout_s=60)
    try:
        group = checkpoint_group()
        assert group is not None and group is not dist.group.WORLD
        assert dist.get_backend(group) == "gloo"
        assert torch.device("cpu") in group._device_types  # what dcp.async_save asks of its group
    finally:
        shutdown()
    assert checkpoint_group() is None


def test_a_world_of_one_outside_a_launcher_binds_no_port_and_forms_again(monkeypatch) -> None:
    """Without a launcher's variables the process forms a world of one on a store of its own (no
    port to choose, which another process could take before the bind), leaves the environment
    as it was, and can form it again after a shutdown (a benchmark's several Trainers)."""
    import torch.distributed as dist

    from fusiontrain.parallel.distributed import checkpoint_group, init_distributed, shutdown

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for _ in range(2):
        context = init_distributed(timeout_s=60)
        try:
            assert (context.rank, context.world_size, context.backend) == (0, 1, "gloo")
            value = torch.tensor([3.0])
            dist.all_reduce(value)
            dist.all_reduce(value, group=checkpoint_group())
            assert value.item() == 3.0
            assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
        finally:
            shutdown()


def test_manifests_are_complete_when_a_rank_lists_wrong_and_resume_splits_the_checksums(tmp_path: Path) -> None:
    """2 gloo ranks save a sharded model and its optimizer (synchronously, then asynchronously)
    while rank 1's directory listings miss every other file: the manifest is the gather of what
    each rank wrote, so it names every file on disk and the checkpoint verifies. Resuming then
    reads each file's checksum on one rank only, every rank its share."""
    from tests.helpers.launch import REPO_ROOT, run_world

    run_world([str(REPO_ROOT / "tests" / "helpers" / "checkpoint_ranks.py"), str(tmp_path)], nproc=2, timeout=180)
    result = json.loads((tmp_path / "result.json").read_text())
    for step in ("1", "2"):
        folder = tmp_path / "checkpoints" / f"step_{step}"
        on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
        assert result[step]["files"] == on_disk, step
        assert sum(name.endswith(".safetensors") for name in on_disk) >= 4  # both ranks' shards of 2 folders
        assert result[step]["verdict"] == "intact", result[step]["verdict"]
    assert result["resolved"] == str(tmp_path / "checkpoints" / "step_2")
    rank0, rank1 = (set(names) for names in result["hashed"])
    assert rank0 and rank1 and not rank0 & rank1
    assert rank0 | rank1 == set(result["2"]["files"])


def test_checksums_on_several_processes_equal_one_reader(tmp_path: Path) -> None:
    from fusiontrain.checkpoint.layout import checksum, checksums_of

    paths = []
    for index in range(5):
        path = tmp_path / f"f{index}.bin"
        path.write_bytes(bytes([index]) * (1000 + index))
        paths.append(path)
    assert checksums_of(paths, workers=3) == [checksum(path) for path in paths] == checksums_of(paths)


def test_skip_counts_are_saved_by_reason_and_older_positional_counts_still_load() -> None:
    """The trainer's checkpointed skip counts: by reason name (a reason added later leaves the
    others in place), or the positional list of older checkpoints; an unknown reason, or a list of
    another length, is refused naming the cause."""
    from fusiontrain.data.loader import SKIP_REASONS
    from fusiontrain.train.trainer import skip_counts

    by_name = {"too_long": 3, "missing_image": 1}
    counts = skip_counts(by_name)
    assert counts == [by_name.get(reason, 0) for reason in SKIP_REASONS] and sum(counts) == 4
    positional = list(range(len(SKIP_REASONS)))
    assert skip_counts(positional) == positional
    with pytest.raises(ValueError, match="does not know: \\['from_a_later_version'\\]"):
        skip_counts({"from_a_later_version": 2})
    with pytest.raises(ValueError, match="counts 2 skip reasons by position"):
        skip_counts([1, 2])

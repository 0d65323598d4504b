"""Checkpoints hold safetensors and JSON only and are never unpickled; their manifest records
every file's size and checksum; damaged checkpoints are refused or skipped; ``verify`` reports them."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.layout import CheckpointError, UnsafeCheckpoint, list_complete
from fusiontrain.checkpoint.manager import CheckpointManager, verify
from fusiontrain.checkpoint.optimizer_state import OptimizerState
from fusiontrain.cli import main as cli_main
from tests.helpers.launch import REPO_ROOT, run_commands
from tests.test_checkpoint import _model_and_optimizer

BASE = {"family": "mllama", "folders": {"hf_mllama": "/base"}}
PRINT = {"m/model.safetensors": {"size": 10, "sha256": "ab" * 32}}


class _WritesAFile:
    """Unpickling this runs ``open(path, "w")``: it creates the marker file (no os.system needed)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def _save(manager: CheckpointManager, step: int, model, optimizer) -> Path:
    manager.save(
        step,
        model_parts={"fusion": {name: p.detach() for name, p in model.named_parameters()}},
        optimizer=OptimizerState(model, optimizer),
        rank_state={"loader": {"position": step}, "rng": {}},
        global_state={"step": step},
    )
    return layout.checkpoint_dir(manager.output_dir, step)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _shard(checkpoint: Path, part: str = "fusion") -> Path:
    return next((checkpoint / part).glob("*.safetensors"))


# -- formats -------------------------------------------------------------------------------------------


def test_a_checkpoint_holds_only_safetensors_and_json_all_recorded_in_the_manifest(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    path = _save(CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT), 2, model, optimizer)
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert all(name.endswith((".safetensors", ".json")) for name in files), files
    assert not any(Path(name).name == ".metadata" for name in files)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert sorted(manifest["files"]) == [name for name in files if name != "manifest.json"]
    for name, entry in manifest["files"].items():
        assert entry == {"size": (path / name).stat().st_size, "sha256": layout.checksum(path / name)}
    skeleton = json.loads((path / "train_state" / "optimizer" / "optimizer.json").read_text())
    assert skeleton["param_groups"][0]["lr"] == 0.1 and skeleton["state"]["0.weight"]["exp_avg"] == {"__tensor__": "state/0.weight/exp_avg"}


# -- no pickle -------------------------------------------------------------------------------------------


def _plant_pickle(folder: Path, marker: Path) -> None:
    """A DCP-style ``.metadata`` whose unpickling would create ``marker``."""
    (folder / ".metadata").write_bytes(pickle.dumps(_WritesAFile(marker)))


def test_the_crafted_pickle_really_writes_its_marker_when_unpickled(tmp_path: Path) -> None:
    """The test's weapon works: unpickling it (here, on purpose) creates the file."""
    probe = tmp_path / "probe"
    _plant_pickle(tmp_path, probe)
    pickle.loads((tmp_path / ".metadata").read_bytes()).close()
    assert probe.is_file()


@pytest.fixture
def poisoned(tmp_path: Path) -> tuple[Path, Path, Path, CheckpointManager]:
    """(a current checkpoint with a pickle planted in its fusion part, an older-layout checkpoint
    (manifest version 1, a pickled .metadata), the marker file, the manager)."""
    marker = tmp_path / "PWNED"
    manager = CheckpointManager(tmp_path / "run", base=BASE, fingerprint=PRINT)
    model, optimizer = _model_and_optimizer(0)
    planted = _save(manager, 2, model, optimizer)
    _plant_pickle(planted / "fusion", marker)
    old = layout.checkpoint_dir(tmp_path / "old_run", 1)
    (old / "fusion").mkdir(parents=True)
    _plant_pickle(old / "fusion", marker)
    (old / "fusion" / "__0_0.distcp").write_bytes(b"\0" * 64)
    (old / "manifest.json").write_text(json.dumps({"format": "fusiontrain-checkpoint", "version": 1, "step": 1,
                                                   "parts": ["fusion"], "base": BASE}))
    return planted, old, marker, manager


def test_resume_refuses_a_pickle_and_never_unpickles_it(poisoned, caplog) -> None:
    planted, old, marker, manager = poisoned
    for path in (planted, old):
        with pytest.raises(UnsafeCheckpoint, match=r"\.metadata is a pickle.*never unpickles"):
            manager.resolve(str(path))
        with pytest.raises(UnsafeCheckpoint):
            verify(path)
    with caplog.at_level(logging.WARNING):
        assert manager.resolve("auto") is None  # the only checkpoint is unsafe: skipped, said why
    assert "skipping checkpoint" in caplog.text and "pickle" in caplog.text
    assert list_complete(manager.output_dir) == []
    assert not marker.exists()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """``python -m fusiontrain ARGV`` as a process of its own (forked from the zygote, as
    ``python`` would start it); its ``stdout`` holds its error output too."""
    (done,) = run_commands([[sys.executable, "-m", "fusiontrain", *argv]], timeout=120, fork=True, check=False)
    return done


def _cli_here(capsys: pytest.CaptureFixture, *argv: str) -> subprocess.CompletedProcess:
    """The command line's ``main`` in this process (what ``python -m fusiontrain`` runs, less an
    interpreter start of about 3 CPU-s), with its exit code and captured output."""
    from fusiontrain.cli import main as cli_main

    capsys.readouterr()
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["fusiontrain", *argv], code, out, err)


def test_export_generate_and_verify_refuse_a_pickle_from_the_command_line(poisoned, tmp_path: Path, capsys) -> None:
    """Each command refuses both poisoned checkpoints with its exit code, naming the pickle; one
    through a real ``python -m fusiontrain`` process (the code reaches the shell), the others
    through the same ``main`` in this process."""
    planted, old, marker, _ = poisoned
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    export = _cli("export", "--checkpoint", str(planted), "--out", str(tmp_path / "out"))
    assert export.returncode == 2 and "pickle" in export.stdout and str(planted) in export.stdout, export.stdout
    for path in (planted, old):
        export = _cli_here(capsys, "export", "--checkpoint", str(path), "--out", str(tmp_path / "out"))
        assert export.returncode == 2 and "pickle" in export.stderr and str(path) in export.stderr, export.stderr
        generate = _cli_here(capsys, "generate", "--model", str(path), "--image", str(image), "--prompt", "<|image|>hi")
        assert generate.returncode == 2 and "pickle" in generate.stderr, generate.stderr
        checked = _cli_here(capsys, "verify", str(path))
        assert checked.returncode == 1 and "DAMAGED" in checked.stdout and "pickle" in checked.stdout, checked.stdout
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_fusion_init_refuses_a_pickle(poisoned) -> None:
    from fusiontrain.checkpoint.parts import load_part

    planted, old, marker, _ = poisoned
    for path in (planted, old):
        with pytest.raises(UnsafeCheckpoint, match="pickle"):
            load_part(path, "fusion", {"0.weight": torch.zeros(4, 4)})
    assert not marker.exists()


def test_any_file_other_than_json_or_safetensors_is_refused(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT)
    path = _save(manager, 1, model, optimizer)
    torch.save({"x": 1}, path / "train_state" / "extra.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"train_state/extra.pt is neither JSON nor safetensors"):
        manager.resolve(str(path))


# -- integrity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra"])
def test_auto_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path, damage: str, caplog) -> None:
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT, keep_last_n=0)
    model, optimizer = _model_and_optimizer(0)
    for step in (2, 4):
        _save(manager, step, model, optimizer)
    newest = layout.checkpoint_dir(tmp_path, 4)
    shard = _shard(newest)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif damage == "flip":  # same size: only the checksum sees it
        _flip_a_byte(shard)
    elif damage == "delete":
        shard.unlink()
    else:
        (newest / "fusion" / "stray.safetensors").write_bytes(shard.read_bytes())
    with caplog.at_level(logging.WARNING):
        assert manager.resolve("auto") == layout.checkpoint_dir(tmp_path, 2)
    assert "skipping checkpoint" in caplog.text and "step_4" in caplog.text
    with pytest.raises(CheckpointError, match="step_4 is damaged"):
        manager.resolve(str(newest))


def test_keep_last_n_never_deletes_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT, keep_last_n=0)
    for step in (2, 4, 6):
        _save(manager, step, model, optimizer)
    _flip_a_byte(_shard(layout.checkpoint_dir(tmp_path, 6)))  # complete by sizes, damaged by checksum
    pruning = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT, keep_last_n=1)
    _save(pruning, 3, model, optimizer)  # a later run that saves at other steps
    assert [step for step, _ in list_complete(tmp_path)] == [3, 4, 6]  # 4 is the newest intact one


def test_verify_command_reports_each_checkpoint_and_exits_non_zero_on_damage(tmp_path: Path, capsys) -> None:
    model, optimizer = _model_and_optimizer(0)
    manager = CheckpointManager(tmp_path, base=BASE, fingerprint=PRINT)
    for step in (1, 2):
        _save(manager, step, model, optimizer)
    assert cli_main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step_1: intact" in out and "step_2: intact" in out and "newest intact: step_2" in out
    _flip_a_byte(_shard(layout.checkpoint_dir(tmp_path, 2), "fusion"))
    assert cli_main(["verify", str(tmp_path), "--sizes-only"]) == 0  # sizes alone cannot see a flipped byte
    capsys.readouterr()
    assert cli_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "step_2: DAMAGED" in out and "sha256 differs" in out and "newest intact: step_1" in out
    assert cli_main(["verify", str(layout.checkpoint_dir(tmp_path, 1))]) == 0
    assert cli_main(["verify", str(layout.checkpoint_dir(tmp_path, 2))]) == 1
    shutil.rmtree(layout.checkpoint_dir(tmp_path, 1))
    layout.checkpoint_dir(tmp_path, 2).joinpath("manifest.json").unlink()
    assert cli_main(["verify", str(tmp_path)]) == 1  # nothing intact
    assert "no manifest.json" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path / "nowhere")]) == 2


def test_train_refuses_to_resume_from_a_pickle(poisoned, tiny_mllama_dir: Path, tmp_path: Path) -> None:
    """``python -m fusiontrain train checkpoint.resume=<path>``, one plain process."""
    planted, old, marker, _ = poisoned
    config = str(REPO_ROOT / "configs" / "tiny.yaml")
    for path in (planted, old):
        train = _cli("train", "--config", config, f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={tmp_path / 'train'}",
                     "max_steps=1", "logging.every_n_steps=0", "eval.every_n_steps=0", "data.num_workers=0",
                     f"checkpoint.resume={path}")
        assert train.returncode != 0 and "pickle" in train.stdout and "never unpickles" in train.stdout, train.stdout[-2000:]
    assert not marker.exists()

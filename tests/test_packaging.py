"""The built wheel: it ships the package and its data files (the demo's config), nothing from
tests/, and an installed copy finds the demo's config from any directory, away from the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run by the installed copy, in a directory outside the repo, with only that copy on PYTHONPATH:
# resolves the demo's config the way `python -m fusiontrain demo` does and loads it, with the
# demo's overrides, through the real config loader. Prints what it found as JSON.
INSTALLED_CHECK = """
import json, sys
from pathlib import Path

import fusiontrain
from fusiontrain.config import load_config
from fusiontrain.demo import KILL_AFTER_CHECKPOINT, demo_config, training_overrides

out = Path("demo_output")
base = out / "tiny_mllama"
base.mkdir(parents=True)  # what the demo writes first; the config loader checks the folder exists
with demo_config() as path:
    config = load_config(path, training_overrides(base, out))
    print(json.dumps({
        "package": fusiontrain.__file__,
        "config": str(Path(path).resolve()),
        "max_steps": config.max_steps,
        "checkpoint_every": config.checkpoint.every_n_steps,
        "kill_after": KILL_AFTER_CHECKPOINT,
        "output_dir": str(Path(config.output_dir).resolve()),
        "train_path": str(Path(config.data.train.path).resolve()),
        "hf_mllama": str(Path(config.model.hf_mllama).resolve()),
    }))
"""


def _pip(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, install folder): a wheel built offline from a copy of the sources (so no build/ or
    egg-info lands in the repo), installed with ``pip install --target`` (no dependencies)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "fusiontrain", source / "fusiontrain", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist, site = root / "dist", root / "site"
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(source), cwd=root)
    (wheel,) = dist.glob("fusiontrain-*.whl")
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel), cwd=root)
    return wheel, site


def test_wheel_holds_the_package_and_its_data_only(built: tuple[Path, Path]) -> None:
    wheel, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"fusiontrain", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "fusiontrain/demo.yaml" in names
    assert "fusiontrain/tiny.py" in names  # the public helper behind `make-tiny` and the demo
    assert not [name for name in names if name.startswith("tests/") or "/tests/" in name]


def test_installed_copy_resolves_the_demo_config_from_another_directory(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    _, site = built
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    site = site.resolve()
    assert Path(found["package"]).resolve().is_relative_to(site), found  # not the repo's copy
    assert Path(found["config"]) == site / "fusiontrain" / "demo.yaml"
    # The demo's outputs land under the working directory, not next to the package.
    assert Path(found["output_dir"]) == elsewhere.resolve() / "demo_output" / "run"
    assert Path(found["train_path"]) == elsewhere.resolve() / "demo_output" / "train" / "captions.jsonl"
    assert Path(found["hf_mllama"]) == elsewhere.resolve() / "demo_output" / "tiny_mllama"
    # The SIGKILL waits for a checkpoint the run actually writes, before it ends.
    assert found["kill_after"] % found["checkpoint_every"] == 0 and found["kill_after"] < found["max_steps"]

    cli = subprocess.run(
        [sys.executable, "-m", "fusiontrain", "demo", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and "--output-dir" in cli.stdout, cli.stderr

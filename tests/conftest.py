"""Shared pytest fixtures: tiny Hugging Face checkpoints saved once per test session, and a one-rank
process group with its device mesh."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fusiontrain import tiny
from tests.helpers.strict_json import non_strict_lines

pytest_plugins = ["tests.helpers.cpu_times"]  # pytest --cpu-times N: the tests that cost the most CPU

# Under pytest-xdist (`make test` runs 2 workers) the workers share the cores: each takes its share
# of intra-op threads, so that they do not oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


# The tiny HF folders every test may ask for by name, saved once per test session (per xdist
# worker): fixture name -> (the fusiontrain.tiny function that writes it, what it holds).
TINY_FOLDERS = {
    "tiny_mllama_dir": (tiny.save_tiny_mllama, "a tiny Mllama (non-zero gates, one safetensors file, tokenizer, processor)"),
    "tiny_llama_dir": (tiny.save_tiny_llama, "a tiny Llama decoder and the tiny tokenizer"),
    "tiny_clip_dir": (tiny.save_tiny_clip_vision, "a tiny CLIP vision tower and its PIL image processor"),
    "tiny_siglip_dir": (tiny.save_tiny_siglip_vision, "a tiny SigLIP vision tower and its PIL image processor"),
    "tiny_qwen3_dir": (tiny.save_tiny_qwen3, "a tiny Qwen3 decoder (head_dim 32, perturbed q/k norms, tied LM head)"),
    "tiny_siglip2_naflex_dir": (
        tiny.save_tiny_siglip2_naflex,
        "a tiny SigLIP2 NaFlex vision tower (4 px patches, at most 16) and its PIL processor",
    ),
    "tiny_whisper_dir": (
        tiny.save_tiny_whisper,
        "a tiny WhisperModel (16 mel bins, a 1 s window of 100 frames) and its WhisperFeatureExtractor",
    ),
}


def _tiny_folder_fixture(name: str, save: Callable[[Path], tuple[Path, object]], holds: str) -> Callable:
    def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
        path, _ = save(tmp_path_factory.mktemp(name.removesuffix("_dir")))
        return path

    folder.__doc__ = f"Folder with {holds}."
    return pytest.fixture(scope="session", name=name)(folder)


for _name, (_save, _holds) in TINY_FOLDERS.items():
    globals()[_name] = _tiny_folder_fixture(_name, _save, _holds)


@pytest.fixture(scope="session", autouse=True)
def metrics_files_are_strict_json(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the session, every ``metrics.jsonl`` this worker's tests wrote (under its temporary
    root, shared runs included) must parse as strict JSON: a non-finite value is ``null`` plus a
    ``nonfinite`` flag, never ``NaN`` / ``Infinity``."""
    yield
    root = tmp_path_factory.getbasetemp()
    _, problems = non_strict_lines(root)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the shared runs lie beside the workers' folders
        for done in (root.parent / "shared").glob("*.done"):  # finished ones only: others may be mid-write
            problems += non_strict_lines(done.with_suffix(""))[1]
    assert not problems, "metrics.jsonl lines a strict JSON parser refuses:\n" + "\n".join(problems[:20])


@pytest.fixture
def mesh() -> Iterator[DeviceMesh]:
    """A one-rank gloo process group in this process and its 1-D ``dp_shard`` mesh, torn down after
    the test (for single-process FSDP2 tests)."""
    assert not dist.is_initialized(), (
        "a process group is already initialized in the pytest process: a previous test leaked it (tests that "
        "need several ranks must start them with torchrun, see tests/helpers/launch.py)"
    )
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",))
    finally:
        dist.barrier()
        dist.destroy_process_group()


# The test files that take longest (about 40 s to 4 min each on 2 cores), longest first. `make
# test` hands whole files to its 2 xdist workers (`--dist loadfile`) in collection order, so these
# go first and the short files fill the end; otherwise one long file started last keeps one worker
# busy while the other idles. Only the order changes; the list may be stale without harm.
LONGEST_FILES = (
    "test_plan.py",
    "test_shipped_configs.py",
    "test_train.py",
    "test_resume.py",
    "test_elastic.py",
    "test_mixture_runs.py",
    "test_lora.py",
    "test_launch.py",
    "test_hangs.py",
    "test_flops.py",
    "test_nonfinite.py",
    "test_checkpoint_safety.py",
    "test_export.py",
    "test_inference.py",
    "test_precision.py",
    "test_encoder_families.py",
    "test_decoder_families.py",
    "test_qwen3_siglip2.py",
    "test_preemption.py",
)


# Files whose tests mostly launch multi-process training runs: marked ``slow``, so that
# ``make test-fast`` (``-m "not slow"``, under 3 minutes) leaves them out; ``make test`` and CI run
# everything.
SLOW_FILES = frozenset(
    {
        "test_plan.py",
        "test_gpu_scale.py",
        "test_shipped_configs.py",
        "test_train.py",
        "test_resume.py",
        "test_elastic.py",
        "test_preemption.py",
        "test_hangs.py",
        "test_streaming.py",
        "test_train_data.py",
        "test_qwen3_siglip2.py",
        "test_checkpoint_safety.py",
        "test_step_collectives.py",
        "test_nonfinite.py",
        "test_precision.py",
        "test_launch.py",
        "test_mixture_runs.py",
        "test_audio_vision_runs.py",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests of ``SLOW_FILES`` slow; run the files of ``LONGEST_FILES`` first, in its
    order (the rest keep theirs)."""
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))

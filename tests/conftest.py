"""Shared pytest fixtures: tiny Hugging Face checkpoints saved once per test session, and a one-rank
process group with its device mesh."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fusiontrain import tiny
from fusiontrain.parallel.distributed import free_port

# Under pytest-xdist (`make test` runs 2 workers) the workers share the cores: each takes its share
# of intra-op threads, so that they do not oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def tiny_mllama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny Mllama (non-zero gates, single safetensors file, tokenizer, processor)."""
    path, _ = tiny.save_tiny_mllama(tmp_path_factory.mktemp("tiny_mllama"))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny Llama decoder and the tiny tokenizer."""
    path, _ = tiny.save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny CLIP vision tower and its PIL image processor."""
    path, _ = tiny.save_tiny_clip_vision(tmp_path_factory.mktemp("tiny_clip"))
    return path


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny SigLIP vision tower and its PIL image processor."""
    path, _ = tiny.save_tiny_siglip_vision(tmp_path_factory.mktemp("tiny_siglip"))
    return path


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny Qwen3 decoder (head_dim 32, perturbed q/k norms, tied LM head) and the tiny tokenizer."""
    path, _ = tiny.save_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"))
    return path


@pytest.fixture(scope="session")
def tiny_siglip2_naflex_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny SigLIP2 NaFlex vision tower (4 px patches, at most 16) and its PIL processor."""
    path, _ = tiny.save_tiny_siglip2_naflex(tmp_path_factory.mktemp("tiny_siglip2_naflex"))
    return path


@pytest.fixture
def mesh() -> Iterator[DeviceMesh]:
    """A one-rank gloo process group in this process and its 1-D ``dp_shard`` mesh, torn down after
    the test (for single-process FSDP2 tests)."""
    assert not dist.is_initialized(), (
        "a process group is already initialized in the pytest process: a previous test leaked it (tests that "
        "need several ranks must start them with torchrun, see tests/helpers/launch.py)"
    )
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of ``LONGEST_FILES`` first, in its order; the rest keep theirs."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))

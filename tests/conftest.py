"""Shared pytest fixtures: tiny Hugging Face checkpoints saved once per test session, and a one-rank
process group with its device mesh."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fusiontrain import tiny
from fusiontrain.distributed import free_port


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

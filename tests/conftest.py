"""Shared pytest fixtures: tiny Hugging Face checkpoints saved once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusiontrain import tiny


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

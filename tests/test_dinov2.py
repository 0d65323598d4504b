"""The DINOv2 encoder family (``fusiontrain/families/dinov2.py``), with and without registers.

Each tiny HF tower and its PIL image processor are saved to a temporary folder, composed with the
tiny Llama through the registered families, and checked against the transformers model by the
shared checks of :mod:`tests.helpers.encoder_cases`. A DINOv2 image gives the class token, the
register tokens and the patches: ``1 + registers + (image_size // patch_size)**2`` tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusiontrain import tiny
from fusiontrain.families.dinov2 import DinoV2TowerEncoder
from tests.helpers.encoder_cases import (
    TOWER_KWARGS,
    EncoderCase,
    case_id,
    check_family_and_weights,
    check_fixed_size_tower_matches_hf,
    check_images_reach_only_later_text,
    check_meta_build_has_no_unknown_buffers,
    check_every_trained_parameter_gets_a_gradient,
    check_padding_slots_are_not_encoded,
    save_tower,
    save_towers,
)

PATCH = 14
PATCHES = (tiny.IMAGE_SIZE // PATCH) ** 2


def _save_dinov2(folder: Path, registers: int) -> Path:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    size = tiny.IMAGE_SIZE
    if registers:
        config = Dinov2WithRegistersConfig(image_size=size, patch_size=PATCH, num_register_tokens=registers, **TOWER_KWARGS)
        model = Dinov2WithRegistersModel(config)
    else:
        model = Dinov2Model(Dinov2Config(image_size=size, patch_size=PATCH, **TOWER_KWARGS))
    with torch.no_grad():  # HF inits cls / register / mask tokens to zeros or tiny values: make them matter
        for name, param in model.named_parameters():
            if name.startswith("embeddings.") and "patch_embeddings" not in name:
                param.normal_()
    processor = BitImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return save_tower(folder, model, processor)


CASES = [
    EncoderCase(
        name="dinov2",
        save=lambda folder: _save_dinov2(folder, registers=0),
        family="dinov2",
        model_type="dinov2",
        encoder_class=DinoV2TowerEncoder,
        blocks="encoder.tower.encoder.layer",
        tokens_per_image=1 + PATCHES,  # 1 + 4
    ),
    EncoderCase(
        name="dinov2_registers",
        save=lambda folder: _save_dinov2(folder, registers=2),
        family="dinov2",
        model_type="dinov2_with_registers",
        encoder_class=DinoV2TowerEncoder,
        blocks="encoder.tower.encoder.layer",
        tokens_per_image=1 + 2 + PATCHES,  # 1 + 2 + 4
    ),
]


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_towers(CASES, tmp_path_factory)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_family_resolves_and_weights_load(tiny_llama_dir: Path, tower_dirs: dict[str, Path], case: EncoderCase) -> None:
    check_family_and_weights(case, tiny_llama_dir, tower_dirs[case.name])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tower_matches_hf(tiny_llama_dir: Path, tower_dirs: dict[str, Path], case: EncoderCase) -> None:
    check_fixed_size_tower_matches_hf(case, tiny_llama_dir, tower_dirs[case.name])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_open_gates_images_reach_only_later_text(tiny_llama_dir: Path, tower_dirs: dict[str, Path], case: EncoderCase) -> None:
    check_images_reach_only_later_text(tiny_llama_dir, tower_dirs[case.name])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_meta_build_has_no_unknown_buffers(tower_dirs: dict[str, Path], case: EncoderCase) -> None:
    check_meta_build_has_no_unknown_buffers(case, tower_dirs[case.name])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_padding_slots_are_not_encoded(tiny_llama_dir: Path, tower_dirs: dict[str, Path], case: EncoderCase) -> None:
    check_padding_slots_are_not_encoded(case, tiny_llama_dir, tower_dirs[case.name])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_trained_parameter_gets_a_gradient(tiny_llama_dir: Path, tower_dirs: dict[str, Path], case: EncoderCase) -> None:
    check_every_trained_parameter_gets_a_gradient(tiny_llama_dir, tower_dirs[case.name])

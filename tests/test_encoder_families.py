"""Encoder families beyond CLIP / SigLIP: SigLIP2 fixed-resolution (read by the ``siglip``
family) and SigLIP2 NaFlex (packed variable-resolution).

Each tiny HF tower and its PIL image processor are saved to a temporary folder, composed with the
tiny Llama through the registered families, and checked against the transformers model by the
shared checks of :mod:`tests.helpers.encoder_cases`, plus NaFlex's own packing checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusiontrain import tiny
from fusiontrain.families.hf_tower import project_tokens
from fusiontrain.families.siglip2 import Siglip2NaflexTowerEncoder, siglip2_vision_config_from_dict
from fusiontrain.families.siglip2_image import NaflexImage
from fusiontrain.families.clip_siglip import HFVisionTowerEncoder
from tests.helpers.encoder_cases import (
    ATOL,
    TOWER_KWARGS,
    TOWER_WIDTH,
    EncoderCase,
    case_id,
    check_family_and_weights,
    check_fixed_size_tower_matches_hf,
    check_images_reach_only_later_text,
    check_meta_build_has_no_unknown_buffers,
    check_every_trained_parameter_gets_a_gradient,
    check_padding_slots_are_not_encoded,
    compose,
    config_of,
    encode_features,
    hf_processor,
    hf_tower,
    image_format,
    max_diff,
    random_images,
    save_tower,
    save_towers,
)

NAFLEX_PATCH, NAFLEX_MAX_PATCHES = 4, 16


def _save_siglip2_naflex(folder: Path) -> Path:
    from transformers import Siglip2ImageProcessorPil, Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    model = Siglip2VisionModel(Siglip2VisionConfig(patch_size=NAFLEX_PATCH, num_patches=NAFLEX_MAX_PATCHES, **TOWER_KWARGS))
    processor = Siglip2ImageProcessorPil(patch_size=NAFLEX_PATCH, max_num_patches=NAFLEX_MAX_PATCHES)
    return save_tower(folder, model, processor)


def _save_siglip2_fixed(folder: Path) -> Path:
    """What a fixed-resolution SigLIP2 checkpoint is in transformers: a SigLIP (v1 architecture)
    vision model with a SiglipImageProcessor (resize to a square, mean/std 0.5)."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    size = tiny.IMAGE_SIZE
    model = SiglipVisionModel(SiglipVisionConfig(image_size=size, patch_size=14, **TOWER_KWARGS))
    processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    return save_tower(folder, model, processor)


SIGLIP2_FIXED = EncoderCase(
    name="siglip2_fixed",
    save=_save_siglip2_fixed,
    family="siglip",
    model_type="siglip_vision_model",
    encoder_class=HFVisionTowerEncoder,
    blocks="encoder.tower.encoder.layers",
    tokens_per_image=(tiny.IMAGE_SIZE // 14) ** 2,  # patches only
    has_features=False,  # HFVisionTowerEncoder has no features(): the tower is run directly
)
SIGLIP2_NAFLEX = EncoderCase(
    name="siglip2_naflex",
    save=_save_siglip2_naflex,
    family="siglip2_naflex",
    model_type="siglip2_vision_model",
    encoder_class=Siglip2NaflexTowerEncoder,
    blocks="encoder.tower.encoder.layers",
    tokens_per_image=None,
)
CASES = [SIGLIP2_FIXED, SIGLIP2_NAFLEX]
FIXED_SIZE_CASES = [case for case in CASES if case.tokens_per_image is not None]


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_towers(CASES, tmp_path_factory)


# -- the shared checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_families_resolve_and_weights_load(tiny_llama_dir: Path, tower_dirs: dict[str, Path], case: EncoderCase) -> None:
    check_family_and_weights(case, tiny_llama_dir, tower_dirs[case.name])


@pytest.mark.parametrize("case", FIXED_SIZE_CASES, ids=case_id)
def test_fixed_size_tower_matches_hf(tiny_llama_dir: Path, tower_dirs: dict[str, Path], case: EncoderCase) -> None:
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


# -- SigLIP2 fixed-resolution is SigLIP, not NaFlex ------------------------------------------------------


def test_siglip2_fixed_resolution_is_the_siglip_family(tower_dirs: dict[str, Path]) -> None:
    config = config_of(tower_dirs[SIGLIP2_FIXED.name])
    assert config["model_type"] == "siglip_vision_model"
    with pytest.raises(ValueError, match="SigLIP2 NaFlex"):
        siglip2_vision_config_from_dict(config)


# -- NaFlex: variable-resolution images, packed ----------------------------------------------------------


def test_naflex_tower_matches_hf_and_packs(tiny_llama_dir: Path, tower_dirs: dict[str, Path]) -> None:
    folder = tower_dirs[SIGLIP2_NAFLEX.name]
    model, hf, processor = compose(tiny_llama_dir, folder), hf_tower(folder), hf_processor(folder)
    assert type(processor).__name__ == "Siglip2ImageProcessorPil"
    assert isinstance(model.encoder, Siglip2NaflexTowerEncoder)
    fmt = image_format(model)
    assert isinstance(fmt, NaflexImage) and fmt.image_size == 0 and fmt.max_tokens_per_image == NAFLEX_MAX_PATCHES
    fmt.check_processor(processor, folder)

    wide, tall = random_images(2, [(64, 16), (20, 44)])  # (width, height)
    a, b = fmt.process(processor, wide), fmt.process(processor, tall)
    n_a, n_b = fmt.num_tokens(a), fmt.num_tokens(b)
    assert n_a != n_b and 1 <= min(n_a, n_b) and max(n_a, n_b) <= NAFLEX_MAX_PATCHES
    assert a["spatial_shapes"].tolist() != b["spatial_shapes"].tolist()
    assert a["pixel_values"].shape == (NAFLEX_MAX_PATCHES, 3 * NAFLEX_PATCH**2)

    with torch.no_grad():
        references = []
        for image in (wide, tall):
            out = processor(images=[image], return_tensors="pt")
            references.append(
                hf(
                    pixel_values=out["pixel_values"],
                    pixel_attention_mask=out["pixel_attention_mask"],
                    spatial_shapes=out["spatial_shapes"],
                ).last_hidden_state[0]
            )
    ref_a, ref_b = references[0][:n_a], references[1][:n_b]

    # packed: a row with both images, a row with b alone (one padding slot that takes no columns)
    per_row = [[a, b], [b]]
    offsets, width = fmt.layout(per_row)
    assert offsets == [[0, n_a], [0]] and width == n_a + n_b
    features = encode_features(model, fmt, per_row)
    assert features.shape == (2, n_a + n_b, TOWER_WIDTH) and torch.isfinite(features).all()
    diffs = [
        max_diff(features[0, :n_a], ref_a),
        max_diff(features[0, n_a:], ref_b),
        max_diff(features[1, :n_b], ref_b),
    ]
    print(f"siglip2_naflex: max |ours - hf| = {max(diffs):.2e} (patches {n_a}, {n_b})")
    assert max(diffs) <= ATOL

    # each image alone gives the same columns as in the packed row
    alone_a = encode_features(model, fmt, [[a]])
    alone_b = encode_features(model, fmt, [[b]])
    assert alone_a.shape == (1, n_a, TOWER_WIDTH) and alone_b.shape == (1, n_b, TOWER_WIDTH)
    assert max_diff(features[0, :n_a], alone_a[0]) <= ATOL
    assert max_diff(features[0, n_a:], alone_b[0]) <= ATOL

    with torch.no_grad():
        projected = model.encoder(**fmt.collate(per_row))
    assert max_diff(projected, project_tokens(model.encoder.projection, features)) <= ATOL


def test_naflex_format_images() -> None:
    fmt = NaflexImage(patch_size=NAFLEX_PATCH, max_num_patches=12)
    generator = torch.Generator().manual_seed(0)
    counts = set()
    for _ in range(20):
        image = fmt.synthetic(generator, 0.3)
        fmt._check(image)
        counts.add(fmt.num_tokens(image))
    assert len(counts) > 3 and max(counts) <= 12
    worst = fmt.worst_case()
    fmt._check(worst)
    assert fmt.num_tokens(worst) == 12 and worst["spatial_shapes"].tolist() == [3, 4]
    assert fmt.num_tokens(fmt.blank()) == 1 and fmt.num_tokens(fmt.pad_slot()) == 1
    one, two = fmt.synthetic(generator, 0.0), fmt.synthetic(generator, 0.0)
    batch = fmt.collate([[one, two], [], [two]])
    n1, n2 = fmt.num_tokens(one), fmt.num_tokens(two)
    assert batch["pixel_values"].shape == (3, 2, 12, 3 * NAFLEX_PATCH**2)
    assert batch["token_index"].shape == (3, n1 + n2)
    assert batch["token_index"][0].tolist() == list(range(n1)) + list(range(12, 12 + n2))
    assert batch["token_index"][2, :n2].tolist() == list(range(n2)) and not batch["token_index"][2, n2:].any()
    assert batch["pixel_attention_mask"][1].sum(-1).tolist() == [1, 1]  # padding slots keep one patch
    assert fmt.collate([[], []]) is None

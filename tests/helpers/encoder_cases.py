"""Checks every encoder family's tests share, each parameterised by an :class:`EncoderCase`.

A case saves a tiny HF vision tower and its PIL image processor to a folder; the checks compose it
with the tiny Llama through the registered families and compare against the transformers model
loaded from the same folder. A family's test file declares its cases and calls these checks.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from fusiontrain import tiny
from fusiontrain.data.image_format import ImageFormat, ImageInput, encoder_mask_rows
from fusiontrain.families import encoder_family_for, model_family
from fusiontrain.families.hf_tower import project_tokens
from fusiontrain.models import compose_from_hf
from fusiontrain.modules.blocks import block_stacks
from tests.helpers.tiny_models import open_gates

ATOL = 1e-5
FUSION_INTERVAL = 2
TOWER_KWARGS: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
TOWER_WIDTH = TOWER_KWARGS["hidden_size"]


@dataclass(frozen=True)
class EncoderCase:
    """One tiny HF vision tower under test.

    Attributes:
        name: the test id, and the folder's name.
        save: saves the tower and its processor into the given folder and returns it.
        family: the encoder family its ``config.json`` must resolve to.
        model_type: the ``model_type`` its ``config.json`` has.
        encoder_class: the class of the encoder the family builds.
        blocks: the path of the tower's block stack in the composed model.
        tokens_per_image: tokens per image of a fixed-size tower; None when it varies (NaFlex).
        has_features: the encoder's ``features(**encoder_input)`` gives the tower's output (else the
            checks run the tower itself on the collated pixels).
    """

    name: str
    save: Callable[[Path], Path]
    family: str
    model_type: str
    encoder_class: type
    blocks: str
    tokens_per_image: int | None
    has_features: bool = True


def case_id(case: EncoderCase) -> str:
    return case.name


def save_towers(cases: Iterable[EncoderCase], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case's folder, by case name."""
    return {case.name: case.save(tmp_path_factory.mktemp(case.name)) for case in cases}


def save_tower(folder: Path, model: torch.nn.Module, processor: Any) -> Path:
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# -- small tools --------------------------------------------------------------------------------------


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def hf_tower(folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    assert AutoConfig.from_pretrained(folder).model_type  # resolvable
    return AutoModel.from_pretrained(folder).eval()


def hf_processor(folder: Path) -> Any:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def random_images(seed: int, sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """Random-noise RGB images of the given ``(width, height)``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
        for w, h in sizes
    ]


def compose(llama_dir: Path, tower_dir: Path) -> torch.nn.Module:
    return compose_from_hf(llama_dir, tower_dir, fusion_interval=FUSION_INTERVAL).eval()


def image_format(model: torch.nn.Module) -> ImageFormat:
    return model_family("composed").image_format(model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def encode_features(model: torch.nn.Module, fmt: ImageFormat, per_row: list[list[ImageInput]]) -> torch.Tensor:
    with torch.no_grad():
        return model.encoder.features(**fmt.collate(per_row))


# -- the shared checks --------------------------------------------------------------------------------


def check_family_and_weights(case: EncoderCase, llama_dir: Path, folder: Path) -> None:
    """The config resolves to the case's family; the composed model's tower holds exactly the HF
    tower's tensors; its block stack is found where the case says."""
    config = config_of(folder)
    assert config["model_type"] == case.model_type
    assert encoder_family_for(config).name == case.family
    model = compose(llama_dir, folder)
    assert isinstance(model.encoder, case.encoder_class)
    reference = hf_tower(folder).state_dict()
    ours = model.encoder.tower.state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    stacks = dict(block_stacks(model))
    assert case.blocks in stacks and stacks[case.blocks] is model.get_submodule(case.blocks)


def check_fixed_size_tower_matches_hf(case: EncoderCase, llama_dir: Path, folder: Path) -> None:
    """Images processed by the format and collated two to a row give, image by image, the HF
    tower's ``last_hidden_state`` (``tokens_per_image`` tokens each); the encoder projects them."""
    n = case.tokens_per_image
    assert n is not None, f"{case.name} is not a fixed-size tower"
    model, hf, processor = compose(llama_dir, folder), hf_tower(folder), hf_processor(folder)
    assert type(processor).__name__.endswith("Pil")
    fmt = image_format(model)
    size = tiny.IMAGE_SIZE
    assert fmt.max_tokens_per_image == n and fmt.image_size == size

    images = random_images(1, [(40, 30), (31, 50), (28, 28)])
    per_row = [[fmt.process(processor, images[0]), fmt.process(processor, images[1])], [fmt.process(processor, images[2])]]
    assert per_row[0][0]["pixel_values"].shape == (3, size, size)
    with torch.no_grad():
        reference = hf(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).last_hidden_state
        # every slot encoded, the padding one too (check_padding_slots_are_not_encoded covers the skip)
        encoder_input = {key: value for key, value in fmt.collate(per_row).items() if key != "image_slots"}
        if case.has_features:
            got = model.encoder.features(**encoder_input)
        else:
            pixels = encoder_input["pixel_values"]  # [b, i, 3, H, W]
            hidden = model.encoder.tower(pixel_values=pixels.flatten(0, 1)).last_hidden_state
            got = hidden.reshape(pixels.shape[0], -1, hidden.shape[-1])
        projected = model.encoder(**encoder_input)
    assert reference.shape == (3, n, TOWER_WIDTH)
    assert got.shape == (2, 2 * n, TOWER_WIDTH)
    diffs = [max_diff(got[0, :n], reference[0]), max_diff(got[0, n:], reference[1]), max_diff(got[1, :n], reference[2])]
    print(f"{case.name}: max |ours - hf| = {max(diffs):.2e}")
    assert max(diffs) <= ATOL
    assert projected.shape == (2, 2 * n, model.encoder.decoder_dim)
    assert max_diff(projected, project_tokens(model.encoder.projection, got)) <= ATOL


def image_tokens(model: torch.nn.Module, s: int, start: int, seed: int) -> torch.Tensor:
    """``[2, s]`` random text tokens with the image token at ``start`` in both rows."""
    tokens = torch.randint(0, tiny.TEXT_VOCAB_SIZE, (2, s), generator=torch.Generator().manual_seed(seed))
    tokens[:, start] = model.decoder.tok_embeddings.vocab_size  # the image token
    return tokens


def two_rows_of_images(
    fmt: ImageFormat, processor: Any, seed: int, sizes: list[tuple[int, int]], s: int, start: int
) -> tuple[list[list[ImageInput]], torch.Tensor, dict[str, torch.Tensor]]:
    """Three random images of ``sizes``, two in row 0 and one in row 1 (a padding slot), each seen
    from its image token on: ``(per_row, encoder_mask, encoder_input)``."""
    images = random_images(seed, sizes)
    per_row = [[fmt.process(processor, images[0]), fmt.process(processor, images[1])], [fmt.process(processor, images[2])]]
    mask, encoder_input = encoder_mask_rows(per_row, [[(start, s), (start + 2, s)], [(start, s)]], fmt, s)
    return per_row, mask, encoder_input


def check_images_reach_only_later_text(llama_dir: Path, folder: Path) -> None:
    """With open gates, images change the logits from their image token on, never before it, and
    different images change them differently."""
    model, processor = compose(llama_dir, folder), hf_processor(folder)
    open_gates(model)
    fmt = image_format(model)
    s, start = 10, 4
    tokens = image_tokens(model, s, start, seed=0)

    def run(seed: int) -> torch.Tensor:
        _, mask, encoder_input = two_rows_of_images(fmt, processor, seed, [(48, 20), (20, 36), (30, 30)], s, start)
        assert mask[:, :start].sum() == 0 and mask[:, start:].any(-1).all()
        with torch.no_grad():
            return model(tokens, encoder_input=encoder_input, encoder_mask=mask)

    with torch.no_grad():
        text_only = model(tokens)
    with_images, other_images = run(3), run(4)
    assert torch.isfinite(with_images).all()
    assert max_diff(with_images[:, :start], text_only[:, :start]) <= 1e-6
    for row in range(2):
        assert max_diff(with_images[row, start:], text_only[row, start:]) > 1e-3
        # random-noise images are alike after the towers' LayerNorms; ignored images would give ~0
        assert max_diff(with_images[row, start:], other_images[row, start:]) > 1e-4


def check_every_trained_parameter_gets_a_gradient(llama_dir: Path, folder: Path) -> None:
    """With the tower trained (``encoder_trainable``), one backward through two rows of images
    reaches every parameter that requires grad. A tower part that does not feed the embeddings (a
    pooling head, a mask token) must be declared never trained (the encoder's ``frozen_params``):
    else it sits in the optimizer with no gradient and no AdamW state, which a resume then finds
    missing."""
    model = compose_from_hf(llama_dir, folder, fusion_interval=FUSION_INTERVAL, encoder_trainable=True)
    open_gates(model)
    fmt, processor = image_format(model), hf_processor(folder)
    s, start = 10, 4
    _, mask, encoder_input = two_rows_of_images(fmt, processor, 3, [(48, 20), (20, 36), (30, 30)], s, start)
    model(image_tokens(model, s, start, seed=0), encoder_input=encoder_input, encoder_mask=mask).square().mean().backward()
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    assert any(name.startswith("encoder.tower.") for name in trained)
    missing = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert not missing, f"trained without a gradient: {missing}"


def check_meta_build_has_no_unknown_buffers(case: EncoderCase, folder: Path) -> None:
    """The family builds its encoder on the meta device and rebuilds its buffers after
    ``to_empty``; a buffer it does not know raises rather than being left uninitialised."""
    config = config_of(folder)
    family = encoder_family_for(config)
    with torch.device("meta"):
        encoder = family.build(config, decoder_dim=64)
    assert isinstance(encoder, case.encoder_class) and family.owns(encoder)
    encoder.to_empty(device="cpu")
    family.init_buffers(encoder)
    encoder.tower.register_buffer("stray", torch.zeros(1), persistent=False)
    with pytest.raises(RuntimeError, match="buffers"):
        family.init_buffers(encoder)


def check_padding_slots_are_not_encoded(case: EncoderCase, llama_dir: Path, folder: Path) -> None:
    """Rows of two and one images: the collated input lists the three real slots in
    ``image_slots``, the tower runs on those three images only, and the model's logits and its
    trainable parameters' gradients equal those of the same batch with every slot encoded (no
    token sees a padding slot). The columns each image owns (the format's layout) are the same
    either way; the columns the padding slot feeds when encoded (found by changing its pixels:
    a slot-strided layout gives it some, a packed one none) are zeros. The skip reads no index
    value: it runs on the meta device (a read would need the data; on an accelerator it would
    wait for the device), unless the HF tower itself reads its inputs there."""
    model, processor = compose(llama_dir, folder), hf_processor(folder)
    open_gates(model)
    fmt = image_format(model)
    s, start = 10, 3
    tokens = image_tokens(model, s, start, seed=1)
    per_row, mask, encoder_input = two_rows_of_images(fmt, processor, 5, [(40, 30), (31, 50), (28, 28)], s, start)
    assert encoder_input["image_slots"].tolist() == [0, 1, 2]
    every_slot = {key: value for key, value in encoder_input.items() if key != "image_slots"}

    first_block = model.get_submodule(case.blocks)[0]
    seen: list[int] = []
    hook = first_block.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable

    def run(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        embeddings = model.encoder(**inputs)
        logits = model(tokens, encoder_input=inputs, encoder_mask=mask)
        grads = torch.autograd.grad(logits.square().mean(), trainable, allow_unused=True)
        return embeddings.detach(), logits.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(trainable, grads)]

    try:
        skipped, padded = run(encoder_input), run(every_slot)
    finally:
        hook.remove()
    assert seen == [3, 3, 4, 4]  # real images only, then all four slots
    assert max_diff(skipped[1], padded[1]) <= ATOL
    assert any(g.abs().max() > 0 for g in padded[2])
    for got, want in zip(skipped[2], padded[2]):
        assert max_diff(got, want) <= 1e-4 * max(1.0, want.abs().max().item())
    offsets, _ = fmt.layout(per_row)
    for row, images in enumerate(per_row):
        for k, image in enumerate(images):
            owned = slice(offsets[row][k], offsets[row][k] + fmt.num_tokens(image))
            assert max_diff(skipped[0][row, owned], padded[0][row, owned]) <= ATOL
    changed = dict(every_slot, pixel_values=every_slot["pixel_values"].clone())
    changed["pixel_values"][1, 1] += 1.0  # row 1's padding slot
    with torch.no_grad():
        fed = (model.encoder(**changed)[1] - padded[0][1]).abs().amax(-1) > 0  # [s_e]: columns it feeds
    print(f"{case.name}: the padding slot feeds {int(fed.sum())} columns")
    assert skipped[0][1, fed].eq(0).all() and padded[0][1, fed].ne(0).any(-1).all()
    if getattr(model.encoder, "reads_input_values_on_host", False):  # the encoder declares it (SigLIP2 NaFlex's tower)
        return
    on_meta = copy.deepcopy(model.encoder).to("meta")
    out = on_meta(**{key: value.to("meta") for key, value in encoder_input.items()})
    assert out.device.type == "meta" and out.shape == skipped[0].shape

"""compose_from_hf: a HF Llama LM + a HF CLIP / SigLIP tower composed into a DeepFusionModel.

References are computed independently, with Hugging Face's own ``LlamaForCausalLM`` /
``CLIPVisionModel`` / ``SiglipVisionModel`` loaded from the same tiny folders (eager attention).
Gates start shut, so tests that must be able to fail open them first (test_open_gates_*).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fusiontrain.models import compose_from_hf
from fusiontrain.families.composed.compose import image_token_layout
from fusiontrain.families.clip_siglip import HFVisionTowerEncoder
from fusiontrain.modules import FusionLayer, TanhGate, get_fusion_params
from fusiontrain import tiny

NUM_LAYERS = 4  # tiny Llama
FUSION_INTERVAL = 2  # cross-attention fused into layers 1 and 3
TOKENS_PER_IMAGE = {"clip": 5, "siglip": 4}  # 28 px / 14 px patches: 4 patches (+ CLIP's class token)
ATOL = 1e-5


@pytest.fixture(params=["clip", "siglip"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tower_dir(request: pytest.FixtureRequest, family: str) -> Path:
    return request.getfixturevalue(f"tiny_{family}_dir")


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()


def _hf_tower(folder: Path, family: str):
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if family == "clip" else SiglipVisionModel
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


def _compose(llama_dir: Path, tower: Path, **kwargs):
    kwargs.setdefault("fusion_interval", FUSION_INTERVAL)
    return compose_from_hf(llama_dir, tower, **kwargs).eval()


def _tokens(b: int = 2, s: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, tiny.TEXT_VOCAB_SIZE, (b, s), generator=torch.Generator().manual_seed(seed))


def _pixels(b: int = 2, i: int = 2, seed: int = 1) -> torch.Tensor:
    size = tiny.IMAGE_SIZE
    return torch.randn(b, i, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _open_gates(model: torch.nn.Module) -> None:
    gates = [module for module in model.modules() if isinstance(module, TanhGate)]
    assert len(gates) == 2 * (NUM_LAYERS // FUSION_INTERVAL)
    for k, gate in enumerate(gates):
        gate.scale.fill_(0.4 + 0.1 * k)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- the composed model computes the base LM while its gates are shut ------------------------------


def test_shut_gates_equal_base_lm(tiny_llama_dir: Path, tower_dir: Path, family: str, hf_llama) -> None:
    model = _compose(tiny_llama_dir, tower_dir)
    tokens, pixels = _tokens(), _pixels()
    s_e = pixels.shape[1] * TOKENS_PER_IMAGE[family]
    with torch.no_grad():
        expected = hf_llama(input_ids=tokens).logits
        text_only = model(tokens)
        with_images = model(
            tokens,
            encoder_input={"pixel_values": pixels},
            encoder_mask=torch.ones(2, tokens.shape[1], s_e, dtype=torch.bool),
        )
    assert text_only.shape == expected.shape == (2, 10, tiny.TEXT_VOCAB_SIZE)
    assert _max_diff(text_only, expected) <= ATOL
    assert _max_diff(with_images, expected) <= ATOL


def test_image_token_reads_the_mean_row(tiny_llama_dir: Path, tiny_clip_dir: Path, hf_llama) -> None:
    """The image token (id vocab_size) embeds as the mean of the LM's rows: feeding HF that mean
    row as inputs_embeds at the same positions gives the same logits."""
    model = _compose(tiny_llama_dir, tiny_clip_dir)
    layout = image_token_layout(model)
    assert layout.image_token_id == tiny.IMAGE_TOKEN_ID == 128
    assert layout.tokens_per_image == TOKENS_PER_IMAGE["clip"]
    assert (layout.vocab_size, layout.fusion_vocab_size) == (128, 8)

    tokens = _tokens()
    tokens[0, 0] = tokens[1, 3] = layout.image_token_id
    with torch.no_grad():
        table = hf_llama.get_input_embeddings().weight
        embeds = table[tokens.clamp(max=table.shape[0] - 1)]
        embeds[tokens == layout.image_token_id] = table.mean(dim=0)
        expected = hf_llama(inputs_embeds=embeds).logits
        pixels = _pixels(i=1)
        got = model(
            tokens,
            encoder_input={"pixel_values": pixels},
            encoder_mask=torch.ones(2, 10, layout.tokens_per_image, dtype=torch.bool),
        )
    assert _max_diff(got, expected) <= ATOL


def test_open_gates_images_change_logits_and_unseeing_rows_do_not(
    tiny_llama_dir: Path, tower_dir: Path, family: str
) -> None:
    model = _compose(tiny_llama_dir, tower_dir)
    _open_gates(model)
    tokens, pixels = _tokens(), _pixels()
    s_e = pixels.shape[1] * TOKENS_PER_IMAGE[family]
    # sample 0: tokens 0-3 see nothing, tokens 4+ see both images; sample 1 sees nothing at all
    mask = torch.zeros(2, 10, s_e, dtype=torch.bool)
    mask[0, 4:] = True
    with torch.no_grad():
        text_only = model(tokens)
        with_images = model(tokens, encoder_input={"pixel_values": pixels}, encoder_mask=mask)
        other_images = model(tokens, encoder_input={"pixel_values": _pixels(seed=7)}, encoder_mask=mask)
    assert _max_diff(with_images[0, 4:], text_only[0, 4:]) > 1e-3
    assert _max_diff(with_images[0, 4:], other_images[0, 4:]) > 1e-3
    assert _max_diff(with_images[0, :4], text_only[0, :4]) <= 1e-6
    assert _max_diff(with_images[1], text_only[1]) <= 1e-6


# -- the encoder -----------------------------------------------------------------------------------


def test_tower_matches_hf_and_projection_follows(tiny_llama_dir: Path, tower_dir: Path, family: str) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    model = _compose(tiny_llama_dir, tower_dir)
    encoder = model.encoder
    assert isinstance(encoder, HFVisionTowerEncoder)
    assert encoder.tokens_per_image == TOKENS_PER_IMAGE[family]

    processor = AutoImageProcessor.from_pretrained(tower_dir)
    generator = torch.Generator().manual_seed(3)
    images = [
        Image.fromarray(torch.randint(0, 256, (40, 36, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(4)
    ]
    flat = processor(images=images, return_tensors="pt")["pixel_values"]  # [4, 3, 28, 28]
    assert flat.shape == (4, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)

    with torch.no_grad():
        expected = _hf_tower(tower_dir, family)(pixel_values=flat).last_hidden_state  # [4, n_tok, d_e]
        got = encoder.tower(pixel_values=flat).last_hidden_state
        assert expected.shape[1] == encoder.tokens_per_image
        assert _max_diff(got, expected) <= ATOL

        head = encoder.projection
        hidden = F.gelu(F.linear(expected, head.linear_1.weight, head.linear_1.bias))
        projected = F.linear(hidden, head.linear_2.weight, head.linear_2.bias)
        out = encoder(pixel_values=flat.reshape(2, 2, 3, 28, 28))  # two images per sample
        assert out.shape == (2, 2 * encoder.tokens_per_image, 64)
        assert _max_diff(out, projected.reshape(2, -1, 64)) <= ATOL
        one_each = encoder(pixel_values=flat)  # [b, 3, H, W]: one image per sample
        assert _max_diff(one_each, projected) <= ATOL

    with pytest.raises(ValueError, match=r"pixel_values must be"):
        encoder(pixel_values=torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("encoder_trainable", [False, True])
def test_frozen_tower_keeps_no_activations(tiny_llama_dir: Path, tiny_clip_dir: Path, encoder_trainable: bool) -> None:
    model = _compose(tiny_llama_dir, tiny_clip_dir, encoder_trainable=encoder_trainable)
    seen: list[bool] = []
    model.encoder.tower.register_forward_hook(lambda _m, _i, out: seen.append(out.last_hidden_state.requires_grad))
    out = model.encoder(pixel_values=_pixels())
    assert seen == [encoder_trainable]
    assert out.requires_grad  # the projection head trains


def test_full_and_legacy_tower_folders(tmp_path: Path, tiny_llama_dir: Path, tiny_clip_dir: Path) -> None:
    """A full CLIPModel folder (only vision_model.* used) and a vision-only folder in the old
    ``vision_model.``-prefixed layout both load the tower exactly."""
    from transformers import CLIPConfig, CLIPModel

    vision = tiny.tiny_clip_vision_config().to_dict()
    text = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    torch.manual_seed(5)
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "full")
    pixels = _pixels(b=3, i=1)[:, 0]
    with torch.no_grad():
        model = _compose(tiny_llama_dir, tmp_path / "full")
        assert _max_diff(
            model.encoder.tower(pixel_values=pixels).last_hidden_state,
            full.vision_model(pixel_values=pixels).last_hidden_state,
        ) <= ATOL

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(tiny_clip_dir / "config.json", legacy / "config.json")
    tensors = load_file(tiny_clip_dir / "model.safetensors")
    save_file({f"vision_model.{key}": value for key, value in tensors.items()}, legacy / "model.safetensors")
    with torch.no_grad():
        model = _compose(tiny_llama_dir, legacy)
        expected = _hf_tower(tiny_clip_dir, "clip")(pixel_values=pixels).last_hidden_state
        assert _max_diff(model.encoder.tower(pixel_values=pixels).last_hidden_state, expected) <= ATOL


# -- fusion parameters: which, what trains, initial values -----------------------------------------


@pytest.mark.parametrize(
    ("decoder_trainable", "encoder_trainable", "fusion_trainable"),
    [(False, False, True), (True, True, False), (True, False, True), (False, True, False)],
)
def test_fusion_params_and_trainable_flags(
    tiny_llama_dir: Path,
    tiny_siglip_dir: Path,
    decoder_trainable: bool,
    encoder_trainable: bool,
    fusion_trainable: bool,
) -> None:
    model = _compose(
        tiny_llama_dir,
        tiny_siglip_dir,
        decoder_trainable=decoder_trainable,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
    )
    names = [name for name, _ in model.named_parameters()]
    fused = [index for index in range(NUM_LAYERS) if (index + 1) % FUSION_INTERVAL == 0]
    expected = {
        name
        for name in names
        if any(name.startswith(f"decoder.layers.{index}.fusion_layer.") for index in fused)
        or name.startswith("encoder.projection.")
    } | {"decoder.tok_embeddings.fusion_embedding.weight"}
    # per cross-attention layer: 4 projections, q/k norms, 2 pre-norms, 3 MLP weights, 2 gates;
    # the head: 2 weights, 2 biases; one embedding table of new rows
    assert len(expected) == 2 * 13 + 4 + 1
    assert set(get_fusion_params(model)) == expected
    for name, param in model.named_parameters():
        if name in expected:
            want = fusion_trainable
        elif name.startswith("decoder."):
            want = decoder_trainable
        else:
            assert name.startswith("encoder.tower.")
            # SigLIP's pooling head does not feed last_hidden_state: never trained (no gradient, no AdamW state)
            want = encoder_trainable and not name.startswith("encoder.tower.head.")
        assert param.requires_grad == want, name
    if encoder_trainable:
        frozen = {name for name, param in model.named_parameters() if name.startswith("encoder.tower.") and not param.requires_grad}
        assert frozen and all(".head." in name for name in frozen)


@pytest.mark.parametrize("fusion_interval", [1, 2, 3, 4])
def test_fusion_layer_placement(tiny_llama_dir: Path, tiny_clip_dir: Path, fusion_interval: int) -> None:
    model = compose_from_hf(tiny_llama_dir, tiny_clip_dir, fusion_interval=fusion_interval)
    fused = [index for index, layer in enumerate(model.decoder.layers) if isinstance(layer, FusionLayer)]
    assert fused == [index for index in range(NUM_LAYERS) if (index + 1) % fusion_interval == 0]
    assert all(model.decoder.layers[index].fusion_first for index in fused)


def test_fusion_initial_values(tiny_llama_dir: Path, tiny_clip_dir: Path, hf_llama) -> None:
    model = _compose(tiny_llama_dir, tiny_clip_dir, seed=11)
    fusion = get_fusion_params(model)
    for name, param in fusion.items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(("ca_scale.scale", "mlp_scale.scale")):
            assert torch.equal(param, torch.zeros(1)), name
        elif name.endswith("norm.scale"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif leaf == "bias":
            assert torch.equal(param, torch.zeros_like(param)), name
        elif name == "decoder.tok_embeddings.fusion_embedding.weight":
            mean = hf_llama.get_input_embeddings().weight.mean(dim=0)
            assert torch.allclose(param, mean.expand_as(param), atol=1e-7)
        else:
            assert leaf == "weight" and param.dim() == 2, name
            assert abs(param.mean().item()) < 0.01 and 0.015 < param.std().item() < 0.025, name

    same = _compose(tiny_llama_dir, tiny_clip_dir, seed=11)
    other = _compose(tiny_llama_dir, tiny_clip_dir, seed=12)
    bf16 = _compose(tiny_llama_dir, tiny_clip_dir, seed=11, dtype=torch.bfloat16)
    for name, param in fusion.items():
        assert torch.equal(param, get_fusion_params(same)[name]), name
        if name != "decoder.tok_embeddings.fusion_embedding.weight":  # the mean of bf16 rows differs
            assert torch.equal(param.to(torch.bfloat16), get_fusion_params(bf16)[name]), name
    key = "decoder.layers.1.fusion_layer.attn.q_proj.weight"
    assert not torch.equal(fusion[key], get_fusion_params(other)[key])


@pytest.mark.parametrize(
    ("checkpointing", "offloading"),
    [("full", "none"), ("1", "none"), ("2", "none"), ("3", "none"), ("full", "checkpointed"), ("none", "all")],
)
def test_fusion_initial_values_do_not_depend_on_activation_checkpointing(
    mesh, tiny_llama_dir: Path, tiny_clip_dir: Path, checkpointing: str, offloading: str
) -> None:
    """The trainer's path (meta build, parallelize, allocate, load) gives every fusion parameter
    the bits of an unwrapped compose_from_hf with the same seed, whichever blocks are wrapped for
    checkpointing: with fusion layers at 1 and 3, k=2 wraps none of them, k=1 / full / 3 some."""
    from fusiontrain.families import TrainableFlags, model_family
    from fusiontrain.weights.hf_checkpoint import materialize
    from fusiontrain.parallel.fsdp import canonical_parameters, parallelize

    reference = get_fusion_params(_compose(tiny_llama_dir, tiny_clip_dir, seed=5))
    pretrained = model_family("composed").prepare(
        {"decoder": tiny_llama_dir, "encoder": tiny_clip_dir},
        {"fusion_interval": FUSION_INTERVAL, "fusion_vocab_size": 8},
        TrainableFlags(),
        seed=5,
    )
    model = pretrained.model
    parallelize(model, mesh, torch.device("cpu"), activation_checkpointing=checkpointing, activation_offloading=offloading)
    wrapped = [name for name in get_fusion_params(model) if "_checkpoint_wrapped_module" in name]
    assert bool(wrapped) == (checkpointing in ("full", "1", "3")), wrapped  # 3 wraps block 3, a fusion layer
    materialize(model)
    pretrained.load(canonical_parameters(model))
    fusion = {canonical_name: param.full_tensor() for canonical_name, param in _canonical(get_fusion_params(model)).items()}
    assert fusion.keys() == reference.keys()
    for name, param in reference.items():
        assert torch.equal(fusion[name], param), name


def _canonical(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from fusiontrain.parallel.fsdp import canonical_name

    return {canonical_name(name): param for name, param in params.items()}


def test_bfloat16(tiny_llama_dir: Path, tiny_siglip_dir: Path, hf_llama) -> None:
    model = _compose(tiny_llama_dir, tiny_siglip_dir, dtype=torch.bfloat16)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    tokens = _tokens()
    with torch.no_grad():
        logits = model(
            tokens,
            encoder_input={"pixel_values": _pixels()},
            encoder_mask=torch.ones(2, 10, 2 * TOKENS_PER_IMAGE["siglip"], dtype=torch.bool),
        )
        expected = hf_llama(input_ids=tokens).logits
    assert logits.dtype == torch.float32
    assert _max_diff(logits, expected) < 0.1  # bf16 rounding only


# -- buffers ---------------------------------------------------------------------------------------


def test_buffers_equal_a_normally_built_tower(tiny_llama_dir: Path, tower_dir: Path, family: str) -> None:
    from transformers import CLIPVisionModel, SiglipVisionModel

    model = _compose(tiny_llama_dir, tower_dir)
    if family == "clip":
        reference = CLIPVisionModel(tiny.tiny_clip_vision_config())
    else:
        reference = SiglipVisionModel(tiny.tiny_siglip_vision_config())
    expected = dict(reference.named_buffers())
    got = dict(model.encoder.tower.named_buffers())
    assert set(got) == set(expected) == {"embeddings.position_ids"}
    for name, buffer in expected.items():
        assert got[name].dtype == buffer.dtype and torch.equal(got[name], buffer), name
    # no buffers anywhere else: nothing of ours is left uninitialised by to_empty
    assert [name for name, _ in model.named_buffers()] == ["encoder.tower.embeddings.position_ids"]

    with torch.no_grad():
        model.encoder.tower.embeddings.position_ids.fill_(-7)
    model.encoder.init_buffers()
    assert torch.equal(model.encoder.tower.embeddings.position_ids, expected["embeddings.position_ids"])


# -- decoder checkpoints ---------------------------------------------------------------------------


def test_sharded_decoder_loads_like_single_file(
    tmp_path: Path, tiny_llama_dir: Path, tiny_clip_dir: Path, hf_llama
) -> None:
    hf_llama.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    single = _compose(tiny_llama_dir, tiny_clip_dir).state_dict()
    sharded = _compose(tmp_path / "sharded", tiny_clip_dir).state_dict()
    assert single.keys() == sharded.keys()
    for key, value in single.items():
        assert torch.equal(value, sharded[key]), key


def test_tied_embeddings(tmp_path: Path, tiny_clip_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    folder, _ = tiny.save_tiny_llama(
        tmp_path / "tied", config=tiny.tiny_llama_config(tie_word_embeddings=True), save_tokenizer=False
    )
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    reference = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = _compose(folder, tiny_clip_dir)
    decoder = model.decoder
    assert torch.equal(decoder.output.weight, decoder.tok_embeddings.weight)
    assert decoder.output.weight.data_ptr() != decoder.tok_embeddings.weight.data_ptr()  # not kept tied
    tokens = _tokens()
    with torch.no_grad():
        assert _max_diff(model(tokens), reference(input_ids=tokens).logits) <= ATOL


# -- errors ----------------------------------------------------------------------------------------


def test_clear_errors(tmp_path: Path, tiny_llama_dir: Path, tiny_clip_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compose_from_hf(tmp_path / "nowhere", tiny_clip_dir)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        compose_from_hf(tiny_llama_dir, tmp_path)
    with pytest.raises(ValueError, match=r"no decoder family reads .* 'clip_vision_model'; supported: .*'llama'.*'qwen3'"):
        compose_from_hf(tiny_clip_dir, tiny_clip_dir)
    with pytest.raises(ValueError, match=r"no encoder family reads .* 'llama'; supported: .*'clip_vision_model'"):
        compose_from_hf(tiny_llama_dir, tiny_llama_dir)
    with pytest.raises(ValueError, match="fusion_interval=5 exceeds the decoder's 4 layers"):
        compose_from_hf(tiny_llama_dir, tiny_clip_dir, fusion_interval=5)

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", broken / "config.json")
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(tensors, broken / "model.safetensors")
    match = r"missing tensors \['model.layers.2.mlp.up_proj.weight'\], unused tensors \['model.layers.9"
    with pytest.raises(ValueError, match=match):
        compose_from_hf(broken, tiny_clip_dir)

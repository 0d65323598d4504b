"""LoRA beside the fusion parameters: the module, every family, checkpoints, exports and PEFT.

Independent computations: the base model itself (with B = 0), weights merged by hand with plain
tensor ops, transformers' ``MllamaForConditionalGeneration`` loading the merged export, and real
``peft`` (``PeftModel.from_pretrained``) loading the PEFT export on the transformers base.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fusiontrain import tiny
from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.export import export_checkpoint
from fusiontrain.checkpoint.parts import save_tensors
from fusiontrain.config import ConfigError, load_config
from fusiontrain.data.image_format import encoder_mask_rows
from fusiontrain.families import model_family_of
from fusiontrain.inference.load import load_for_inference
from fusiontrain.models import compose_from_hf, encoder_mask_from_cross_attention_mask, load_hf_mllama
from fusiontrain.families.mllama.model import legacy_mllama_key, mllama_args_from_config, mllama_weight_map
from fusiontrain.weights.lora import LoraSettings, add_lora, init_lora_params, lora_settings_of
from fusiontrain.modules import get_fusion_params
from fusiontrain.modules.lora import LoRALinear, is_lora_parameter, select_lora_targets
from tests.helpers.launch import REPO_ROOT, launch_env, run_world
from tests.helpers.tiny_models import mllama_batch_where_every_row_sees_an_image, open_gates

TOKENS_PER_TILE = 5  # (28 // 14) ** 2 + 1
MLLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")
HF_TOWER_TARGETS = ("q_proj", "v_proj", "fc1")


def our_mllama_logits(model, batch) -> torch.Tensor:
    tokens, pixels, cross = batch
    with torch.no_grad():
        return model(tokens, encoder_input=pixels, encoder_mask=encoder_mask_from_cross_attention_mask(cross, TOKENS_PER_TILE))


@torch.no_grad()
def randomize_lora(model, seed: int) -> None:
    """Simulated training of the adapters: B non-zero, A moved."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if is_lora_parameter(name):
            param.add_(0.2 * torch.randn(param.shape, generator=generator))


@torch.no_grad()
def merge_by_hand(base, adapted) -> None:
    """W += (alpha / r) * B @ A for every adapted linear, written out with plain tensor ops."""
    params = dict(base.named_parameters())
    for name, module in adapted.named_modules():
        if isinstance(module, LoRALinear):
            params[f"{name}.weight"].add_((module.alpha / module.rank) * module.lora_B.weight @ module.lora_A.weight)


# -- the module, on every family ------------------------------------------------------------------------


def _mllama(tiny_mllama_dir: Path):
    return lambda: load_hf_mllama(tiny_mllama_dir).eval()


def _composed(decoder: Path, encoder: Path):
    def build():
        model = compose_from_hf(decoder, encoder, fusion_interval=2).eval()
        open_gates(model)
        return model

    return build


def _save_hf(folder: Path, config_class: str, model_class: str, **kwargs) -> Path:
    """A tiny transformers model (random biases, so a dropped one shows) saved to ``folder``."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen2_and_mistral_and_dinov2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The families the session fixtures do not cover: Qwen2 (q/k/v biases), Mistral, DINOv2."""
    root = tmp_path_factory.mktemp("families")
    text = {**tiny._tiny_text_kwargs(), "rope_theta": 10_000.0}
    tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    return {
        "qwen2": _save_hf(root / "qwen2", "Qwen2Config", "Qwen2ForCausalLM", **text),
        "mistral": _save_hf(root / "mistral", "MistralConfig", "MistralForCausalLM", sliding_window=None, **text),
        "dinov2": _save_hf(root / "dinov2", "Dinov2Config", "Dinov2Model", image_size=tiny.IMAGE_SIZE, patch_size=14, **tower),
    }


@pytest.fixture(params=["mllama", "llama+clip", "qwen3+siglip2", "qwen2+dinov2", "mistral+siglip"])
def family_case(request):
    """(build a base model, LoRA targets on its decoder and encoder): every decoder and encoder family."""
    if request.param == "mllama":
        return _mllama(request.getfixturevalue("tiny_mllama_dir")), MLLAMA_TARGETS
    decoder_name, encoder_name = request.param.split("+")
    folders = {
        "llama": "tiny_llama_dir", "qwen3": "tiny_qwen3_dir", "clip": "tiny_clip_dir", "siglip": "tiny_siglip_dir",
        "siglip2": "tiny_siglip2_naflex_dir",
    }
    def folder(name: str) -> Path:
        if name in folders:
            return request.getfixturevalue(folders[name])
        return request.getfixturevalue("qwen2_and_mistral_and_dinov2")[name]

    tower_targets = ("q_proj", "o_proj", "fc2") if encoder_name == "dinov2" else HF_TOWER_TARGETS
    return _composed(folder(decoder_name), folder(encoder_name)), ("q_proj", "v_proj", "w2", *tower_targets)


def _logits(model) -> torch.Tensor:
    """Logits of one text + image batch for any family (its image format's synthetic image)."""
    if isinstance(getattr(model.encoder, "vision", None), torch.nn.Module):
        return our_mllama_logits(model, mllama_batch_where_every_row_sees_an_image())
    fmt = model_family_of(model).image_format(model)
    generator = torch.Generator().manual_seed(1)
    s, start = 10, 3
    tokens = torch.randint(4, 60, (1, s), generator=generator)
    tokens[0, start] = model.decoder.tok_embeddings.vocab_size  # the image token
    mask, encoder_input = encoder_mask_rows([[fmt.synthetic(generator, 0.3)]], [[(start, s)]], fmt, s)
    with torch.no_grad():
        return model(tokens, encoder_input=encoder_input, encoder_mask=mask)


def test_zero_b_is_the_base_and_a_trained_adapter_equals_merged_weights(family_case) -> None:
    build, targets = family_case
    base = build()
    want_base = _logits(base)
    model = build()
    names = select_lora_targets(model, sides=("decoder", "encoder"), targets=targets)
    assert any(n.startswith("decoder.") for n in names) and any(n.startswith("encoder.") for n in names)
    fusion = set(get_fusion_params(model))
    assert not any(f"{n}.weight" in fusion for n in names)  # fusion layers train in full, never adapted
    add_lora(model, LoraSettings(4, 8.0, 0.0, tuple(names)))
    init_lora_params(model, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == fusion | {n for n, _ in model.named_parameters() if is_lora_parameter(n)}
    assert torch.equal(_logits(model), want_base)  # B = 0: exactly the base model

    randomize_lora(model, seed=1)
    adapted = _logits(model)
    assert (adapted - want_base).abs().max() > 1e-2  # the check below can fail
    merge_by_hand(base, model)
    torch.testing.assert_close(_logits(base), adapted, atol=1e-5, rtol=0)
    assert lora_settings_of(model) == LoraSettings(4, 8.0, 0.0, tuple(names))


@pytest.mark.parametrize("sides", [("decoder",), ("encoder",), ("decoder", "encoder")])
def test_the_default_targets_adapt_every_block_linear_of_every_family_and_side(family_case, sides) -> None:
    """model.lora.targets' default ([all-linear]) works for every family and every choice of
    sides: every attention and MLP linear of those sides' blocks, nothing outside them (the
    decoder's output projection, which the chunked loss reads directly, a tower's unused pooling
    head, a patch embedding) and no fusion layer."""
    from fusiontrain.config import LoraConfig

    build, _ = family_case
    model = build()
    chosen = select_lora_targets(model, sides=sides, targets=LoraConfig().targets)
    fusion = set(get_fusion_params(model))
    everything = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.partition(".")[0] in sides and f"{name}.weight" not in fusion
    ]
    outside = {name for name in everything if ".layers." not in name and ".layer." not in name}
    assert set(chosen) == set(everything) - outside, sorted(set(everything) ^ set(chosen))[:6]
    assert all(any(name.startswith(f"{side}.") for name in chosen) for side in sides)
    assert "decoder.output" not in chosen and not any(".head." in name for name in chosen)


def test_a_target_may_miss_a_side_but_not_every_side(tiny_mllama_dir: Path, tiny_llama_dir: Path, tiny_clip_dir: Path) -> None:
    mllama = load_hf_mllama(tiny_mllama_dir)
    both = select_lora_targets(mllama, sides=("decoder", "encoder"), targets=("q_proj", "w3"))  # no w3 in the ViT
    assert any(n.startswith("encoder.") and n.endswith("q_proj") for n in both)
    assert {n.rsplit(".", 1)[1] for n in both if n.endswith("w3")} == {"w3"} and not any(
        n.startswith("encoder.") and n.endswith("w3") for n in both
    )
    with pytest.raises(ValueError, match=r"\['w3'\] match no linear of the encoder.*end in \['k_proj'"):
        select_lora_targets(mllama, sides=("encoder",), targets=("w3",))
    composed = _composed(tiny_llama_dir, tiny_clip_dir)()
    with pytest.raises(ValueError, match=r"adapt no linear of the decoder, a chosen side.*'output_proj'"):
        select_lora_targets(composed, sides=("decoder", "encoder"), targets=("out_proj",))  # the tower's name only
    with pytest.raises(ValueError, match="list it alone"):
        select_lora_targets(composed, sides=("decoder",), targets=("all-linear", "q_proj"))
    with pytest.raises(ValueError, match=r"\['output'\] match no linear"):  # the loss reads it directly
        select_lora_targets(composed, sides=("decoder",), targets=("output",))


# -- checkpoint, exports, PEFT in and out ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_mllama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(our "trained" Mllama with LoRA on the decoder and the ViT, its checkpoint folder): the
    adapters and every fusion parameter moved, written as a training checkpoint is."""
    model = load_hf_mllama(tiny_mllama_dir).eval()
    names = select_lora_targets(model, sides=("decoder", "encoder"), targets=MLLAMA_TARGETS)
    settings = LoraSettings(4, 8.0, 0.0, tuple(names))
    add_lora(model, settings)
    init_lora_params(model, seed=0)
    randomize_lora(model, seed=1)
    fusion = get_fusion_params(model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in fusion.values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    params = dict(model.named_parameters())
    parts = {"fusion": fusion, "lora": {n: p for n, p in params.items() if is_lora_parameter(n)}}
    folder = layout.checkpoint_dir(tmp_path_factory.mktemp("run"), 5)
    folder.mkdir(parents=True)
    for part, tensors in parts.items():
        save_tensors({n: t.detach().clone() for n, t in tensors.items()}, layout.part_dir(folder, part))
    base = {"family": "mllama", "folders": {"hf_mllama": str(tiny_mllama_dir)}}
    layout.write_manifest(folder, layout.new_manifest(5, sorted(parts), base, lora=settings.to_dict()))
    return model, folder


def _hf_mllama(folder: Path):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


def _hf_logits(model, batch) -> torch.Tensor:
    tokens, pixels, cross = batch
    with torch.no_grad():
        return model(input_ids=tokens, **pixels, cross_attention_mask=cross).logits


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as file:
            out.update({key: file.get_tensor(key) for key in file.keys()})
    return out


def test_merged_export_equals_the_unmerged_model(lora_checkpoint, tiny_mllama_dir: Path, tmp_path: Path) -> None:
    model, checkpoint = lora_checkpoint
    out = export_checkpoint(checkpoint, tmp_path / "hf", dtype="fp32")
    batch = mllama_batch_where_every_row_sees_an_image()
    torch.testing.assert_close(_hf_logits(_hf_mllama(out), batch), our_mllama_logits(model, batch), atol=1e-5, rtol=0)
    # The frozen base tensors are the base's, bit for bit, except where LoRA merged or fusion trained.
    base, merged = _tensors(tiny_mllama_dir), _tensors(out)
    assert set(base) == set(merged)
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    routes = {route.our_key: legacy_mllama_key(route.hf_key) for route in mllama_weight_map(mllama_args_from_config(tiny.tiny_mllama_config().to_dict()))}
    adapted = {routes[f"{module}.weight"] for module in lora_settings_of(model).modules}
    trained = {routes[name] for name in get_fusion_params(model)}
    assert adapted.isdisjoint(trained) and changed == adapted | trained


def test_peft_export_loads_in_peft_and_generate_and_init_from_read_it(
    lora_checkpoint, tiny_mllama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, checkpoint = lora_checkpoint
    adapter = export_checkpoint(checkpoint, tmp_path / "adapter", format="peft", dtype="fp32")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    keys = set(_tensors(adapter))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.vision_model.transformer.layers.0.mlp.fc1.lora_B.weight" in keys
    assert "base_model.model.model.language_model.layers.1.cross_attn_attn_gate" in keys  # modules_to_save
    assert not any("lora" in key and ".cross_attn." in key for key in keys)

    # peft 0.21.2 refuses torchao < 0.16, which the test-only torchtune reference pins to 0.15: hide
    # it from peft (LoRA on nn.Linear never uses torchao).
    monkeypatch.setitem(sys.modules, "torchao", None)
    from peft import PeftModel

    batch = mllama_batch_where_every_row_sees_an_image()
    want = our_mllama_logits(model, batch)
    peft_model = PeftModel.from_pretrained(_hf_mllama(tiny_mllama_dir), str(adapter)).eval()
    torch.testing.assert_close(_hf_logits(peft_model, batch), want, atol=1e-5, rtol=0)

    # generate's loaders: base + adapter, and the checkpoint itself, give the trained model.
    for loaded in (load_for_inference(tiny_mllama_dir, adapter=adapter), load_for_inference(checkpoint)):
        torch.testing.assert_close(our_mllama_logits(loaded.model, batch), want, atol=1e-5, rtol=0)

    # model.lora.init_from starts a run from the adapter: same LoRA and fusion weights.
    from fusiontrain.source.model_source import ModelSource
    from fusiontrain.train.model import prepare_model
    from fusiontrain.weights.hf_checkpoint import materialize

    run = load_config(None, [f"model.hf_mllama={tiny_mllama_dir}", f"model.lora.init_from={adapter}"])
    pretrained = prepare_model(run.model, ModelSource.from_config(run.model), seed=0)
    materialize(pretrained.model, "cpu")
    pretrained.load()
    started = dict(pretrained.model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(started[name], param), name
    assert started.keys() == dict(model.named_parameters()).keys()


@pytest.mark.parametrize("which", ["lora_A", "modules_to_save"])
def test_peft_import_refuses_a_tensor_of_another_shape_even_when_it_could_be_reshaped(
    lora_checkpoint, tiny_mllama_dir: Path, tmp_path: Path, which: str
) -> None:
    """A transposed LoRA A (or a fusion weight stored flat) holds the right number of values;
    reshaping it first would load scrambled weights without a word. The shape is checked first."""
    from safetensors.torch import save_file

    _, checkpoint = lora_checkpoint
    adapter = export_checkpoint(checkpoint, tmp_path / "adapter", format="peft", dtype="fp32")
    tensors = _tensors(adapter)
    if which == "lora_A":
        key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = tensors[key].t().contiguous()
    else:
        key = "base_model.model.model.language_model.layers.1.cross_attn_attn_gate"
        tensors[key] = tensors[key].reshape(1, -1).contiguous()
    wanted = tuple(_tensors(adapter)[key].shape)
    assert tuple(tensors[key].shape) != wanted and tensors[key].numel() == math.prod(wanted)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"{re.escape(key)} has shape {re.escape(str(tuple(tensors[key].shape)))}, but this model needs {re.escape(str(wanted))}"):
        load_for_inference(tiny_mllama_dir, adapter=adapter)


# -- training through the CLI on 2 ranks, and resume ----------------------------------------------------

TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
CLI_RUN = [
    "max_steps=4", "checkpoint.every_n_steps=2", "data.packing=true", "data.num_workers=0", "batch.micro_batch_size=1",
    "batch.global_batch_size=4", "parallel.activation_checkpointing=full", "optim.lr=3e-2", "optim.schedule=constant",
    "optim.warmup_steps=0",
    "eval.every_n_steps=0", "logging.every_n_steps=0", "model.lora.rank=4", "model.lora.alpha=8",
    "model.lora.sides=[decoder]",
]


def _train(tiny_mllama_dir: Path, output_dir: Path, *overrides: str) -> list[dict]:
    run_world(
        ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={output_dir}", *CLI_RUN, *overrides],
        nproc=2,
        timeout=240,
    )
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tiny_mllama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """A 4-step 2-rank CLI run of the tiny Mllama with LoRA on the decoder (packing, full
    activation checkpointing, 2 micro-batches per step and rank), checkpointed at 2 and 4."""
    out = tmp_path_factory.mktemp("lora_run") / "run"
    return _train(tiny_mllama_dir, out), out


def test_two_rank_cli_run_trains_lora_and_exports_merged_and_peft(
    lora_run, tiny_mllama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, out = lora_run
    losses = [row["loss"] for row in rows]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.05, losses
    checkpoint = out / "checkpoints" / "step_4"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["parts"] == ["fusion", "lora"] and manifest["lora"]["rank"] == 4
    assert all(module.startswith("decoder.") for module in manifest["lora"]["modules"])

    trained = load_for_inference(checkpoint).model
    batch = mllama_batch_where_every_row_sees_an_image()
    want = our_mllama_logits(trained, batch)
    lora_b = [p for n, p in trained.named_parameters() if n.endswith("lora_B.weight")]
    assert all(b.abs().max() > 0 for b in lora_b)  # every adapter trained

    merged = export_checkpoint(checkpoint, tmp_path / "merged", dtype="fp32")
    torch.testing.assert_close(_hf_logits(_hf_mllama(merged), batch), want, atol=1e-5, rtol=0)
    base, exported = _tensors(tiny_mllama_dir), _tensors(merged)
    routes = {route.our_key: legacy_mllama_key(route.hf_key) for route in mllama_weight_map(mllama_args_from_config(tiny.tiny_mllama_config().to_dict()))}
    expected = {routes[f"{m}.weight"] for m in manifest["lora"]["modules"]} | {routes[n] for n in get_fusion_params(trained)}
    assert {key for key in base if not torch.equal(base[key], exported[key])} <= expected  # frozen tensors untouched

    adapter = export_checkpoint(checkpoint, tmp_path / "adapter", format="peft", dtype="fp32")
    monkeypatch.setitem(sys.modules, "torchao", None)  # see test_peft_export_loads_in_peft...
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_hf_mllama(tiny_mllama_dir), str(adapter)).eval()
    torch.testing.assert_close(_hf_logits(peft_model, batch), want, atol=1e-5, rtol=0)


def test_resume_with_lora_is_bitwise_exact(lora_run, tiny_mllama_dir: Path, tmp_path: Path) -> None:
    rows, out = lora_run
    resumed = _train(tiny_mllama_dir, tmp_path / "resumed", f"checkpoint.resume={out / 'checkpoints' / 'step_2'}")
    assert [row["step"] for row in resumed] == [2, 3]
    assert [row["loss"] for row in resumed] == [row["loss"] for row in rows[2:]]
    for part in ("fusion", "lora"):
        want, got = _tensors(out / "checkpoints" / "step_4" / part), _tensors(tmp_path / "resumed" / "checkpoints" / "step_4" / part)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part


# -- FLOPs and the planner ------------------------------------------------------------------------------


def test_flops_count_the_lora_matmuls_exactly() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fusiontrain.flops import count as flops
    from fusiontrain.train.loss import chunked_cross_entropy_sum
    from tests.helpers.tiny_models import random_mllama, random_pixels

    model = random_mllama().train()
    add_lora(model, LoraSettings(3, 6.0, 0.0, tuple(select_lora_targets(model, sides=("decoder", "encoder"), targets=MLLAMA_TARGETS))))
    init_lora_params(model, seed=0)
    model.set_skip_output_projection(True)
    generator = torch.Generator().manual_seed(0)
    b, s = 2, 16
    tokens = torch.randint(0, 128, (b, s), generator=generator)
    pixels = random_pixels([[1, 2], [3]])
    encoder_mask = torch.rand(b, s, pixels["pixel_values"].shape[1] * 2 * 5, generator=generator) > 0.3
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        hidden = model(tokens, encoder_input=pixels, encoder_mask=encoder_mask)
        loss = chunked_cross_entropy_sum(hidden, tokens, model.decoder.output, num_chunks=1)
        forward = counter.get_total_flops()
        loss.backward()
        backward = counter.get_total_flops() - forward
    # the encoder's images from its input: 3 real of 4 slots (Mllama does not encode padding slots)
    count = flops.step_flops(model, num_rows=b, seq_len=s, encoder_input=pixels, attention_pairs=b * s * s)
    assert (count.forward, count.backward) == (forward, backward)


def test_the_planner_counts_lora_parameters_and_optimizer_state(tiny_mllama_dir: Path) -> None:
    from fusiontrain.plan.planner import hardware_for, plan_run

    small = ["batch.seq_len=16", "batch.micro_batch_size=1", "batch.global_batch_size=1"]
    config = load_config(TINY_CONFIG, [f"model.hf_mllama={tiny_mllama_dir}", *small, "model.lora.rank=4"])
    memory = plan_run(config, gpus=1, hardware=hardware_for("h100")).memory
    # By hand, from the base model: its parameters plus r x (in + out) per adapted linear.
    model = load_hf_mllama(tiny_mllama_dir)
    modules = select_lora_targets(model, sides=("decoder",), targets=MLLAMA_TARGETS)
    lora = sum(4 * (model.get_submodule(m).in_features + model.get_submodule(m).out_features) for m in modules)
    fusion = get_fusion_params(model)
    assert memory["parameters (shards, float32)"] == 4 * (sum(p.numel() for p in model.parameters()) + lora)
    trainable_numel, trainable_tensors = sum(p.numel() for p in fusion.values()) + lora, len(fusion) + 2 * len(modules)
    # AdamW: exp_avg and exp_avg_sq per element, and a float32 step counter per tensor
    assert memory["optimizer state (AdamW)"] == 8 * trainable_numel + 4 * trainable_tensors


# -- config and the optional extra ----------------------------------------------------------------------


def test_lora_config_errors_name_the_key(tiny_mllama_dir: Path, tmp_path: Path) -> None:
    base = [f"model.hf_mllama={tiny_mllama_dir}", "model.lora.rank=4"]
    for override, key in [
        ("model.lora.rank=-1", "model.lora.rank"),
        ("model.lora.dropout=1.5", "model.lora.dropout"),
        ("model.lora.sides=[text]", "model.lora.sides"),
        ("model.decoder_trainable=true", "model.decoder_trainable"),
        (f"model.lora.init_from={tmp_path / 'missing'}", "model.lora.init_from"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(TINY_CONFIG, [*base, override])
    model = load_hf_mllama(tiny_mllama_dir)
    with pytest.raises(ValueError, match="match no linear.*end in"):
        select_lora_targets(model, sides=("decoder",), targets=("o_proj",))  # HF's name; ours is output_proj


def test_the_library_imports_without_peft_and_names_the_extra(lora_checkpoint, tmp_path: Path) -> None:
    _, checkpoint = lora_checkpoint
    script = (
        "import sys; sys.modules['peft'] = None\n"  # as if peft were not installed
        "import fusiontrain.train.trainer, fusiontrain.cli, fusiontrain.inference.load\n"
        "from fusiontrain.checkpoint.export import export_checkpoint\n"
        f"export_checkpoint({str(checkpoint)!r}, {str(tmp_path / 'merged')!r})\n"  # merged: no peft needed
        "try:\n"
        f"    export_checkpoint({str(checkpoint)!r}, {str(tmp_path / 'adapter')!r}, format='peft')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=launch_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'fusiontrain[peft]'" in done.stdout
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "adapter").exists()


def test_composed_lora_checkpoint_exports_merged_and_refuses_peft(tiny_llama_dir: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    from fusiontrain.checkpoint.export import ExportError
    from fusiontrain.models import load_fusiontrain_export

    model = _composed(tiny_llama_dir, tiny_clip_dir)()
    modules = select_lora_targets(model, sides=("decoder", "encoder"), targets=("q_proj", "w2", "fc1"))
    settings = LoraSettings(2, 4.0, 0.0, tuple(modules))
    add_lora(model, settings)
    init_lora_params(model, seed=0)
    randomize_lora(model, seed=3)
    params = dict(model.named_parameters())
    parts = {"fusion": get_fusion_params(model), "lora": {n: p for n, p in params.items() if is_lora_parameter(n)}}
    checkpoint = layout.checkpoint_dir(tmp_path / "run", 1)
    checkpoint.mkdir(parents=True)
    for part, tensors in parts.items():
        save_tensors({n: t.detach().clone() for n, t in tensors.items()}, layout.part_dir(checkpoint, part))
    base = {"family": "composed", "folders": {"decoder": str(tiny_llama_dir), "encoder": str(tiny_clip_dir)},
            "fusion_interval": 2, "fusion_vocab_size": model.decoder.tok_embeddings.fusion_vocab_size}
    layout.write_manifest(checkpoint, layout.new_manifest(1, sorted(parts), base, lora=settings.to_dict()))

    want = _logits(model)
    exported = load_fusiontrain_export(export_checkpoint(checkpoint, tmp_path / "merged", dtype="fp32")).eval()
    torch.testing.assert_close(_logits(exported), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(load_for_inference(checkpoint).model), want, atol=1e-5, rtol=0)
    with pytest.raises(ExportError, match="a composed model has no transformers class"):
        export_checkpoint(checkpoint, tmp_path / "adapter", format="peft")

    # A run whose base is that export (model.fusiontrain_export) with LoRA again: generate loads it.
    again = layout.checkpoint_dir(tmp_path / "run2", 1)
    again.mkdir(parents=True)
    for part, tensors in parts.items():
        save_tensors({n: t.detach().clone() for n, t in tensors.items()}, layout.part_dir(again, part))
    on_export = {**base, "folders": {"fusiontrain_export": str(tmp_path / "merged")}}
    layout.write_manifest(again, layout.new_manifest(1, sorted(parts), on_export, lora=settings.to_dict()))
    add_lora(exported, settings)
    with torch.no_grad():
        for name, param in exported.named_parameters():
            if is_lora_parameter(name):
                param.copy_(params[name])
    torch.testing.assert_close(_logits(load_for_inference(again).model), _logits(exported), atol=1e-6, rtol=0)

"""Exporting a training checkpoint (fusion parameters in DCP + the base folders) as one model.

Each test "trains" by perturbing every fusion parameter of a model loaded from a tiny base, writes a
checkpoint folder by hand in the layout of fusiontrain.checkpoint.layout, exports it and checks the
export against the perturbed in-memory model: transformers' own MllamaForConditionalGeneration for
the hf format, load_fusiontrain_export for ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fusiontrain import tiny
from fusiontrain.checkpoint import layout
from fusiontrain.checkpoint.export import DTYPES, FORMATS, ExportError, ShardWriter, export_checkpoint
from fusiontrain.cli import EXPORT_DTYPES, EXPORT_FORMATS, parse_size
from fusiontrain.cli import main as cli_main
from fusiontrain.families import TrainableFlags, model_family
from fusiontrain.models import load_fusiontrain_export
from fusiontrain.models import compose_from_hf, encoder_mask_from_cross_attention_mask, load_hf_mllama
from fusiontrain.families.composed.compose import image_token_layout
from fusiontrain.weights.hf_checkpoint import HFCheckpoint
from fusiontrain.families.mllama.model import canonical_mllama_key, mllama_args_from_config, mllama_weight_map
from fusiontrain.modules import get_fusion_params
from tests.helpers.tiny_models import mllama_batch_where_every_row_sees_an_image
from fusiontrain.checkpoint.parts import save_tensors
from tests.helpers.checkpoints import STEP, perturb, write_checkpoint

TOKENS_PER_TILE = 5  # (28 // 14) ** 2 + 1
SMALL_SHARD = 300_000  # the tiny Mllama is ~1.27 MB in fp32: 5 shards


def main(argv: list[str]) -> int:
    """``python -m fusiontrain export ARGV``, in process."""
    return cli_main(["export", *argv])


# -- building checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_mllama(tiny_mllama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(our perturbed Mllama, its checkpoint folder) with only the fusion part."""
    model = load_hf_mllama(tiny_mllama_dir).eval()
    fusion = get_fusion_params(model)
    perturb(fusion, seed=3)
    base = {"family": "mllama", "folders": {"hf_mllama": str(tiny_mllama_dir)}}
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("run"), {"fusion": fusion}, base)
    return model, checkpoint


@pytest.fixture(scope="module")
def hf_fp32_export(trained_mllama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hf export, fp32, in several shards, written through the CLI."""
    _, checkpoint = trained_mllama
    out = tmp_path_factory.mktemp("exports") / "hf_fp32"
    code = main(["--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "fp32", "--max-shard-size", "300KB"])
    assert code == 0
    return out


def _hf_mllama(folder: Path):
    from transformers import MllamaForConditionalGeneration

    model, info = MllamaForConditionalGeneration.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _hf_logits(model, tokens, pixels, cross) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, **pixels, cross_attention_mask=cross).logits


def _our_logits(model, tokens, pixels, cross) -> torch.Tensor:
    with torch.no_grad():
        mask = encoder_mask_from_cross_attention_mask(cross, TOKENS_PER_TILE)
        return model(tokens, encoder_input=pixels, encoder_mask=mask)


# -- hf format --------------------------------------------------------------------------------------


def test_hf_export_logits_match_the_trained_model(trained_mllama, hf_fp32_export: Path, tiny_mllama_dir: Path) -> None:
    model, _ = trained_mllama
    exported = _hf_mllama(hf_fp32_export)
    tokens, pixels, cross = mllama_batch_where_every_row_sees_an_image()
    want = _our_logits(model, tokens, pixels, cross)
    got = _hf_logits(exported, tokens, pixels, cross)
    difference = (got - want).abs().max().item()
    print(f"max |hf export - trained model| logits: {difference:.3e}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # ... and the check could fail: the base's logits are far from the trained ones.
    base_logits = _hf_logits(_hf_mllama(tiny_mllama_dir), tokens, pixels, cross)
    assert (base_logits - want).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hf_export_tensors_are_the_base_and_the_trained_ones(
    dtype: str, trained_mllama, hf_fp32_export: Path, tiny_mllama_dir: Path, tmp_path: Path
) -> None:
    model, checkpoint = trained_mllama
    if dtype == "fp32":
        out = hf_fp32_export
    else:
        out = export_checkpoint(checkpoint, tmp_path / "hf_bf16", dtype="bf16")  # the defaults: hf, one file
        assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
        assert next(_hf_mllama(out).parameters()).dtype == torch.bfloat16  # loads strictly, in bf16
    cast = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == str(cast).removeprefix("torch.")

    base = HFCheckpoint(tiny_mllama_dir, key_renamer=canonical_mllama_key)
    export = HFCheckpoint(out, key_renamer=canonical_mllama_key)
    assert sorted(export.keys()) == sorted(base.keys())
    args = mllama_args_from_config(base.config)
    fusion = get_fusion_params(model)
    ours = dict(model.named_parameters())
    checked = {"fusion": 0, "base": 0}
    for route in mllama_weight_map(args):
        stored = export.read(route.hf_key, route.rows)
        assert stored.dtype == cast, route.hf_key
        if route.our_key in fusion:
            want, kind = ours[route.our_key].detach(), "fusion"
        else:
            want, kind = base.read(route.hf_key, route.rows), "base"
        assert torch.equal(stored, want.reshape(stored.shape).to(cast)), route
        checked[kind] += 1
    assert checked == {"fusion": len(fusion), "base": len(ours) - len(fusion)}
    # the trained tensors really moved away from the base's
    gate = next(r for r in mllama_weight_map(args) if r.hf_key.endswith("cross_attn_attn_gate"))
    assert not torch.equal(export.read(gate.hf_key).to(cast), base.read(gate.hf_key).to(cast))


def test_hf_export_shards_and_index(hf_fp32_export: Path) -> None:
    index = json.loads((hf_fp32_export / "model.safetensors.index.json").read_text())
    files = sorted(hf_fp32_export.glob("model-*-of-*.safetensors"))
    assert len(files) == 5 and not (hf_fp32_export / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [file.name for file in files]
    total = 0
    for file in files:
        assert file.stat().st_size <= SMALL_SHARD + 20_000  # tensors + header
        with safe_open(file, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            names = list(handle.keys())
            assert names and all(index["weight_map"][name] == file.name for name in names)
            total += sum(handle.get_tensor(name).numel() * 4 for name in names)
    assert index["metadata"]["total_size"] == total
    assert len(index["weight_map"]) == 156
    # the base was written by transformers 5.23 (legacy names); the export keeps its naming
    assert "language_model.model.embed_tokens.weight" in index["weight_map"]
    assert not (hf_fp32_export.parent / "hf_fp32.tmp").exists()


def test_hf_export_in_current_naming_loads_too(trained_mllama, tmp_path: Path) -> None:
    model, checkpoint = trained_mllama
    out = export_checkpoint(checkpoint, tmp_path / "current", dtype="fp32", hf_naming="current")
    assert "model.language_model.embed_tokens.weight" in HFCheckpoint(out).keys()
    tokens, pixels, cross = mllama_batch_where_every_row_sees_an_image()
    got = _hf_logits(_hf_mllama(out), tokens, pixels, cross)
    torch.testing.assert_close(got, _our_logits(model, tokens, pixels, cross), atol=1e-5, rtol=0)


def test_hf_export_has_tokenizer_processor_and_generation_config(hf_fp32_export: Path, tiny_mllama_dir: Path) -> None:
    from transformers import AutoProcessor

    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (hf_fp32_export / name).read_bytes() == (tiny_mllama_dir / name).read_bytes(), name
    assert json.loads((hf_fp32_export / "generation_config.json").read_text())["eos_token_id"] == tiny.EOS_TOKEN_ID
    processor = AutoProcessor.from_pretrained(hf_fp32_export)
    assert type(processor).__name__ == "MllamaProcessor"
    assert processor.tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN) == tiny.IMAGE_TOKEN_ID
    assert processor.chat_template


def test_generation_config_is_written_when_the_base_has_none(trained_mllama, tiny_mllama_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_mllama_dir, base)
    (base / "generation_config.json").unlink()
    model, _ = trained_mllama
    checkpoint = write_checkpoint(
        tmp_path / "run", {"fusion": get_fusion_params(model)}, {"family": "mllama", "folders": {"hf_mllama": str(base)}}
    )
    out = export_checkpoint(checkpoint, tmp_path / "out")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": tiny.BOS_TOKEN_ID, "eos_token_id": tiny.EOS_TOKEN_ID, "pad_token_id": tiny.PAD_TOKEN_ID}


def test_mllama_in_fusiontrain_format(trained_mllama, tmp_path: Path) -> None:
    model, checkpoint = trained_mllama
    out = export_checkpoint(checkpoint, tmp_path / "ours", format="fusiontrain", dtype="fp32", max_shard_bytes=SMALL_SHARD)
    assert (out / "model.safetensors.index.json").is_file()
    loaded = load_fusiontrain_export(out).eval()
    want = dict(model.named_parameters())
    got = dict(loaded.named_parameters())
    assert list(got) == list(want)
    for name, param in got.items():
        assert torch.equal(param, want[name]), name
    assert set(n for n, p in loaded.named_parameters() if p.requires_grad) == set(get_fusion_params(loaded))


def test_hf_export_of_a_run_that_started_from_a_fusiontrain_export(
    trained_mllama, tiny_mllama_dir: Path, tmp_path: Path
) -> None:
    """Run 1 exported in fusiontrain format (bf16); run 2 started from that export and trained
    the fusion further. Its hf export takes the layout from transformers' own Mllama built from the
    stored config: it loads strictly, gives run 2's logits, and stores every tensor in the export's
    dtype under the naming transformers' save_pretrained writes."""
    _, checkpoint = trained_mllama
    ours = export_checkpoint(checkpoint, tmp_path / "ours", format="fusiontrain", dtype="bf16")
    model = load_fusiontrain_export(ours).eval()  # fp32, holding bf16 values
    fusion = get_fusion_params(model)
    with torch.no_grad():
        perturb(fusion, seed=5)
        for param in fusion.values():
            param.copy_(param.bfloat16())  # what a bf16 export of run 2 can hold exactly
    run2 = write_checkpoint(tmp_path / "run2", {"fusion": fusion}, {"family": "mllama", "folders": {"fusiontrain_export": str(ours)}})

    out = tmp_path / "hf"
    assert main(["--checkpoint", str(run2), "--out", str(out)]) == 0  # the defaults: hf, the export's dtype
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as file:
        stored_names = set(file.keys())
    with safe_open(str(tiny_mllama_dir / "model.safetensors"), "pt") as file:
        assert stored_names == set(file.keys()) and any(key.startswith("language_model.model.") for key in stored_names)

    export = HFCheckpoint(out, key_renamer=canonical_mllama_key)
    start = HFCheckpoint(ours, require_config=False)
    ours_now = dict(model.named_parameters())
    for route in mllama_weight_map(mllama_args_from_config(export.config)):
        stored = export.read(route.hf_key, route.rows)
        want = ours_now[route.our_key] if route.our_key in fusion else start.read(route.our_key)
        assert stored.dtype == torch.bfloat16 and torch.equal(stored, want.detach().reshape(stored.shape).bfloat16()), route

    from transformers import MllamaForConditionalGeneration

    exported, info = MllamaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    tokens, pixels, cross = mllama_batch_where_every_row_sees_an_image()
    want = _our_logits(model, tokens, pixels, cross)
    torch.testing.assert_close(_hf_logits(exported.eval(), tokens, pixels, cross), want, atol=1e-5, rtol=0)
    assert (_our_logits(load_fusiontrain_export(ours).eval(), tokens, pixels, cross) - want).abs().max() > 1e-2


# -- composed family --------------------------------------------------------------------------------


def test_composed_export_is_self_contained_and_matches(
    tiny_llama_dir: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    """Fusion and decoder parts trained; the base folders are deleted before loading the export."""
    decoder_dir, encoder_dir = tmp_path / "llama", tmp_path / "clip"
    shutil.copytree(tiny_llama_dir, decoder_dir)
    shutil.copytree(tiny_clip_dir, encoder_dir)
    model = compose_from_hf(decoder_dir, encoder_dir, fusion_interval=2, fusion_vocab_size=8, decoder_trainable=True).eval()
    fusion = get_fusion_params(model)
    decoder = {name: p for name, p in model.named_parameters() if name.startswith("decoder.") and name not in fusion}
    perturb(fusion, seed=1)
    perturb(decoder, seed=2)
    base = {
        "family": "composed",
        "folders": {"decoder": str(decoder_dir), "encoder": str(encoder_dir)},
        "fusion_interval": 2,
        "fusion_vocab_size": 8,
    }
    checkpoint = write_checkpoint(tmp_path / "run", {"fusion": fusion, "decoder": decoder}, base)
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "decoder_config.json").read_text())["model_type"] == "llama"
    shutil.rmtree(decoder_dir)
    shutil.rmtree(encoder_dir)

    loaded = load_fusiontrain_export(out).eval()
    for (name, a), (other, b) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert name == other and torch.equal(a, b), name
    layout_info = image_token_layout(loaded)
    tokens = torch.randint(0, tiny.TEXT_VOCAB_SIZE, (2, 10), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = layout_info.image_token_id
    pixels = torch.randn(2, 2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, 2 * layout_info.tokens_per_image, dtype=torch.bool)
    with torch.no_grad():
        want = model(tokens, encoder_input={"pixel_values": pixels}, encoder_mask=mask)
        got = loaded(tokens, encoder_input={"pixel_values": pixels}, encoder_mask=mask)
    print(f"max |fusiontrain export - trained model| logits: {(got - want).abs().max().item():.3e}")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    bf16 = load_fusiontrain_export(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_composed_base_cannot_be_exported_as_hf(tiny_llama_dir: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    model = compose_from_hf(tiny_llama_dir, tiny_clip_dir, fusion_interval=2)
    base = {
        "family": "composed",
        "folders": {"decoder": str(tiny_llama_dir), "encoder": str(tiny_clip_dir)},
        "fusion_interval": 2,
        "fusion_vocab_size": 8,
    }
    checkpoint = write_checkpoint(tmp_path / "run", {"fusion": get_fusion_params(model)}, base)
    with pytest.raises(ExportError, match="use --format fusiontrain"):
        export_checkpoint(checkpoint, tmp_path / "out", format="hf")
    # a part that does not match the base model is refused, naming the offenders
    broken = write_checkpoint(
        tmp_path / "run2", {"fusion": {"decoder.layers.1.fusion_layer.nope": torch.zeros(2)}}, base
    )
    with pytest.raises(ExportError, match="unexpected .*fusion_layer.nope"):
        export_checkpoint(broken, tmp_path / "out")


# -- dtypes: by default as the base stores them ----------------------------------------------------


def _stored(folder: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors folder as stored: name -> (safetensors dtype, its raw bytes)."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                raw = handle.get_tensor(name).contiguous().reshape(-1).view(torch.uint8)
                found[name] = (handle.get_slice(name).get_dtype(), raw)
    return found


def _base_in(source: Path, target: Path, dtype_of) -> Path:
    """A copy of base folder ``source`` whose tensors are stored in ``dtype_of(name)`` (None: as
    they are), its config.json saying ``dtype`` is bfloat16 when any tensor is."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    cast = {name: t.to(dtype_of(name) or t.dtype) for name, t in tensors.items()}
    save_file(cast, str(target / "model.safetensors"), metadata={"format": "pt"})
    if any(t.dtype == torch.bfloat16 for t in cast.values()):
        config = json.loads((target / "config.json").read_text())
        config["dtype"] = "bfloat16"
        (target / "config.json").write_text(json.dumps(config))
    return target


def _trained_hf_keys(model, base_dir: Path) -> set[str]:
    """The stored names of the base tensors that a fusion parameter fills (wholly or some rows)."""
    base = HFCheckpoint(base_dir, key_renamer=canonical_mllama_key)
    fusion = get_fusion_params(model)
    canonical = {route.hf_key for route in mllama_weight_map(mllama_args_from_config(base.config)) if route.our_key in fusion}
    return {base._stored_name[key] for key in canonical}


@pytest.mark.parametrize("stored", ["fp32", "bf16"])
def test_default_dtype_is_the_bases_and_frozen_tensors_are_bit_identical(
    stored: str, trained_mllama, tiny_mllama_dir: Path, tmp_path: Path
) -> None:
    model, _ = trained_mllama
    want = {"fp32": ("F32", torch.float32), "bf16": ("BF16", torch.bfloat16)}[stored]
    base_dir = tiny_mllama_dir if stored == "fp32" else _base_in(tiny_mllama_dir, tmp_path / "bf16", lambda _: torch.bfloat16)
    checkpoint = write_checkpoint(
        tmp_path / "run", {"fusion": get_fusion_params(model)}, {"family": "mllama", "folders": {"hf_mllama": str(base_dir)}}
    )
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0  # no --dtype
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == str(want[1]).removeprefix("torch.")

    base, exported = _stored(base_dir), _stored(out)
    assert sorted(exported) == sorted(base)
    trained = _trained_hf_keys(model, base_dir)
    assert trained and len(trained) < len(base)
    for name, (dtype, raw) in exported.items():
        assert dtype == want[0], name
        if name not in trained:
            assert torch.equal(raw, base[name][1]), f"{name} is not bit-identical to the base"
        elif not name.endswith("embed_tokens.weight"):  # embed_tokens: base rows + trained rows
            assert not torch.equal(raw, base[name][1]), f"{name} should hold the trained values"
    # the trained tensors are the checkpoint's, cast to the base tensor's dtype
    ours = dict(model.named_parameters())
    export = HFCheckpoint(out, key_renamer=canonical_mllama_key)
    for route in mllama_weight_map(mllama_args_from_config(export.config)):
        if route.our_key in get_fusion_params(model):
            assert torch.equal(export.read(route.hf_key, route.rows), ours[route.our_key].detach().to(want[1])), route

    # --dtype still forces one dtype on every tensor
    forced = tmp_path / "forced"
    other = "fp32" if stored == "bf16" else "bf16"
    assert main(["--checkpoint", str(checkpoint), "--out", str(forced), "--dtype", other]) == 0
    assert {dtype for dtype, _ in _stored(forced).values()} == {"F32" if other == "fp32" else "BF16"}
    assert json.loads((forced / "config.json").read_text())["dtype"] == str(DTYPES[other]).removeprefix("torch.")


def test_a_mixed_dtype_base_keeps_each_tensors_dtype(trained_mllama, tiny_mllama_dir: Path, tmp_path: Path) -> None:
    """Vision tensors in bf16, the rest in fp32: each is exported in its own dtype, the fusion
    tensors in their base tensor's; the config names the dtype of most elements."""
    model, _ = trained_mllama
    base_dir = _base_in(
        tiny_mllama_dir, tmp_path / "mixed", lambda name: torch.bfloat16 if name.startswith("vision_model.") else None
    )
    checkpoint = write_checkpoint(
        tmp_path / "run", {"fusion": get_fusion_params(model)}, {"family": "mllama", "folders": {"hf_mllama": str(base_dir)}}
    )
    out = export_checkpoint(checkpoint, tmp_path / "out")
    base, exported = _stored(base_dir), _stored(out)
    assert {dtype for dtype, _ in base.values()} == {"F32", "BF16"}
    trained = _trained_hf_keys(model, base_dir)
    for name, (dtype, raw) in exported.items():
        assert dtype == base[name][0], name
        if name not in trained:
            assert torch.equal(raw, base[name][1]), name
    elements = {"F32": 0, "BF16": 0}
    with safe_open(base_dir / "model.safetensors", framework="pt") as handle:
        for name in handle.keys():
            elements[handle.get_slice(name).get_dtype()] += handle.get_tensor(name).numel()
    dominant = "float32" if elements["F32"] > elements["BF16"] else "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == dominant


def test_composed_fusion_parameters_take_the_dominant_base_dtype(
    tiny_llama_dir: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    """A bf16 decoder (most of the elements) and an fp32 encoder: each base tensor keeps its
    dtype, bit for bit; the fusion parameters, which no base tensor holds, come out bf16."""
    decoder_dir = _base_in(tiny_llama_dir, tmp_path / "llama", lambda _: torch.bfloat16)
    encoder_dir = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, encoder_dir)
    decoder, encoder = _stored(decoder_dir), _stored(encoder_dir)
    assert sum(raw.numel() // 2 for _, raw in decoder.values()) > sum(raw.numel() // 4 for _, raw in encoder.values())
    model = compose_from_hf(decoder_dir, encoder_dir, fusion_interval=2, fusion_vocab_size=8)
    fusion = get_fusion_params(model)
    perturb(fusion, seed=4)
    base = {
        "family": "composed",
        "folders": {"decoder": str(decoder_dir), "encoder": str(encoder_dir)},
        "fusion_interval": 2,
        "fusion_vocab_size": 8,
    }
    checkpoint = write_checkpoint(tmp_path / "run", {"fusion": fusion}, base)
    out = export_checkpoint(checkpoint, tmp_path / "out")
    assert json.loads((out / "fusiontrain_config.json").read_text())["dtype"] == "bfloat16"
    exported = _stored(out)

    # every base tensor (found by its bytes' owner: the route from the family's weight map) as stored
    prepared = model_family("composed").prepare(
        {"decoder": decoder_dir, "encoder": encoder_dir},
        {"fusion_interval": 2, "fusion_vocab_size": 8},
        TrainableFlags(),
        seed=0,
    )
    routed = 0
    for source, stored in zip(prepared.sources, (decoder, encoder), strict=True):
        for route in source.routes:
            name = source.checkpoint._stored_name[route.hf_key]
            assert route.rows is None and exported[route.our_key][0] == stored[name][0], route
            assert torch.equal(exported[route.our_key][1], stored[name][1]), route
            routed += 1
    assert routed == len(exported) - len(fusion)
    # the fusion parameters: the trained values, in bf16
    loaded = dict(load_fusiontrain_export(out).named_parameters())
    for name, value in fusion.items():
        assert exported[name][0] == "BF16", name
        assert torch.equal(loaded[name], value.detach().to(torch.bfloat16).float()), name


# -- errors and the output folder ---------------------------------------------------------------------


def _cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_errors(trained_mllama, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, checkpoint = trained_mllama
    out = str(tmp_path / "out")
    missing = tmp_path / "nowhere"
    assert str(missing) in _cli_error(capsys, ["--checkpoint", str(missing), "--out", out])

    empty = tmp_path / "empty"
    empty.mkdir()
    err = _cli_error(capsys, ["--checkpoint", str(empty), "--out", out])
    assert str(empty) in err and "manifest.json" in err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoint, corrupt)
    (corrupt / "manifest.json").write_text('{"format": "fusiontrain-checkpoint", "vers')
    err = _cli_error(capsys, ["--checkpoint", str(corrupt), "--out", out])
    assert str(corrupt) in err and "cannot read" in err

    (corrupt / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    assert "format 'something-else'" in _cli_error(capsys, ["--checkpoint", str(corrupt), "--out", out])

    no_part = tmp_path / "no_part"
    shutil.copytree(checkpoint, no_part)
    shutil.rmtree(no_part / "fusion")
    assert "fusion/shard-00001-model-00001-of-00001.safetensors is missing" in _cli_error(capsys, ["--checkpoint", str(no_part), "--out", out])

    assert "--max-shard-size" in _cli_error(capsys, ["--checkpoint", str(checkpoint), "--out", out, "--max-shard-size", "lots"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_existing_output_is_kept_unless_forced(trained_mllama, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, checkpoint = trained_mllama
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = _cli_error(capsys, ["--checkpoint", str(checkpoint), "--out", str(out)])
    assert str(out) in err and "--force" in err
    assert (out / "precious.txt").read_text() == "keep me"

    (tmp_path / "out.old").mkdir()  # a neighbour with a telling name is left alone
    assert main(["--checkpoint", str(checkpoint), "--out", str(out), "--force"]) == 0
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.old"]

    # an empty folder is fine without --force; the base or the checkpoint itself never are
    (tmp_path / "empty").mkdir()
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "empty")]) == 0
    base = json.loads((checkpoint / "manifest.json").read_text())["base"]["folders"]["hf_mllama"]
    assert "would overwrite" in _cli_error(capsys, ["--checkpoint", str(checkpoint), "--out", base, "--force"])
    assert "would overwrite" in _cli_error(capsys, ["--checkpoint", str(checkpoint), "--out", str(checkpoint.parent), "--force"])


def test_a_crash_leaves_no_export(trained_mllama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, checkpoint = trained_mllama
    calls = []

    def crash(self, name, tensor):
        calls.append(name)
        if len(calls) == 20:
            raise RuntimeError("disk full")
        return original(self, name, tensor)

    original = ShardWriter.add
    monkeypatch.setattr(ShardWriter, "add", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_checkpoint(checkpoint, tmp_path / "out", max_shard_bytes=SMALL_SHARD)
    assert list(tmp_path.iterdir()) == []

    # a process killed mid-export leaves <out>.tmp with its marker: the next export clears it
    monkeypatch.setattr(ShardWriter, "add", original)
    stale = tmp_path / "out.tmp"
    stale.mkdir()
    (stale / ".fusiontrain-export-in-progress").touch()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"half")
    export_checkpoint(checkpoint, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (tmp_path / "out" / "model-00001-of-00009.safetensors").exists()
    # ... but a <out>.tmp that is not ours is never deleted
    (tmp_path / "other.tmp").mkdir()
    with pytest.raises(ExportError, match="not a partial export"):
        export_checkpoint(checkpoint, tmp_path / "other")
    assert (tmp_path / "other.tmp").is_dir()


def test_changed_base_is_refused(trained_mllama, tiny_mllama_dir: Path, tmp_path: Path) -> None:
    model, _ = trained_mllama
    base = tmp_path / "base"
    shutil.copytree(tiny_mllama_dir, base)
    size = (base / "model.safetensors").stat().st_size
    fingerprint = {"hf_mllama/model.safetensors": {"size": size + 1, "sha256": "0" * 64}}
    checkpoint = write_checkpoint(
        tmp_path / "run",
        {"fusion": get_fusion_params(model)},
        {"family": "mllama", "folders": {"hf_mllama": str(base)}},
        fingerprint=fingerprint,
    )
    with pytest.raises(ExportError, match="other base weights"):
        export_checkpoint(checkpoint, tmp_path / "out")
    export_checkpoint(checkpoint, tmp_path / "out", allow_base_mismatch=True)

    # the trainer's real fingerprint: sizes are compared for free, hashes with verify_base
    from fusiontrain.checkpoint.fingerprint import fingerprint as base_fingerprint

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["fingerprint"] = base_fingerprint({"hf_mllama": str(base)})
    layout.write_manifest(checkpoint, manifest)
    export_checkpoint(checkpoint, tmp_path / "out", verify_base=True, force=True)
    with (base / "model.safetensors").open("r+b") as handle:  # same size, other bytes
        handle.seek(-4, 2)
        handle.write(b"\x01\x02\x03\x04")
    export_checkpoint(checkpoint, tmp_path / "out", force=True)
    with pytest.raises(ExportError, match="model.safetensors changed"):
        export_checkpoint(checkpoint, tmp_path / "out", verify_base=True, force=True)
    shutil.rmtree(base)
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(checkpoint, tmp_path / "out2")


def test_the_cli_offers_the_exporters_formats_and_dtypes() -> None:
    assert EXPORT_FORMATS == FORMATS and EXPORT_DTYPES == tuple(DTYPES)


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("5GiB") == 5 * 2**30
    assert parse_size("300KB") == 300_000
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("4096") == 4096
    for bad in ("lots", "5XB", "0", "-1GB", "5Gi"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -- layout -------------------------------------------------------------------------------------------


def test_layout_lists_only_complete_checkpoints(tmp_path: Path) -> None:
    base = {"family": "mllama", "folders": {"hf_mllama": "/somewhere"}}
    tensors = {"x": torch.zeros(2)}
    for step in (3, 12, 100):
        folder = layout.tmp_dir(tmp_path, step)
        folder.mkdir(parents=True)
        save_tensors(tensors, layout.part_dir(folder, "fusion"))
        layout.write_manifest(folder, layout.new_manifest(step, ["fusion"], base))
        if step != 100:  # step 100 stays a temporary folder: its save never finished
            folder.rename(layout.checkpoint_dir(tmp_path, step))
    layout.checkpoint_dir(tmp_path, 50).mkdir()  # no manifest
    broken = layout.checkpoint_dir(tmp_path, 60)
    broken.mkdir()
    layout.write_manifest(broken, layout.new_manifest(60, ["fusion", "decoder"], base))  # no DCP data
    assert layout.list_complete(tmp_path) == [
        (3, layout.checkpoint_dir(tmp_path, 3)),
        (12, layout.checkpoint_dir(tmp_path, 12)),
    ]
    assert layout.latest_complete(tmp_path) == (12, layout.checkpoint_dir(tmp_path, 12))
    assert layout.latest_complete(tmp_path / "elsewhere") is None
    assert layout.checkpoint_dir(tmp_path, 12) == tmp_path / "checkpoints" / "step_12"
    assert layout.tmp_dir(tmp_path, 12) == tmp_path / "checkpoints" / ".tmp-step_12"
    assert not layout.is_complete(layout.tmp_dir(tmp_path, 100))
    unfinished = layout.tmp_dir(tmp_path, 200)
    unfinished.mkdir()
    with pytest.raises(layout.CheckpointError, match="did not complete"):
        layout.read_manifest(unfinished)
    assert layout.read_manifest(layout.checkpoint_dir(tmp_path, 3))["step"] == 3
    with pytest.raises(layout.CheckpointError, match="newer"):
        layout.write_manifest(tmp_path, {**layout.new_manifest(1, ["fusion"], base), "version": 99})
    with pytest.raises(layout.CheckpointError, match="parts"):
        layout.new_manifest(1, ["fusion", "optimizer"], base)

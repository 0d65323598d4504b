"""``benchmarks/gpu_scale.py``: its shapes are the models it names, and its CPU mode
(``--device cpu --tiny``) runs both sides end to end, so the GPU run has only the GPU to find."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_scale
from fusiontrain.source.model_source import ModelSource
from fusiontrain.train.model import build_meta_model
from tests.helpers.launch import run_commands

REPO_ROOT = Path(__file__).resolve().parents[1]


def _meta_model(shape: str, tmp_path: Path):
    folder = gpu_scale.shape_folder(shape, tmp_path)
    config = gpu_scale.run_config(
        folder, tmp_path / shape, seq_len=4096, packing=True, rows=1, precision="bf16", checkpointing="none", samples=10
    )
    return config, build_meta_model(config.model, ModelSource.from_config(config.model))


def test_shapes_are_llama_3_2_11b_vision_and_a_1b_text_model(tmp_path: Path) -> None:
    """The 11B shape has Llama 3.2 11B Vision's 10,670,220,835 parameters (transformers' count of
    the released model), 1.93B of them fusion parameters; the 1B shape has Llama 3.2 1B's text
    sizes with the same vision tower, cross-attention every 5th layer."""
    eleven_config, eleven = _meta_model("11b", tmp_path)
    assert eleven_config.batch.seq_len == 4096 and eleven_config.model.frozen_dtype == "bfloat16"
    assert sum(p.numel() for p in eleven.parameters()) == 10_670_220_835
    assert sum(p.numel() for p in eleven.parameters() if p.requires_grad) == 1_933_770_784
    _, one = _meta_model("1b", tmp_path)
    text = json.loads((tmp_path / "shape_1b" / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["cross_attention_layers"]) == (2048, 20, [3, 8, 13, 18])
    assert sum(p.numel() for p in one.parameters()) == 2_621_083_675
    vision = lambda model: sum(p.numel() for p in model.encoder.vision.parameters())  # noqa: E731
    assert vision(one) == vision(eleven)


@pytest.mark.timeout(300)
def test_cpu_tiny_mode_runs_both_sides(tmp_path: Path) -> None:
    """Plan, fusiontrain's step (with the per-phase split) and HF's loop on the tiny Mllama: every
    figure the GPU run reports is there and sane."""
    out = tmp_path / "gpu_scale.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_scale.py"), "--device", "cpu", "--tiny", "--json", str(out)]
    (result,) = run_commands([command], timeout=280, cwd=tmp_path, fork=True)  # raises, with the output, unless it exits 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["precision"] == "fp32" and report["peak_flops"] > 0
    entry = report["shapes"]["tiny"]
    assert entry["plan"]["checkpointing"] == "none" and entry["plan"]["fits"]
    for side in ("fusiontrain", "hf"):
        figures = entry[side]
        assert figures["steps"] == 2 and figures["real_tokens_per_s"] > 0 and 0 < figures["mfu"] < 1, (side, figures)
        assert figures["trainable_parameters"] == entry["fusiontrain"]["trainable_parameters"]
    phases = entry["fusiontrain"]["phases_s"]
    assert set(phases) == {"host", "loss", "backward", "optimizer", "forward (the rest)"}
    assert all(seconds > 0 for seconds in phases.values()), phases
    assert entry["speedup"] > 0 and "fusiontrain / HF real tokens/s" in result.stdout

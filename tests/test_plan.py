"""The planner: its memory tracker against real tensors, its prediction against measured training
runs, and `train --dry-run` / `plan` on the shipped configs for real models."""

from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import Path

import pytest
import torch

from benchmarks.models import bench_mllama_config
from fusiontrain import tiny
from fusiontrain.source.model_source import ModelSource
from fusiontrain.train.model import build_meta_model
from fusiontrain.families import model_family_of
from fusiontrain.config import load_config
from fusiontrain.train.loss import chunked_cross_entropy_sum
from fusiontrain.plan.memory import TensorMemoryTracker
from fusiontrain.plan.trace import worst_case_batch
from fusiontrain.plan.planner import planned_world_size
from tests.helpers.launch import REPO_ROOT, run_command, run_commands, run_world
from tests.helpers import plan_many
from tests.helpers.shipped_configs import load_raw, missing_folder_fixtures

TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"
REAL_MODEL_CONFIGS = [
    "llama32_11b_vision.yaml",
    "llama32_90b_vision.yaml",
    "llama31_8b_siglip.yaml",
    "qwen3_8b_siglip2.yaml",
]


# -- the tracker ----------------------------------------------------------------------------------


def _forward_backward(model: torch.nn.Module, batch, tracker: TensorMemoryTracker) -> None:
    with tracker:
        hidden = model(
            batch.tokens,
            mask=batch.self_attention_mask(),
            encoder_input=batch.encoder_input,
            encoder_mask=batch.encoder_mask,
            input_pos=batch.input_pos,
        )
        with tracker.label("loss chunk"):
            loss = chunked_cross_entropy_sum(
                hidden, batch.labels, model.decoder.output, num_chunks=4, target_index=batch.target_index
            )
        del hidden
        with tracker.label("backward"):
            loss.backward()


def test_fake_trace_equals_real_tensors(tiny_mllama_dir: Path) -> None:
    """The same forward + chunked loss + backward traced on fake tensors and run on real ones:
    identical peaks and breakdowns (the tracker sees the same allocations either way)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = load_config(TINY_CONFIG, [f"model.hf_mllama={tiny_mllama_dir}"])
    results = []
    for fake in (False, True):
        model = build_meta_model(config.model, ModelSource.from_config(config.model))
        batch = worst_case_batch(model_family_of(model).image_format(model), rows=2, seq_len=48, images_per_row=2, packing=True)
        batch = batch.with_target_index(-100)  # on the host: fake labels cannot say how many targets there are
        tracker = TensorMemoryTracker("activations")
        if fake:
            with FakeTensorMode(allow_non_fake_inputs=True):
                model.to_empty(device="cpu")
                model.set_skip_output_projection(True)
                _forward_backward(model, batch, tracker)
        else:
            model.to_empty(device="cpu")
            torch.manual_seed(0)
            for param in model.parameters():
                torch.nn.init.normal_(param, std=0.02)
            model.set_skip_output_projection(True)
            _forward_backward(model, batch, tracker)
        results.append((tracker.peak, tracker.at_peak, tracker.peak_label))
    assert results[0][0] > 100_000
    assert results[0] == results[1]


def test_tracker_counts_live_storages_once() -> None:
    weight = torch.randn(64, 64)  # created before tracking: never counted
    tracker = TensorMemoryTracker("x")
    with tracker:
        a = torch.randn(128, 64)  # 32 KiB
        view = a[:10].t()  # a view: nothing new
        b = a @ weight  # 32 KiB
        with tracker.label("y"):
            c = torch.cat([a, b])  # 64 KiB
        transposed = weight.t()  # a view of an untracked tensor: nothing
        del a, view
        assert tracker.tracked == 3 * 32 * 1024  # a lives on until its view dies too
    assert tracker.peak == 4 * 32 * 1024
    assert tracker.at_peak == {"x": 2 * 32 * 1024, "y": 2 * 32 * 1024}
    del b, c, transposed
    assert tracker.tracked == 0


def test_an_fsdp_unit_is_counted_once_and_inside_its_unshard() -> None:
    """A unit of two modules sharing one FSDP parameter group (as the final norm and the output
    projection do) counts its unsharded parameters once; inside its unshard over one rank, each
    bf16 shard cast to the fp32 compute dtype (a tensor) lives beside the copies allocated so
    far (storages FSDP2 resizes, which no op reports): the peak holds both."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fusiontrain.plan.trace import _UnshardedParameters, fake_process_group

    with fake_process_group(1):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(64, 256, bias=False))
        model.to(torch.bfloat16).requires_grad_(False)
        fully_shard(list(model), mesh=init_device_mesh("cpu", (1,)), mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32))
        model[0].unshard()  # the first unshard makes FSDP2's buffers; later ones resize them
        model[0].reshard()
        poll = _UnshardedParameters(model)
        assert poll() == 0
        tracker = TensorMemoryTracker("casts", untracked={"unsharded": poll})
        with tracker:
            model[0].unshard()
        fp32_bytes = (4 * 4 + 64 * 256) * 4
        assert poll() == fp32_bytes  # once, though two modules share the group
        # at the larger parameter's copy: every copy, and that parameter's cast shard
        assert tracker.peak == fp32_bytes + 64 * 256 * 4
        model[0].reshard()
        assert poll() == 0


# -- prediction against measurement ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_mllama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmarks' Mllama (d=512, 32k vocabulary, 63M parameters): large enough that tensors,
    not the runtime, dominate a run's memory."""
    path, _ = tiny.save_tiny_mllama(
        tmp_path_factory.mktemp("bench_mllama"), config=bench_mllama_config(), save_tokenizer=False
    )
    return path


# Worst-case batches every step (what the plan assumes): samples of one image and 63 text tokens,
# 4 to a packed row of 256; or samples of 256 tokens, 2 in one padding-free row (data.padding_free).
_FIXED = ["data.synthetic_lengths=fixed", "data.synthetic_max_text=63", "batch.seq_len=256", "batch.micro_batch_size=2"]
# (A run of one micro-batch with fp32 storage is not among them: the bf16-storage run is that run
# with its frozen weights stored in bf16, and the accumulation run has fp32 storage.)
MEASURED_CONFIGS = {
    # The step holds its 4 host micro-batches and moves one at a time to the device (on a CPU the
    # same memory), with the unsharded gradients accumulating in between.
    "1 rank, packed, 4 accumulation micro-batches": (1, ["batch.global_batch_size=8"]),
    # Frozen weights stored bf16 (model.frozen_dtype), computed in fp32: FSDP casts them up.
    "1 rank, packed, frozen weights stored bf16": (1, ["batch.global_batch_size=2", "model.frozen_dtype=bfloat16"]),
    # Samples of 512 tokens: the run's memory outside tensors (31-50 MiB on the CPU, more under
    # load; the plan counts tensors) stays well inside 10% of its peak.
    "2 ranks, padding-free": (
        2,
        [
            "batch.global_batch_size=4", "data.packing=false", "data.max_images_per_row=1", "batch.seq_len=512",
            "data.synthetic_max_text=511",
        ],
    ),
    "2 ranks, decoder trained, checkpointing every 2nd block, 2 micro-batches": (
        2,
        ["batch.global_batch_size=8", "model.decoder_trainable=true", "parallel.activation_checkpointing=2"],
    ),
}


@pytest.mark.parametrize("name", list(MEASURED_CONFIGS))
def test_plan_predicts_measured_peak_within_10_percent(name: str, bench_mllama_dir: Path, tmp_path: Path) -> None:
    """The plan's peak against the peak of a real training run of the same config, measured as
    the RSS high-water mark above the RSS before the model was built (the two run side by side:
    CPU contention changes times, not memory)."""
    nproc, extra = MEASURED_CONFIGS[name]
    overrides = [f"model.hf_mllama={bench_mllama_dir}", *_FIXED, *extra]
    plan_command = [sys.executable, "-m", "fusiontrain", "plan", "--config", str(TINY_CONFIG), "--json"]
    train_args = [
        *("-m", "fusiontrain", "train", "--config", str(TINY_CONFIG), *overrides),
        *(f"output_dir={tmp_path}", "max_steps=2", "data.num_workers=0", "eval.every_n_steps=0"),
    ]
    _, (plan,) = run_world(
        train_args,
        nproc=nproc,
        beside=[[*plan_command, "--gpus", str(nproc), "--gpu", "cpu", *overrides]],
        timeout=300,
        # Freed tensors leave the RSS at once (large blocks are mmap'ed and unmapped).
        env={"MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    predicted = json.loads(plan.stdout[plan.stdout.index("{") :])["peak_bytes"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(row["real_token_share"] == 1.0 for row in rows)  # the batches were the worst case
    measured = rows[1]["peak_memory_bytes"]  # step 1: the optimizer state exists
    assert abs(predicted - measured) <= 0.10 * measured, (
        f"{name}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    )


# -- the shipped configs for real models --------------------------------------------------------------


def _peak_line(text: str) -> str:
    match = re.search(r"peak \((?:forward/backward|optimizer step)\)\s+([\d.]+)", text)
    assert match, text[-2000:]
    return match.group(1)


SHIPPED_CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
PLAN_COMMENT = re.compile(
    r"^# plan \(python -m fusiontrain plan --config (\S+); scripts/refresh_config_plans\.py writes it\):$", re.MULTILINE
)
HOST_MEMORY_BOUND = 4 * 2**30  # what `plan` may hold on a login node or laptop, at any world size


def _dry_run_command(path: Path, request: pytest.FixtureRequest) -> list[str]:
    """The arguments of ``python -m fusiontrain`` for ``train --dry-run`` of one shipped config
    with no flags (its own device kind and world size). A model folder the config names that is
    not in the repository (tiny.yaml's) is replaced by the tiny model of its family."""
    missing = missing_folder_fixtures(load_raw(path))
    overrides = [f"{key}={request.getfixturevalue(fixture)}" for key, fixture in missing.items()]
    return ["train", "--dry-run", "--config", str(path), *overrides]


def _shard_bytes(text: str) -> float:
    """The plan's bytes of one device's parameter shards (its one line, or the trained and the
    frozen line), from the GiB it prints."""
    lines = re.findall(r"^\s+(?:trained |frozen )?parameters \(shards, \w+\)\s+([\d.]+)$", text, re.MULTILINE)
    assert lines, text[-3000:]
    return sum(float(gib) for gib in lines) * 2**30


@pytest.mark.timeout(900)  # five planner traces, four of 8B-90B models, in two processes: about 80 s on 2 busy cores
def test_shipped_configs_plan_within_the_host_memory_bound_and_their_plan_comments_are_current(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shipped config plans (``train --dry-run``) with its own defaults (device kind, world
    size), each plan holding under HOST_MEMORY_BOUND of host memory and, for a real model, under
    half of one device's parameter shards: the planner traces on fake tensors and never holds the
    model's bytes (before that was fixed, it made real shards: Qwen3 8B at world 1 grew past 23 GB).
    Each real config's shards are 4.7 GiB or more per device at its own world, so such a planner
    fails here at any world size. The plan pasted into a real-model config's header comment is what
    the planner prints today. (Planning at world 1 is tested by the measured-peak tests, for an
    Mllama folder here and a composed model in test_plan_multi_encoder.py.)"""
    monkeypatch.chdir(REPO_ROOT)  # the configs name their model folders relative to the repository
    runs = [(path, _dry_run_command(path, request)) for path in SHIPPED_CONFIGS]
    # Two processes, one per core, each planning every other config in turn (tests/helpers/
    # plan_many.py): a process per config costs an interpreter and torch start and a cold
    # fake-tensor cache each; all at once took a quarter more CPU (cache and memory contention), and
    # the suite is CPU-bound; both are forked from the zygote (tests/helpers/zygote.py), which has
    # imported torch and fusiontrain. A process's peak RSS after a plan (counting what the fork
    # inherited) bounds that plan's own.
    helper = [sys.executable, str(REPO_ROOT / "tests" / "helpers" / "plan_many.py")]
    groups = [runs[0::2], runs[1::2]]
    commands = [[*helper, *[arg for _, args in group for arg in [*args, "---"]]] for group in groups]
    outputs = [plan_many.outputs(result.stdout) for result in run_commands(commands, timeout=600, fork=True)]
    results = {path: output for group, output in zip(groups, outputs) for (path, _), output in zip(group, output, strict=True)}
    peaks = []
    for path, _ in runs:
        text, code, peak = results[path]
        assert code == 0 and "memory per device" in text, text[-3000:]
        peaks.append(f"{path.name}: {peak / 2**20:.0f} MiB")
        assert peak < HOST_MEMORY_BOUND, f"planning {path.name} held {peak / 2**30:.1f} GiB of host memory"
        if path.name in REAL_MODEL_CONFIGS:
            shards = _shard_bytes(text)
            assert shards > HOST_MEMORY_BOUND, f"{path.name}: {shards / 2**30:.2f} GiB of shards no longer tests the bound"
            assert peak < shards / 2, f"planning {path.name} held {peak / 2**30:.1f} GiB, {shards / 2**30:.1f} GiB of shards"
    print("planner host peaks (each process's high-water mark so far): " + "; ".join(peaks))
    for path, _ in runs:
        text = results[path][0]
        comment = PLAN_COMMENT.search(path.read_text())
        if comment is not None:
            assert comment.group(1) == f"configs/{path.name}", comment.group(0)
            assert ": fits" in text, text[-3000:]
            assert _peak_line(path.read_text()) == _peak_line(text), (
                f"configs/{path.name}: its plan comment is stale; run python scripts/refresh_config_plans.py"
            )
    assert {path.name for path in SHIPPED_CONFIGS if PLAN_COMMENT.search(path.read_text())} == set(REAL_MODEL_CONFIGS)


def test_plan_defaults_come_from_the_config(tiny_mllama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Without --gpus the world is the config's mesh, else its plan.gpus, else an error naming
    --gpus; without --gpu on a machine with no GPU, the config's plan.gpu, else an error naming
    --gpu. A plan.gpus that disagrees with the mesh is a config error."""
    from fusiontrain.cli import PLAN_DEVICES
    from fusiontrain.cli import main as cli_main
    from fusiontrain.config import ConfigError, PlanConfig
    from fusiontrain.plan.planner import GPUS, planned_hardware

    monkeypatch.chdir(REPO_ROOT)
    ninety = load_config(REPO_ROOT / "configs" / "llama32_90b_vision.yaml")
    assert planned_world_size(ninety, None) == 32 and planned_world_size(ninety, 4) == 4
    assert planned_hardware(ninety, None) == GPUS["h100"] and planned_hardware(ninety, "a100") == GPUS["a100"]
    eight = load_config(REPO_ROOT / "configs" / "qwen3_8b_siglip2.yaml")
    assert (eight.parallel.dp_shard, planned_world_size(eight, None)) == (-1, 8)
    model = f"model.hf_mllama={tiny_mllama_dir}"
    bare = load_config(TINY_CONFIG, [model, "plan.gpu=null"])
    assert planned_world_size(bare, None, default=1) == 1
    with pytest.raises(ValueError, match="pass --gpus N"):
        planned_world_size(bare, None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pass --gpu KIND"):
            planned_hardware(bare, None)
        assert cli_main(["plan", "--config", str(TINY_CONFIG), model, "plan.gpu=null", "--gpus", "1"]) == 2
        assert "pass --gpu KIND" in capsys.readouterr().err
    assert cli_main(["plan", "--config", str(TINY_CONFIG), model]) == 2
    assert "pass --gpus N" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="plan.gpus.*disagrees"):
        load_config(REPO_ROOT / "configs" / "llama32_90b_vision.yaml", ["plan.gpus=8"])
    with pytest.raises(ConfigError, match="'plan.gpu' must be one of"):
        load_config(TINY_CONFIG, [model, "plan.gpu=v100"])
    kinds = typing.get_args(typing.get_args(typing.get_type_hints(PlanConfig)["gpu"])[0])
    assert set(kinds) == {*GPUS, "cpu"} == set(PLAN_DEVICES)  # the config's and the CLI's choices are the planner's


def test_dry_run_reports_a_missing_model_config(tmp_path: Path) -> None:
    folder = tmp_path / "empty_model"
    folder.mkdir()
    command = [sys.executable, "-m", "fusiontrain", "train", "--config", str(TINY_CONFIG), "--dry-run"]
    with pytest.raises(AssertionError, match=r"model.hf_mllama.*config.json is missing"):
        run_command([*command, f"model.hf_mllama={folder}"], timeout=120)


# -- activation offloading ----------------------------------------------------------------------------


def test_offloading_moves_the_offloaded_bytes_from_device_to_host_memory(bench_mllama_dir: Path) -> None:
    """The plan with parallel.activation_offloading=checkpointed against the same without: the
    device peak falls by what the host gains (the checkpointed blocks' inputs, at their peak all
    on the host). Rows of 512 tokens make each block input [2, 512, 512] bf16 = 1 MiB, the
    smallest tensor that is offloaded."""
    from fusiontrain.plan.planner import GPUS, plan_run

    overrides = [f"model.hf_mllama={bench_mllama_dir}", *_FIXED, "batch.seq_len=512", "batch.global_batch_size=2",
                 "parallel.activation_checkpointing=full"]
    plans = {
        mode: plan_run(load_config(TINY_CONFIG, [*overrides, f"parallel.activation_offloading={mode}"]), gpus=1, hardware=GPUS["h100"])
        for mode in ("none", "checkpointed")
    }
    offloaded = plans["checkpointed"].host_memory["offloaded activations (at their peak)"]
    assert "offloaded activations (at their peak)" not in plans["none"].host_memory
    assert offloaded >= 4 * 2**20  # a block input of each of the decoder's checkpointed blocks, at least
    assert plans["none"].peak_bytes - plans["checkpointed"].peak_bytes == offloaded
    assert plans["none"].memory["decoder activations"] - plans["checkpointed"].memory["decoder activations"] == offloaded

"""Resuming training: bitwise identical to an uninterrupted run on CPU (2 ranks, packed data,
a dataloader worker), after a planned stop, after a SIGKILL under torchrun --max-restarts 1, and
after three SIGKILLs of random ranks at random steps under --max-restarts 3 (chaos);
refusals for another base or another data order; fusion-only checkpoint size."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusiontrain.checkpoint import layout
from fusiontrain.parallel.processes import descendant_pids, parent_pid
from tests.helpers.launch import LOCAL_RDZV_ENDPOINT, REPO_ROOT, launch_env, run_commands, run_world
from tests.helpers.shared import PACKED_RUN, WITH_WORKERS, uninterrupted_packed_run

HARNESS = str(REPO_ROOT / "tests" / "helpers" / "train_harness.py")
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
RUN = PACKED_RUN


def _harness(out: Path, output_dir: Path, nproc: int, *overrides: str, mllama: Path) -> tuple[dict, dict]:
    args = [HARNESS, str(out), "--config", TINY_CONFIG, f"model.hf_mllama={mllama}", f"output_dir={output_dir}", *RUN, *overrides]
    run_world(args, nproc=nproc, timeout=300)
    return json.loads((out / "report.json").read_text()), load_file(out / "trainable.safetensors")


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, tiny_mllama_dir) -> tuple[dict, dict, Path]:
    """Report, final trainable weights and output folder of an 8-step run checkpointed at 4 and 8
    (shared with tests/test_preemption.py: tests/helpers/shared.py)."""
    return uninterrupted_packed_run(tmp_path_factory, tiny_mllama_dir)


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> tuple[dict, dict]:
    return uninterrupted_run[:2]


def _assert_bitwise(weights: dict, reference: dict) -> None:
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name


def test_resumed_run_is_bitwise_identical(tmp_path, tiny_mllama_dir, uninterrupted) -> None:
    first, _ = _harness(tmp_path / "h1", tmp_path / "run", 2, "checkpoint.every_n_steps=4", "stop_after_steps=4", mllama=tiny_mllama_dir)
    assert len(first["losses"]) == 4 and (tmp_path / "run" / "checkpoints" / "step_4" / "manifest.json").is_file()
    second, weights = _harness(tmp_path / "h2", tmp_path / "run", 2, "checkpoint.every_n_steps=4", mllama=tiny_mllama_dir)
    assert first["losses"] + second["losses"] == uninterrupted[0]["losses"]  # every step, exactly
    _assert_bitwise(weights, uninterrupted[1])


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _is_worker(pid: int, local_rank: int = 1, command: str = "train_harness.py") -> bool:
    """Whether ``pid`` is torchrun's worker of ``local_rank`` running ``command`` (in its command
    line): a child of the torchrun agent (its
    dataloader workers share its command line and environment, and one orphaned by a rank that
    just exited would be no rank at all)."""
    try:
        cmdline = _cmdline(pid)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        parent = _cmdline(parent_pid(pid) or 0)
    except OSError:
        return False
    wanted = f"LOCAL_RANK={local_rank}".encode()
    return (
        command in cmdline
        and wanted in environ
        and "torch.distributed.run" not in cmdline
        and "torch.distributed.run" in parent
    )


def test_sigkilled_rank_restarts_and_resumes_to_the_same_weights(tmp_path, tiny_mllama_dir, uninterrupted) -> None:
    out, run = tmp_path / "h", tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", LOCAL_RDZV_ENDPOINT,
        HARNESS, str(out), "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={run}",
        *RUN, WITH_WORKERS, "checkpoint.every_n_steps=2",
    ]
    log = (tmp_path / "torchrun.log").open("w")
    process = subprocess.Popen(command, env=launch_env(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "step_4" / "manifest.json").is_file():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its step 4 checkpoint"
            time.sleep(0.05)
        victims = [pid for pid in descendant_pids(process.pid) if _is_worker(pid)]
        assert victims, "no rank-1 worker found"
        os.kill(victims[0], signal.SIGKILL)
        assert process.wait(timeout=150) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    text = (tmp_path / "torchrun.log").read_text()
    assert "resumed from" in text and "step_" in text
    _assert_bitwise(load_file(out / "trainable.safetensors"), uninterrupted[1])


def _train(output_dir: Path, nproc: int, mllama: Path, *overrides: str):
    args = ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={mllama}", f"output_dir={output_dir}", *RUN, *overrides]
    return run_world(args, nproc=nproc, timeout=240)


def test_resume_refuses_another_base_or_data_order(tmp_path, tiny_mllama_dir) -> None:
    """(Another world size is fine: tests/test_elastic.py; so one rank shows the refusals.)"""
    run = tmp_path / "run"
    _train(run, 1, tiny_mllama_dir, "checkpoint.every_n_steps=2", "stop_after_steps=2")
    with pytest.raises(AssertionError, match="another row plan.*seed: saved 0, now 1"):
        _train(run, 1, tiny_mllama_dir, "checkpoint.every_n_steps=2", "seed=1")
    other = tmp_path / "other_base"
    shutil.copytree(tiny_mllama_dir, other)
    tensors = load_file(other / "model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.0.mlp.down_proj.weight"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, other / "model.safetensors")
    with pytest.raises(AssertionError, match="other base weights"):
        _train(run, 1, other, "checkpoint.every_n_steps=2")
    _train(run, 1, other, "checkpoint.every_n_steps=2", "checkpoint.allow_base_mismatch=true", "max_steps=4")


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_fusion_only_checkpoints_are_smaller_than_full_ones(tmp_path, tiny_mllama_dir) -> None:
    sizes = {}
    for mode in ("false", "true"):
        run = tmp_path / mode
        _train(run, 1, tiny_mllama_dir, "checkpoint.every_n_steps=2", "max_steps=2", f"checkpoint.save_frozen={mode}")
        step = run / "checkpoints" / "step_2"
        manifest = json.loads((step / "manifest.json").read_text())
        sizes[mode] = (sum(_size(step / part) for part in manifest["parts"]), _size(step))
        assert manifest["parts"] == (["decoder", "encoder", "fusion"] if mode == "true" else ["fusion"])
    weights_ratio = sizes["false"][0] / sizes["true"][0]
    print(f"fusion-only / full checkpoint: weights {weights_ratio:.3f}, with optimizer {sizes['false'][1] / sizes['true'][1]:.3f}")
    assert weights_ratio < 0.5


def test_export_of_a_training_checkpoint_loads_in_transformers(tmp_path, tiny_mllama_dir, uninterrupted_run) -> None:
    """The step-8 checkpoint of the 2-rank run, exported in HF layout: transformers' logits equal
    our model with the trained fusion weights (inputs where every text row sees an image)."""
    from transformers import MllamaForConditionalGeneration

    from benchmarks.models import mllama_pixel_inputs
    from fusiontrain import tiny
    from fusiontrain.models import encoder_mask_from_cross_attention_mask, load_hf_mllama

    _, weights, run = uninterrupted_run
    out = tmp_path / "export"
    run_commands([[sys.executable, "-m", "fusiontrain", "export", "--checkpoint", str(run / "checkpoints" / "step_8"),
                   "--out", str(out), "--dtype", "fp32"]], fork=True)
    ours = load_hf_mllama(tiny_mllama_dir).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name in weights:
                param.copy_(weights[name])
    hf = MllamaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    tokens = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = tiny.IMAGE_TOKEN_ID
    pixels = mllama_pixel_inputs(tiny.tiny_mllama_config(), batch_images=[[2], [1]])
    cross = torch.zeros(2, 9, 1, 2, dtype=torch.long)
    cross[0, :, 0, :2] = 1
    cross[1, :, 0, :1] = 1
    with torch.no_grad():
        want = ours(tokens, encoder_input=pixels, encoder_mask=encoder_mask_from_cross_attention_mask(cross, 5))
        got = hf(input_ids=tokens, **pixels, cross_attention_mask=cross).logits
    base = load_hf_mllama(tiny_mllama_dir).eval()
    with torch.no_grad():
        untrained = base(tokens, encoder_input=pixels, encoder_mask=encoder_mask_from_cross_attention_mask(cross, 5))
    assert (untrained - want).abs().max() > 1e-4, "training must have changed the model"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fusion_init_starts_from_another_runs_fusion_weights(tmp_path, tiny_mllama_dir, uninterrupted_run) -> None:
    """A new run (on 1 rank: DCP reshards the 2-rank checkpoint) starts from its fusion weights."""
    _, weights, run = uninterrupted_run
    _harness(
        tmp_path / "h", tmp_path / "run", 1, f"model.fusion_init={run / 'checkpoints' / 'step_8'}", "max_steps=1",
        "checkpoint.resume=null", mllama=tiny_mllama_dir,
    )
    _assert_bitwise(load_file(tmp_path / "h" / "initial.safetensors"), weights)


def test_a_run_starts_from_a_fusiontrain_export_of_a_composed_model(tmp_path, tiny_llama_dir, tiny_clip_dir) -> None:
    """Llama + CLIP: train, export in fusiontrain format, start a new run from the export (its
    first weights are the exported ones), and export that run's checkpoint again."""
    from fusiontrain.models import load_fusiontrain_export

    composed = ["model.hf_mllama=null", f"model.compose.decoder={tiny_llama_dir}", f"model.compose.encoder={tiny_clip_dir}",
                "model.compose.fusion_interval=2", "checkpoint.every_n_steps=2", "max_steps=2", "checkpoint.resume=null"]
    args = [HARNESS, str(tmp_path / "h1"), "--config", TINY_CONFIG, f"output_dir={tmp_path / 'run1'}", *RUN, *composed]
    run_world(args, nproc=1, timeout=240)
    trained = load_file(tmp_path / "h1" / "trainable.safetensors")

    def export(checkpoint: Path, out: Path) -> None:
        run_commands([[sys.executable, "-m", "fusiontrain", "export", "--checkpoint", str(checkpoint), "--out", str(out),
                       "--format", "fusiontrain", "--dtype", "fp32"]], fork=True)

    export(tmp_path / "run1" / "checkpoints" / "step_2", tmp_path / "export1")
    from_export = ["model.hf_mllama=null", f"model.fusiontrain_export={tmp_path / 'export1'}", "checkpoint.every_n_steps=1",
                   "max_steps=1", "checkpoint.resume=null"]
    args = [HARNESS, str(tmp_path / "h2"), "--config", TINY_CONFIG, f"output_dir={tmp_path / 'run2'}", *RUN, *from_export]
    run_world(args, nproc=1, timeout=240)
    _assert_bitwise(load_file(tmp_path / "h2" / "initial.safetensors"), trained)
    export(tmp_path / "run2" / "checkpoints" / "step_1", tmp_path / "export2")
    reloaded = load_fusiontrain_export(tmp_path / "export2")
    final = load_file(tmp_path / "h2" / "trainable.safetensors")
    params = dict(reloaded.named_parameters())
    _assert_bitwise({name: params[name].detach() for name in final}, final)


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, tiny_mllama_dir) -> None:
    run = tmp_path / "run"
    env_args = ["logging.wandb.mode=offline", "checkpoint.every_n_steps=1", "max_steps=2"]
    _train(run, 1, tiny_mllama_dir, *env_args, "stop_after_steps=1")
    _train(run, 1, tiny_mllama_dir, *env_args)
    ids = [json.loads((run / "checkpoints" / f"step_{n}" / "manifest.json").read_text())["state"]["wandb_run_id"] for n in (1, 2)]
    assert ids[0] and ids[0] == ids[1]
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(path.name.endswith(ids[0]) or ids[0] in path.name for path in offline_runs)


def test_auto_resume_skips_a_truncated_newest_checkpoint_and_still_matches(tmp_path, tiny_mllama_dir, uninterrupted) -> None:
    """Checkpoints at 2, 4, 6; step 6's fusion data file is cut short (a crash while copying, a
    full disk). ``resume: auto`` says it skips step 6, resumes from step 4, and the final weights
    are bitwise those of the uninterrupted run."""
    run = tmp_path / "run"
    _harness(tmp_path / "h1", run, 2, "checkpoint.every_n_steps=2", "stop_after_steps=6", "checkpoint.keep_last_n=0", mllama=tiny_mllama_dir)
    newest = run / "checkpoints" / "step_6"
    shard = sorted((newest / "fusion").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (verify,) = run_commands([[sys.executable, "-m", "fusiontrain", "verify", str(run)]], fork=True, check=False)
    assert verify.returncode == 1 and "step_6: DAMAGED" in verify.stdout and "newest intact: step_4" in verify.stdout
    args = [HARNESS, str(tmp_path / "h2"), "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={run}",
            *RUN, "checkpoint.every_n_steps=2"]
    result = run_world(args, nproc=2, timeout=300)
    log = result.stdout
    assert f"skipping checkpoint {newest}" in log and "truncated" in log, log[-3000:]
    assert "resumed from" in log and "step_4 at step 4" in log, log[-3000:]
    second = json.loads((tmp_path / "h2" / "report.json").read_text())
    assert len(second["losses"]) == 4 and second["losses"] == uninterrupted[0]["losses"][4:]
    _assert_bitwise(load_file(tmp_path / "h2" / "trainable.safetensors"), uninterrupted[1])


def test_chaos_three_sigkills_of_random_ranks_end_at_the_uninterrupted_weights(
    tmp_path, tiny_mllama_dir, uninterrupted
) -> None:
    """Under ``torchrun --max-restarts 3``, three SIGKILLs of a random rank, each a random moment
    after a random step's checkpoint (a seeded draw, printed), and the job still ends at the
    uninterrupted run's weights, bitwise."""
    import random

    draw = random.Random(int(os.environ.get("FUSIONTRAIN_CHAOS_SEED", "13")))
    # Checkpoint steps two apart, each kill in a new attempt, the last one two steps before the end
    # of the 8: a kill right after step 7's checkpoint can land after the rank has finished.
    choices = [steps for steps in ((a, b, c) for a in range(1, 7) for b in range(a + 2, 7) for c in range(b + 2, 7))]
    kill_after = draw.choice(choices)
    plan = [(step, draw.randrange(2), draw.uniform(0.0, 0.4)) for step in kill_after]
    print(f"chaos plan (checkpoint step, rank, delay s): {plan}")
    out, run = tmp_path / "h", tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "3",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", LOCAL_RDZV_ENDPOINT,
        HARNESS, str(out), "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={run}",
        *RUN, "checkpoint.every_n_steps=1", "checkpoint.keep_last_n=0",
    ]
    log = (tmp_path / "torchrun.log").open("w")
    process = subprocess.Popen(command, env=launch_env(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        for step, rank, delay in plan:
            while not (run / "checkpoints" / f"step_{step}" / "manifest.json").is_file():
                assert process.poll() is None and time.monotonic() < deadline, f"the run ended before step {step}"
                time.sleep(0.02)
            time.sleep(delay)
            victims = []
            while not victims:  # a restarted attempt may still be starting its workers
                assert process.poll() is None and time.monotonic() < deadline, "the job ended before its last kill"
                victims = [pid for pid in descendant_pids(process.pid) if _is_worker(pid, rank)]
                time.sleep(0.02)
            os.kill(victims[0], signal.SIGKILL)
        assert process.wait(timeout=240) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    text = (tmp_path / "torchrun.log").read_text()
    assert text.count("resumed from") >= 3, text[-3000:]  # each restart resumed (rank 0 says so)
    _assert_bitwise(load_file(out / "trainable.safetensors"), uninterrupted[1])


# -- asynchronous checkpoints ---------------------------------------------------------------------


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", LOCAL_RDZV_ENDPOINT, *args,
    ]


def test_async_checkpoints_survive_a_preemption_in_flight_and_resume_bitwise(tmp_path, tiny_mllama_dir, uninterrupted) -> None:
    """``checkpoint.async_save`` on 2 gloo ranks through the CLI: SIGUSR1 reaches rank 1 while the
    step-2 save is still being written in the background; every rank finishes that save, checkpoints
    the step it stops at and exits 75. The resumed run (async saves at 4, 6 and 8) ends at the
    uninterrupted (synchronous) run's weights, bitwise, every step's loss equal. Before async saves
    had a process group of their own this run hung at its first checkpoint."""
    run = tmp_path / "run"
    command = _torchrun(
        2, "-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}",
        f"output_dir={run}", *RUN, WITH_WORKERS, "checkpoint.async_save=true", "checkpoint.every_n_steps=2",
    )
    log_path = tmp_path / "torchrun.log"
    in_flight = run / "checkpoints" / ".tmp-step_2"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=launch_env(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not in_flight.is_dir():
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.005)
            victims = []
            while not victims:
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                victims = [pid for pid in descendant_pids(process.pid) if _is_worker(pid, 1, "fusiontrain train")]
            os.kill(victims[0], signal.SIGUSR1)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    output = log_path.read_text()
    assert code == 1, output[-3000:]  # torchrun reports the workers' 75 as 1
    stopped = [int(m) for m in re.findall(r"rank 1: preempted \(SIGUSR1\) after step (\d+)", output)]
    assert len(stopped) == 1 and 2 <= stopped[0] < 8, output[-3000:]
    step = stopped[0]
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {"step_2", f"step_{step}"}
    for name in ("step_2", f"step_{step}"):
        layout.verify_checkpoint(run / "checkpoints" / name)  # complete, every checksum right
    first = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    second, weights = _harness(
        tmp_path / "h", run, 2, "checkpoint.async_save=true", "checkpoint.every_n_steps=2", mllama=tiny_mllama_dir
    )
    assert first[:step] + second["losses"] == uninterrupted[0]["losses"]  # every step, exactly
    _assert_bitwise(weights, uninterrupted[1])
    saved = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert {4, 6, 8} <= set(saved) and not list((run / "checkpoints").glob(".tmp-*"))


def test_async_checkpoints_on_four_ranks_finish_intact(tmp_path, tiny_mllama_dir) -> None:
    """4 gloo ranks, an async save after every step (each next save waits for the one before):
    the run ends, and every checkpoint is complete with every checksum right."""
    run = tmp_path / "run"
    run_world(
        ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}", f"output_dir={run}",
         *RUN, "max_steps=3", "batch.micro_batch_size=1", "checkpoint.async_save=true", "checkpoint.every_n_steps=1",
         "checkpoint.keep_last_n=0"],
        nproc=4, timeout=300,
    )
    for step in (1, 2, 3):
        manifest = layout.verify_checkpoint(run / "checkpoints" / f"step_{step}")
        assert manifest["world_size"] == 4

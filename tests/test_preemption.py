"""Preemption (fusiontrain/train/preemption.py): SIGTERM or SIGUSR1, to torchrun or to one worker only,
makes every rank finish its step, checkpoint that step together and exit with
PREEMPTED_EXIT_CODE; the resumed run is bitwise identical to an uninterrupted one. And the SLURM
job script's signal trap and requeue, with stand-ins for srun, scancel and scontrol."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusiontrain.train.preemption import MARKER_ENV, PREEMPTED_EXIT_CODE, PreemptionWatcher
from tests.helpers.launch import LOCAL_RDZV_ENDPOINT, REPO_ROOT, free_port, launch_env, run_world
from tests.helpers.shared import MAX_STEPS, PACKED_RUN, WITH_WORKERS, uninterrupted_packed_run

HARNESS = str(REPO_ROOT / "tests" / "helpers" / "train_harness.py")
TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
# With a dataloader worker per rank: the signals reach the workers too, and must not kill them.
RUN = [*PACKED_RUN, WITH_WORKERS]


def test_exit_code_is_distinct_from_a_signal_death() -> None:
    assert PREEMPTED_EXIT_CODE == 75  # EX_TEMPFAIL
    assert PREEMPTED_EXIT_CODE not in {128 + signal.SIGTERM, 128 + signal.SIGUSR1, 128 + signal.SIGKILL, 0, 1, 2}


def _dataloader_like_worker() -> None:
    from torch.utils.data._utils.signal_handling import _set_worker_signal_handlers

    _set_worker_signal_handlers()  # what torch's dataloader workers do: die on SIGTERM
    time.sleep(1.5)


def _kill_from_elsewhere(pid: int, name: str) -> None:
    """Signal ``pid`` from a process other than its parent (as torchrun's killpg does): torch's
    worker handler exits quietly on a SIGTERM from the parent only."""
    subprocess.run(["kill", "-s", name, str(pid)], check=True)


def test_watcher_blocks_the_signals_for_forked_workers_until_started() -> None:
    """Between install() and start() the signals are blocked in the training thread, so a process
    forked then (a dataloader worker, which installs torch's dying SIGTERM handler) never sees
    them; a signal to the training thread waits until start(); uninstall() restores everything."""
    import multiprocessing
    import threading

    before_handler, before_mask = signal.getsignal(signal.SIGUSR1), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    watcher = PreemptionWatcher().install()
    try:
        worker = multiprocessing.get_context("fork").Process(target=_dataloader_like_worker)
        worker.start()
        time.sleep(0.5)
        _kill_from_elsewhere(worker.pid, "TERM")
        _kill_from_elsewhere(worker.pid, "USR1")
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        assert watcher.received is None  # blocked: pending, not delivered
        assert watcher.local_signal() == 0 and watcher.verdict([watcher.local_signal()]) is None
        watcher.start()
        assert watcher.received == signal.SIGUSR1
        assert watcher.verdict([watcher.local_signal()]) == "SIGUSR1"
        # what the other ranks read from the step's all-reduce
        assert PreemptionWatcher().verdict([0, int(signal.SIGUSR1)]) == "SIGUSR1 on another rank"
        worker.join(10)
        assert worker.exitcode == 0
    finally:
        watcher.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before_handler
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before_mask
    # without the watcher the same worker dies of the signal (the test can fail)
    worker = multiprocessing.get_context("fork").Process(target=_dataloader_like_worker)
    worker.start()
    time.sleep(0.5)
    _kill_from_elsewhere(worker.pid, "TERM")
    worker.join(10)
    assert worker.exitcode == -signal.SIGTERM


# -- 2 gloo ranks under torchrun ----------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_mllama_dir) -> tuple[list[float], dict]:
    """Losses and final trainable weights of the uninterrupted run (shared with tests/test_resume.py)."""
    report, weights, _ = uninterrupted_packed_run(tmp_path_factory, tiny_mllama_dir)
    return report["losses"], weights


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _worker(torchrun_pid: int, local_rank: int) -> int:
    """The trainer process of ``local_rank``: a direct child of torchrun (its dataloader workers
    are the trainer's children, with the same command line and environment)."""
    for pid in _children(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} under torchrun {torchrun_pid}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _interrupted_run(tmp_path: Path, mllama: Path, deliver, *overrides: str) -> tuple[int, str, float]:
    """torchrun, 2 ranks, ``python -m fusiontrain train``; once 2 steps are logged,
    ``deliver(torchrun_pid)`` sends the signal. Returns torchrun's exit code, its output and the
    seconds from the signal to torchrun's exit."""
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", LOCAL_RDZV_ENDPOINT,
        "-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={mllama}", f"output_dir={run}", *RUN,
        *overrides,
    ]
    log_path = tmp_path / "torchrun.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=launch_env(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while len(_rows(run / "metrics.jsonl")) < 2:
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.02)
            sent = time.monotonic()
            deliver(process.pid)
            code = process.wait(timeout=120)
            took = time.monotonic() - sent
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                for pid in _children(process.pid):
                    os.kill(pid, signal.SIGKILL)
                process.wait()
    return code, log_path.read_text(), took


def _resume_and_compare(tmp_path: Path, mllama: Path, uninterrupted: tuple[list[float], dict], step: int) -> None:
    out = tmp_path / "h"
    # The resumed part needs no worker (the signal reached the run before it): PACKED_RUN's none.
    args = [HARNESS, str(out), "--config", TINY_CONFIG, f"model.hf_mllama={mllama}", f"output_dir={tmp_path / 'run'}", *PACKED_RUN]
    result = run_world(args, nproc=2, timeout=300)
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'step_{step}'} at step {step}" in result.stdout
    first = [row["loss"] for row in _rows(tmp_path / "run" / "metrics.jsonl")][:step]
    second = json.loads((out / "report.json").read_text())["losses"]
    assert len(second) == MAX_STEPS - step
    assert first + second == uninterrupted[0]  # every step, exactly
    weights, reference = load_file(out / "trainable.safetensors"), uninterrupted[1]
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name


def _preempted_step(run: Path, output: str) -> int:
    """The step of the preemption checkpoint: the only checkpoint the run has beyond periodic ones
    and exactly the steps it logged."""
    logged = len(_rows(run / "metrics.jsonl"))
    assert 2 <= logged < MAX_STEPS, f"the run logged {logged} steps; the signal must stop it early"
    manifest = json.loads((run / "checkpoints" / f"step_{logged}" / "manifest.json").read_text())
    assert manifest["step"] == logged
    return logged


def test_sigterm_to_torchrun_checkpoints_the_current_step_and_resumes_bitwise(tmp_path, tiny_mllama_dir, uninterrupted) -> None:
    """SIGTERM to the torchrun agent (what `kill`, Kubernetes and SLURM do): torchrun forwards it to
    both workers, which stop after their step, write its checkpoint (with
    checkpoint.every_n_steps=0, i.e. no periodic checkpoints) and exit with code 75. torchrun
    itself, once signalled, exits 1 (its SignalException)."""
    code, output, took = _interrupted_run(
        tmp_path, tiny_mllama_dir, lambda pid: os.kill(pid, signal.SIGTERM), "checkpoint.every_n_steps=0"
    )
    print(f"SIGTERM -> torchrun exit {code} in {took:.1f} s")
    assert "Received 15 death signal, shutting down workers" in output
    assert code == 1 and "SignalException" in output
    step = _preempted_step(tmp_path / "run", output)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == [f"step_{step}"]  # every_n_steps=0
    for rank in (0, 1):
        assert f"rank {rank}: preempted (SIGTERM) after step {step}: checkpoint" in output
        assert f"exiting with code {PREEMPTED_EXIT_CODE}" in output
    assert "DataLoader worker" not in output  # the dataloader workers (same process group) survive the signal
    _resume_and_compare(tmp_path, tiny_mllama_dir, uninterrupted, step)


def test_sigusr1_to_one_worker_stops_every_rank_at_the_same_step(tmp_path, tiny_mllama_dir, uninterrupted) -> None:
    """SIGUSR1 to rank 1's process only: the per-step all-reduce stops rank 0 at the same step;
    both write the checkpoint and exit 75. torchrun then exits 1 and reports the exit codes it saw:
    75 for each rank, or, when rank 0 was still leaving as torchrun saw rank 1 end, 75 for rank 1
    only (torchrun SIGTERMs the rest then; seen under heavy load). Never another code."""
    code, output, took = _interrupted_run(
        tmp_path, tiny_mllama_dir, lambda pid: os.kill(_worker(pid, 1), signal.SIGUSR1), "checkpoint.every_n_steps=3"
    )
    print(f"SIGUSR1 to rank 1 -> torchrun exit {code} in {took:.1f} s")
    assert code == 1
    step = _preempted_step(tmp_path / "run", output)
    assert f"rank 1: preempted (SIGUSR1) after step {step}" in output
    assert f"rank 0: preempted (SIGUSR1 on another rank) after step {step}" in output
    reported = re.findall(r"exitcode  : (-?\d+) ", output)
    assert reported and set(reported) == {str(PREEMPTED_EXIT_CODE)}, output[-3000:]
    _resume_and_compare(tmp_path, tiny_mllama_dir, uninterrupted, step)


def test_plain_process_exits_with_the_preemption_code(tmp_path, tiny_mllama_dir) -> None:
    """No launcher in between: the process's own exit code is PREEMPTED_EXIT_CODE."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}",
               f"output_dir={run}", *RUN, "max_steps=200"]
    marker = tmp_path / "marker" / "preempted.json"
    with (tmp_path / "log").open("w") as log:
        process = subprocess.Popen(command, env=launch_env({MARKER_ENV: str(marker)}), cwd=REPO_ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while len(_rows(run / "metrics.jsonl")) < 1:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == PREEMPTED_EXIT_CODE, (tmp_path / "log").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    logged = len(_rows(run / "metrics.jsonl"))
    assert (run / "checkpoints" / f"step_{logged}" / "manifest.json").is_file()
    # the marker a job script reads when torchrun hides the exit code
    assert json.loads(marker.read_text()) == {
        "step": logged, "signal": "SIGTERM", "checkpoint": str(run / "checkpoints" / f"step_{logged}")
    }


# -- launch/slurm.sbatch: the trap and the requeue (stand-ins for srun, scancel, scontrol) --------

FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: drop srun's options, run the command once per node with SLURM_NODEID=0..NNODES-1 in
# a process group of its own, and note the groups for the fake scancel
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i setsid "$@" &
    pids+=($!)
    echo $! >> "$FAKE_SLURM_DIR/steps"
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

FAKE_SCANCEL = """#!/usr/bin/env bash
# fake `scancel --signal=SIG JOBID`: signal every step's process group (not the batch script)
echo "scancel $*" >> "$FAKE_SLURM_DIR/calls"
sig="${1#--signal=}"
while read -r pgid; do kill -s "$sig" -- "-$pgid" 2>/dev/null || true; done < "$FAKE_SLURM_DIR/steps"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_DIR/calls"
case "$1 $2" in
"show hostnames") tr ',' '\\n' <<<"$3" ;;
"requeue "*) ;;
*) exit 1 ;;
esac
"""

# Stands in for the trainer on each "node": says it is up, waits for SIGTERM, then, as the trainer
# does, node 0 writes the preemption marker the job script named, and every node exits 75.
STEP = textwrap.dedent(
    """
    import json, os, signal, sys, time
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    print(f"STEP-UP node={os.environ['NODE_RANK']} args={' '.join(sys.argv[1:])}", flush=True)
    open(os.path.join(os.environ["FAKE_SLURM_DIR"], "up." + os.environ["NODE_RANK"]), "w").close()
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"STEP-STOP node={os.environ['NODE_RANK']} got={got}", flush=True)
    if got and os.environ["NODE_RANK"] == "0":
        with open(os.environ["FUSIONTRAIN_PREEMPTED_MARKER"], "w") as marker:
            json.dump({"step": 3, "signal": "SIGTERM", "checkpoint": "run/checkpoints/step_3"}, marker)
    sys.exit(75 if got else 0)
    """
)


def _fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    state = tmp_path / "slurm"
    fakebin = tmp_path / "bin"
    state.mkdir()
    fakebin.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (fakebin / name).write_text(text)
        (fakebin / name).chmod(0o755)
    step = tmp_path / "step.py"
    step.write_text(STEP)
    env = launch_env({
        "PATH": f"{fakebin}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(state),
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "1",
        "SLURM_CPUS_PER_TASK": "1",
        "MASTER_PORT": str(free_port()),
        "FUSIONTRAIN_ENTRY": str(step),
    })
    return env, state


def _signalled_job(tmp_path: Path, deliver) -> tuple[str, list[str], Path]:
    """Run launch/slurm.sbatch on the fake SLURM, ``deliver(job, state)`` once both "nodes" are up;
    the job must end with 0. Returns its output, the scancel / scontrol calls and the state folder."""
    env, state = _fake_slurm(tmp_path)
    env["FUSIONTRAIN_PREEMPTED_MARKER"] = str(state / "preempted")
    with (tmp_path / "log").open("w") as log:
        job = subprocess.Popen(
            ["bash", str(REPO_ROOT / "launch" / "slurm.sbatch"), "--config", "configs/x.yaml", "a.b=1"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while not ((state / "up.0").exists() and (state / "up.1").exists()):
                assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
                time.sleep(0.05)
            deliver(job, state)
            assert job.wait(timeout=90) == 0, (tmp_path / "log").read_text()
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    output = (tmp_path / "log").read_text()
    assert output.count("STEP-UP") == 2 and output.count("args=--config configs/x.yaml a.b=1 checkpoint.resume=auto") == 2
    assert output.count(f"got=[{int(signal.SIGTERM)}]") == 2, output  # each node's workers got SIGTERM
    assert "requeueing job 4242" in output and not (state / "preempted").exists()  # the marker is read once
    return output, (state / "calls").read_text().splitlines(), state


def test_slurm_sbatch_usr1_to_the_script_checkpoints_and_requeues(tmp_path) -> None:
    """`--signal=B:USR1@N` reaches the batch script only: its trap sends SIGTERM to the steps
    (scancel), torchrun forwards it to the workers, and once srun returns the script requeues the
    job, whose arguments carry checkpoint.resume=auto."""
    _, calls, _ = _signalled_job(tmp_path, lambda job, state: job.send_signal(signal.SIGUSR1))
    assert "scancel --signal=TERM 4242" in calls and calls[-1] == "scontrol requeue 4242", calls


def test_slurm_sbatch_sigterm_to_the_script_only_is_forwarded_and_requeues(tmp_path) -> None:
    """SIGTERM to the batch script alone (scancel --full, a preemption that signals the script):
    the trap forwards it to the steps, which checkpoint, and the job requeues."""
    _, calls, _ = _signalled_job(tmp_path, lambda job, state: job.send_signal(signal.SIGTERM))
    assert "scancel --signal=TERM 4242" in calls and calls[-1] == "scontrol requeue 4242", calls


def test_slurm_sbatch_sigterm_to_the_steps_only_requeues_from_the_marker(tmp_path) -> None:
    """SIGTERM to the job steps alone (the batch script sees nothing): the workers checkpoint and
    exit 75, torchrun reports 1, and the marker rank 0 wrote tells the script to requeue."""

    def to_the_steps(job, state: Path) -> None:
        for pgid in (state / "steps").read_text().split():
            os.killpg(int(pgid), signal.SIGTERM)

    output, calls, _ = _signalled_job(tmp_path, to_the_steps)
    assert not any(call.startswith("scancel") for call in calls) and calls[-1] == "scontrol requeue 4242", calls
    assert "the steps were preempted" in output and '"step": 3' in output


def test_slurm_sbatch_keeps_an_explicit_resume_and_does_not_requeue_a_finished_run(tmp_path) -> None:
    env, state = _fake_slurm(tmp_path)
    step = tmp_path / "quick.py"
    # One write per line: both fake nodes share the pipe, and unbuffered print() writes in pieces.
    step.write_text("import os, sys; os.write(1, ('STEP-ARGS ' + ' '.join(sys.argv[1:]) + '\\n').encode())\n")
    env["FUSIONTRAIN_ENTRY"] = str(step)
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / "slurm.sbatch"), "--config", "c.yaml", "checkpoint.resume=null"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("STEP-ARGS --config c.yaml checkpoint.resume=null\n") == 2
    assert not any("requeue" in line for line in (state / "calls").read_text().splitlines())

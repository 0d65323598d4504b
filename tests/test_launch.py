"""The launchers in launch/ and the test helper that starts multi-process runs.

Each multi-process test runs a tiny probe (``init_distributed`` -> gloo all_reduce ->
``shutdown``) with 2 processes on 127.0.0.1; ``FUSIONTRAIN_ENTRY`` points the launch scripts at
the probe instead of ``-m fusiontrain train``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.launch import (
    REPO_ROOT,
    free_port,
    process_alive,
    run_command,
    run_script_multinode,
    run_torchrun,
    run_world,
)

LAUNCH = REPO_ROOT / "launch"

PROBE = textwrap.dedent(
    """
    import os
    import sys

    import torch
    import torch.distributed as dist

    from fusiontrain.parallel.distributed import init_distributed, shutdown

    ctx = init_distributed()
    world = int(os.environ["PROBE_WORLD"])
    assert ctx.backend == "gloo", ctx.backend
    assert ctx.world_size == world == dist.get_world_size(), (ctx.world_size, world)
    value = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(value)
    assert value.item() == world * (world + 1) / 2, value
    # one write per line, so lines of different ranks never interleave
    sys.stdout.write(
        f"PROBE-OK rank={ctx.rank} world={ctx.world_size} local_rank={ctx.local_rank} "
        f"group_rank={os.environ.get('GROUP_RANK')} node_rank={os.environ.get('NODE_RANK')} "
        f"sum={value.item():g} args={' '.join(sys.argv[1:])}\\n"
    )
    sys.stdout.flush()
    shutdown()
    """
)

PROBE_LINE = re.compile(
    r"PROBE-OK rank=(\d+) world=(\d+) local_rank=(\d+) group_rank=(\S+) node_rank=(\S+) sum=(\S+) args=(.*)"
)


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    assert " " not in str(path), "FUSIONTRAIN_ENTRY is split on whitespace"
    return path


def probe_lines(output: str) -> list[dict]:
    out = []
    for m in PROBE_LINE.finditer(output):
        rank, world, local_rank, group_rank, node_rank, total, args = m.groups()
        out.append(
            dict(
                rank=int(rank),
                world=int(world),
                local_rank=int(local_rank),
                group_rank=group_rank,
                node_rank=node_rank,
                sum=float(total),
                args=args.strip(),
            )
        )
    return out


def assert_world_of_two(output: str, args: str) -> list[dict]:
    lines = probe_lines(output)
    assert sorted(line["rank"] for line in lines) == [0, 1], output
    for line in lines:
        assert line["world"] == 2 and line["sum"] == 3.0 and line["args"] == args, line
    return lines


OVERRIDES = ["--config", "configs/x.yaml", "train.steps=3", "optim.lr=1e-3"]


# -- tests/helpers/launch.py ---------------------------------------------------------------------


def test_run_torchrun_two_processes(probe: Path) -> None:
    result = run_torchrun([str(probe), *OVERRIDES], nproc=2, timeout=60, env={"PROBE_WORLD": "2"})
    lines = assert_world_of_two(result.stdout, " ".join(OVERRIDES))
    assert sorted(line["local_rank"] for line in lines) == [0, 1]


def test_run_torchrun_reports_failure(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('PROBE-FAILING on purpose', flush=True)\n"
        "    sys.exit(3)\n"
    )
    with pytest.raises(AssertionError) as info:
        run_torchrun([str(script)], nproc=2, timeout=60)
    message = str(info.value)
    assert "launch failed" in message and "exit code 1" in message
    assert "PROBE-FAILING on purpose" in message


def test_run_torchrun_timeout_kills_the_workers(tmp_path: Path) -> None:
    """On timeout the helper must end torchrun AND its workers (which live in sessions of their
    own), and report the output so far."""
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, sys, time\n"
        f"open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').close()\n"
        "print('PROBE-HANGING', flush=True)\n"
        "time.sleep(600)\n"
    )
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_torchrun([str(script)], nproc=2, timeout=10)
    assert time.monotonic() - start < 30
    assert "timed out" in str(info.value) and "PROBE-HANGING" in str(info.value)
    worker_pids = [int(p.name) for p in pids.iterdir()]
    assert len(worker_pids) == 2
    for pid in worker_pids:
        assert not process_alive(pid), f"worker {pid} survived the timeout"


# -- launch/torchrun.sh --------------------------------------------------------------------------


def test_torchrun_sh_two_processes(probe: Path) -> None:
    result = run_command(
        ["bash", str(LAUNCH / "torchrun.sh"), *OVERRIDES],
        timeout=60,
        env={"NPROC_PER_NODE": "2", "FUSIONTRAIN_ENTRY": str(probe), "PROBE_WORLD": "2"},
    )
    assert_world_of_two(result.stdout, " ".join(OVERRIDES))


# -- launch/multinode.sh -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_multinode_sh_two_nodes(probe: Path, backend: str) -> None:
    results = run_script_multinode(
        OVERRIDES,
        nnodes=2,
        nproc_per_node=1,
        timeout=90,
        env={"FUSIONTRAIN_ENTRY": str(probe), "PROBE_WORLD": "2", "RDZV_BACKEND": backend},
    )
    by_node = []
    for node_rank, result in enumerate(results):
        (line,) = probe_lines(result.stdout)
        assert line["node_rank"] == str(node_rank) and line["local_rank"] == 0
        by_node.append(line)
    assert_world_of_two("\n".join(r.stdout for r in results), " ".join(OVERRIDES))
    # Each node is one rendezvous group; its processes' ranks follow its GROUP_RANK.
    for line in by_node:
        assert line["rank"] == int(line["group_rank"])
    if backend == "static":
        # Only the static backend maps NODE_RANK to ranks; c10d orders nodes by (hostname, pid).
        assert [line["rank"] for line in by_node] == [0, 1]


def test_multinode_sh_validates_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_ADDR", "NNODES", "NODE_RANK", "NPROC_PER_NODE"}}
    missing = subprocess.run(
        ["bash", str(LAUNCH / "multinode.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert missing.returncode == 2
    for var in ("MASTER_ADDR", "NNODES", "NODE_RANK", "NPROC_PER_NODE"):
        assert var in missing.stderr
    bad = subprocess.run(
        ["bash", str(LAUNCH / "multinode.sh")],
        env={**env, "MASTER_ADDR": "127.0.0.1", "NNODES": "2", "NODE_RANK": "2", "NPROC_PER_NODE": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "NODE_RANK (2) must be below NNODES (2)" in bad.stderr


# -- launch/slurm.sbatch -------------------------------------------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: drop srun's options, run the command once per node with SLURM_NODEID=0..NNODES-1
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# fake `scontrol show hostnames A,B,...`: one host a line
[[ "$1 $2" == "show hostnames" ]] || exit 1
tr ',' '\\n' <<<"$3"
"""


def test_slurm_sbatch_with_fake_srun(probe: Path, tmp_path: Path) -> None:
    """The job script's own logic (MASTER_ADDR from the node list, one multinode.sh per node with
    NODE_RANK = SLURM_NODEID, arguments passed through), run with stand-ins for srun and
    scontrol: 2 "nodes" x 1 process on 127.0.0.1, started from outside the repo."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fakebin / name).write_text(text)
        (fakebin / name).chmod(0o755)
    result = run_command(
        ["bash", str(LAUNCH / "slurm.sbatch"), *OVERRIDES],
        cwd=tmp_path,
        timeout=90,
        env={
            "PATH": f"{fakebin}{os.pathsep}{os.environ['PATH']}",
            "SLURM_SUBMIT_DIR": str(REPO_ROOT),
            "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1",
            "SLURM_NNODES": "2",
            "SLURM_JOB_ID": f"{os.getpid()}{time.monotonic_ns() % 100000}",
            "SLURM_GPUS_ON_NODE": "1",
            "SLURM_CPUS_PER_TASK": "1",
            "MASTER_PORT": str(free_port()),
            "FUSIONTRAIN_ENTRY": str(probe),
            "PROBE_WORLD": "2",
        },
    )
    # the job script adds checkpoint.resume=auto, so that a requeued job resumes (tests/test_preemption.py)
    lines = assert_world_of_two(result.stdout, " ".join([*OVERRIDES, "checkpoint.resume=auto"]))
    assert sorted(line["node_rank"] for line in lines) == ["0", "1"]
    assert "2 nodes x 1 procs, rendezvous 127.0.0.1:" in result.stdout


@pytest.mark.parametrize("name", ["torchrun.sh", "multinode.sh", "slurm.sbatch"])
def test_shell_syntax(name: str) -> None:
    result = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_slurm_header() -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.MULTILINE))
    assert directives["nodes"] == "4"
    assert directives["ntasks-per-node"] == "1"
    assert directives["gpus-per-node"] == "8"
    assert "cpus-per-task" in directives


# -- launch/accelerate.yaml ----------------------------------------------------------------------


def test_accelerate_yaml() -> None:
    config = yaml.safe_load((LAUNCH / "accelerate.yaml").read_text())
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert config["distributed_type"] == "MULTI_GPU"
    assert config["mixed_precision"] == "no"
    assert config["num_processes"] >= 2 and config["num_machines"] == 1
    assert isinstance(config["main_process_port"], int)
    assert not any(key.startswith(("fsdp", "deepspeed", "megatron")) for key in config)
    if importlib.util.find_spec("accelerate") is not None:
        from accelerate.commands.config.config_args import load_config_from_file

        loaded = load_config_from_file(str(LAUNCH / "accelerate.yaml"))
        assert loaded.distributed_type == "MULTI_GPU" and not loaded.fsdp_config and not loaded.deepspeed_config


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="accelerate is not installed (optional launcher; `pip install accelerate`)",
)
def test_accelerate_launch_two_cpu_processes(tmp_path: Path) -> None:
    """`accelerate launch --config_file launch/accelerate.yaml -m <module> ...` with the CPU
    override `--num_processes 2`, the same form as `-m fusiontrain train`."""
    package = tmp_path / "pkg" / "launchprobe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(PROBE)
    result = run_command(
        [
            sys.executable,
            "-m",
            "accelerate.commands.accelerate_cli",
            "launch",
            "--config_file",
            str(LAUNCH / "accelerate.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "-m",
            "launchprobe",
            *OVERRIDES,
        ],
        timeout=90,
        env={
            "PROBE_WORLD": "2",
            "PYTHONPATH": os.pathsep.join([str(tmp_path / "pkg"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert_world_of_two(result.stdout, " ".join(OVERRIDES))


TRAIN_RUN = [
    "max_steps=2", "checkpoint.every_n_steps=2", "logging.every_n_steps=1", "eval.every_n_steps=0",
    "data.num_workers=0", "batch.micro_batch_size=2", "batch.global_batch_size=8",
]


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="accelerate is not installed (optional launcher; `pip install accelerate`)",
)
def test_accelerate_launch_runs_the_real_trainer_like_torchrun(tmp_path: Path, tiny_mllama_dir: Path) -> None:
    """`accelerate launch --config_file launch/accelerate.yaml --num_processes 2 -m fusiontrain
    train ...` trains on 2 CPU processes (gloo): world size 2 in the checkpoint, and every
    metrics.jsonl row (loss, grad norm, lr, tokens) equal to the same run with its ranks started
    directly, as torchrun's workers are."""
    train = ["--config", "configs/tiny.yaml", f"model.hf_mllama={tiny_mllama_dir}", *TRAIN_RUN]
    accelerate_dir, direct_dir = tmp_path / "accelerate", tmp_path / "direct"
    result = run_command(
        [
            sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
            "--config_file", str(LAUNCH / "accelerate.yaml"),
            "--num_processes", "2",
            "--main_process_port", str(free_port()),
            "-m", "fusiontrain", "train", *train, f"output_dir={accelerate_dir}",
        ],
        timeout=240,
    )
    # The reference: the same 2 ranks started directly (run_world; the torchrun launch of the same
    # trainer has tests of its own), env:// as torchrun's workers see it.
    run_world(["-m", "fusiontrain", "train", *train, f"output_dir={direct_dir}"], nproc=2, timeout=240)
    manifest = json.loads((accelerate_dir / "checkpoints" / "step_2" / "manifest.json").read_text())
    assert manifest["world_size"] == 2, result.stdout[-2000:]
    rows, reference = _metrics(accelerate_dir), _metrics(direct_dir)
    assert [row["step"] for row in rows] == [0, 1]
    for row, want in zip(rows, reference):
        for key in ("loss", "grad_norm", "lr", "tokens", "real_tokens"):
            assert row[key] == want[key], (key, row, want)

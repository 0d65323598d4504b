"""The ranks the suite forks from a preloaded server (tests/helpers/zygote.py) run as ``python
<args>`` would, and train exactly as fresh interpreters do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import zygote as zygote_module
from tests.helpers.launch import FORK_RANKS_VARIABLE, REPO_ROOT, rank_zygote, run_world
from tests.helpers.zygote import forkable

TINY_CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")


def test_only_commands_whose_differences_are_read_at_run_time_are_forkable() -> None:
    server = {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert forkable(["-m", "fusiontrain", "train"], {**server, "RANK": "1", "MASTER_PORT": "5"}, server)
    assert forkable(["script.py"], {**server, "FUSIONTRAIN_INJECT_NONFINITE": "step=2"}, server)
    # inductor writes its default cache folder into the environment of a process that compiled
    assert forkable(["script.py"], {**server, "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_me"}, server)
    # Read when the interpreter or a module starts: a fresh interpreter is needed.
    assert not forkable(["script.py"], {**server, "MALLOC_MMAP_THRESHOLD_": "65536"}, server)
    assert not forkable(["script.py"], {**server, "OMP_NUM_THREADS": "2"}, server)
    assert not forkable(["script.py"], {"PATH": "/bin"}, server)  # a variable the server has, unset
    # Not a module or a script.
    assert not forkable(["-c", "print(1)"], server, server)
    assert not forkable(["-m"], server, server)
    assert not forkable([], server, server)


def _start(tmp_path: Path, args: list[str], env: dict[str, str] | None = None):
    zygote = rank_zygote()
    assert zygote is not None, f"{FORK_RANKS_VARIABLE}=0 is set"
    log = tempfile.TemporaryFile(mode="w+b")
    proc = zygote.start(args, {**zygote.env, **(env or {})}, tmp_path, log.fileno())
    return proc, log


def _output(log) -> str:
    log.seek(0)
    return log.read().decode()


def test_a_forked_script_gets_its_arguments_folder_environment_session_and_exit(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(
        "import atexit, os, sys, threading, time\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "def late():\n"
        "    time.sleep(0.3)\n"
        "    print('thread joined', flush=True)\n"
        "threading.Thread(target=late).start()  # not a daemon: the exit waits for it\n"
        "print('argv', sys.argv)\n"
        "print('cwd', os.getcwd())\n"
        "print('path0', sys.path[0])\n"
        "print('rank', os.environ['RANK'], 'fault', os.environ.get('FUSIONTRAIN_X'))\n"
        "print('own session', os.getsid(0) == os.getpid())\n"
        "print('name', __name__)\n"
        "sys.exit(3)\n"
    )
    proc, log = _start(tmp_path, [str(script), "a", "b"], {"RANK": "1", "FUSIONTRAIN_X": "y"})
    assert proc.wait(timeout=60) == 3 and proc.returncode == 3
    lines = _output(log).splitlines()
    assert lines[:6] == [
        f"argv {[str(script), 'a', 'b']}",
        f"cwd {tmp_path}",
        f"path0 {tmp_path}",
        "rank 1 fault y",
        "own session True",
        "name __main__",
    ]
    assert lines[6:] == ["thread joined", "atexit ran"]


def test_a_forked_module_runs_as_main_and_a_signal_shows_as_subprocess_reports_it(tmp_path: Path) -> None:
    proc, log = _start(tmp_path, ["-m", "fusiontrain", "--help"])
    assert proc.wait(timeout=60) == 0, _output(log)
    assert "usage:" in _output(log)

    script = tmp_path / "sleeper.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    proc, log = _start(tmp_path, [str(script)])
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)  # its own process group, as Popen(start_new_session=True)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def test_forked_ranks_train_bitwise_as_fresh_interpreters(
    tmp_path: Path, tiny_mllama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["-m", "fusiontrain", "train", "--config", TINY_CONFIG, f"model.hf_mllama={tiny_mllama_dir}", "max_steps=2"]
    args += ["data.num_workers=0", "eval.every_n_steps=0", "checkpoint.every_n_steps=0"]
    runs = {}
    for fork in ("1", "0"):
        monkeypatch.setenv(FORK_RANKS_VARIABLE, fork)
        out = tmp_path / f"fork{fork}"
        forked_before = zygote_module.forked_cpu_seconds
        result = run_world([*args, f"output_dir={out}"], nproc=2, timeout=240)
        runs[fork] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert f"{sys.executable}" in " ".join(map(str, result.args))
        # Only ranks the zygote forked report CPU time to it: the first world was forked, the second not.
        assert (zygote_module.forked_cpu_seconds > forked_before) == (fork == "1")
    keys = ("loss", "grad_norm", "tokens", "real_tokens")
    assert [[row[k] for k in keys] for row in runs["1"]] == [[row[k] for k in keys] for row in runs["0"]]


def test_a_malformed_request_is_answered_and_the_server_goes_on(tmp_path: Path) -> None:
    zygote = rank_zygote()
    assert zygote is not None
    for request in (b"not json\n", b""):  # garbage, and a caller that leaves without a word
        connection = zygote.connect()
        if request:
            connection.sendall(request)
        connection.shutdown(socket.SHUT_WR)
        assert connection.recv(4096).startswith(b"error "), request
        connection.close()
    proc, log = _start(tmp_path, ["-m", "fusiontrain", "--help"])
    assert proc.wait(timeout=60) == 0, _output(log)


# A rank's dataloader: 1 forkserver worker (the trainer's default start), after the trainer's
# signal handling (tests/helpers/worker_start_probe.py). It prints its own pid, its children when
# it started (the helper-in-waiting, when forked), and for the worker's parent (the forkserver
# helper): its parent, whether it was started as `python -c` (a fresh interpreter) and its open
# descriptors. With an argument "idle" it starts no loader.
_LOADER_RANK = """
import json, os, sys, time
from fusiontrain.data.workers import build_loader
from fusiontrain.train.preemption import PreemptionWatcher
from tests.helpers.worker_probe import WhereBuilt


def _state(pid: int) -> str:
    stat = open(f"/proc/{pid}/stat").read()
    return stat[stat.rindex(")") + 2]


def main(idle: bool) -> dict:
    children = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    report = {"pid": os.getpid(), "children": [int(pid) for pid in children]}
    if idle:
        return report
    watcher = PreemptionWatcher().install()
    watcher.start()
    items = list(build_loader(WhereBuilt(), num_workers=1, worker_start="forkserver"))
    helper = items[0]["parent"]
    # The helper holds a pipe per live worker, closed just after it reaps the worker and writes
    # the exit code (which the loader's join reads): count once it is reaped and the helper is
    # asleep again in its select loop, the first sleep after the reap.
    deadline = time.monotonic() + 30
    while open(f"/proc/{helper}/task/{helper}/children").read().split() and time.monotonic() < deadline:
        time.sleep(0.05)
    while _state(helper) != "S" and time.monotonic() < deadline:
        time.sleep(0.01)
    stat = open(f"/proc/{helper}/stat").read()
    report.update(
        items=items,
        helper=helper,
        helper_parent=int(stat[stat.rindex(")") + 2 :].split()[1]),
        helper_command=open(f"/proc/{helper}/cmdline").read().split("\\0"),
        helper_descriptors=len(os.listdir(f"/proc/{helper}/fd")),
    )
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:] == ["idle"])), flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone_soon(pids: list[int], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(pid) for pid in pids)


def test_a_forked_rank_gets_its_forkserver_helper_pre_forked_as_a_fresh_one_would_be(tmp_path: Path) -> None:
    """A forked rank's forkserver helper is its pre-forked child, not a fresh interpreter, and is
    what a spawned one is: the rank's child, holding as many descriptors, starting workers that
    block the preemption signals (the mask of the thread that started it), gone after the rank."""
    script = tmp_path / "loader_rank.py"
    script.write_text(_LOADER_RANK)
    env = {**rank_zygote().env}
    proc, log = _start(tmp_path, [str(script)])
    assert proc.wait(timeout=120) == 0, _output(log)
    forked = json.loads(_output(log).strip().splitlines()[-1])
    fresh_run = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert fresh_run.returncode == 0, fresh_run.stderr[-3000:]
    fresh = json.loads(fresh_run.stdout.strip().splitlines()[-1])

    assert forked["helper"] in forked["children"]  # the one it forked before its command ran
    assert forked["helper_command"][:2] != ["-c", zygote_module.FORKSERVER_COMMAND]
    assert any(part.startswith(zygote_module.FORKSERVER_COMMAND) for part in fresh["helper_command"])
    for report in (forked, fresh):
        assert report["helper_parent"] == report["pid"]
        (item,) = {json.dumps(item) for item in report["items"]}
        item = json.loads(item)
        assert item["parent"] == report["helper"] != report["pid"]
        assert item["sigterm_blocked"] and item["sigusr1_blocked"]
    assert forked["helper_descriptors"] == fresh["helper_descriptors"]
    assert _gone_soon([forked["helper"], fresh["helper"]])


def test_a_forked_rank_that_starts_no_workers_leaves_nothing_behind(tmp_path: Path) -> None:
    script = tmp_path / "loader_rank.py"
    script.write_text(_LOADER_RANK)
    proc, log = _start(tmp_path, [str(script), "idle"])
    assert proc.wait(timeout=60) == 0, _output(log)
    report = json.loads(_output(log).strip().splitlines()[-1])
    assert len(report["children"]) == 1  # the helper-in-waiting
    assert _gone_soon(report["children"])

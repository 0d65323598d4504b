"""Launch multi-process runs from tests: a world's ranks started directly (:func:`run_world`,
:func:`run_ranks`), torchrun on one machine, or several "nodes" of ``launch/multinode.sh`` on
127.0.0.1. Directly started ranks are forked from a server that has imported torch and
fusiontrain already (:mod:`tests.helpers.zygote`) unless their environment needs a fresh
interpreter.

Every launch:

- runs with ``OMP_NUM_THREADS=1`` (a 2-core CI machine otherwise thrashes) and the repo root on
  ``PYTHONPATH``;
- captures stdout and stderr together (into a temporary file, not a pipe, so that an orphaned
  worker holding the pipe can never hang the test);
- has a hard timeout: on expiry the whole process tree (launcher, torchrun agents and their
  workers, which torchrun starts in sessions of their own) is terminated, then killed, and an
  ``AssertionError`` shows the tail of the output;
- raises ``AssertionError`` with the last lines of the output on a non-zero exit.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fusiontrain.parallel.processes import descendant_pids
from tests.helpers.zygote import ForkedProcess, Zygote, forkable

REPO_ROOT = Path(__file__).resolve().parents[2]
MULTINODE_SH = REPO_ROOT / "launch" / "multinode.sh"
TAIL_LINES = 80
FAILURE_GRACE_S = 5.0  # run_world: how long the other ranks may take to report a rank's failure


#: The rendezvous endpoint of a single-node torchrun: port 0, so the agent's store binds a port the
#: kernel picks, as ``torchrun --standalone`` does. A port from :func:`free_port` can be taken by
#: another process (an ephemeral port of one of the suite's other connections) before the agent
#: binds it, and the agent then fails at once ("The connection to the C10d store has failed").
LOCAL_RDZV_ENDPOINT = "127.0.0.1:0"


#: Where :func:`free_port` draws from: below the kernel's ephemeral range
#: (``net.ipv4.ip_local_port_range``, 32768-60999 by default), from which it gives every outgoing
#: connection its local port. A port from that range, free when drawn, can become some connection's
#: before the process meant to bind it does (the suite makes thousands of connections).
_PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PORTS_BELOW_EPHEMERAL = 12_000


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, drawn at random below the ephemeral range, so that
    only another explicit bind (another test's draw, one in 12,000) can take it before the
    process it is for binds it."""
    ephemeral_low = int(_PORT_RANGE_FILE.read_text().split()[0]) if _PORT_RANGE_FILE.is_file() else 32768
    low = max(1024, ephemeral_low - _PORTS_BELOW_EPHEMERAL)
    draw = random.SystemRandom()  # distinct in every xdist worker, whatever seeds the random module
    for _ in range(100):
        port = draw.randrange(low, ephemeral_low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use: draw again
                continue
            return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 in {low}-{ephemeral_low - 1} after 100 draws")


# Launcher / process-group variables a developer's shell (or an outer torchrun) may hold; a test
# run must not inherit them.
_LAUNCH_VARS = {
    "FUSIONTRAIN_ENTRY", "TORCHRUN_ARGS", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR",
    "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "GPUS_PER_NODE", "FUSIONTRAIN_ROOT",
}


def _is_launch_var(name: str) -> bool:
    return name in _LAUNCH_VARS or name.startswith(("RDZV_", "TORCHELASTIC_", "SLURM_"))


#: This process's environment when the module was imported, before any test changed it.
_START_ENVIRON = dict(os.environ)


def launch_env(env: Mapping[str, str] | None = None, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a launched run: ours without launcher / process-group variables
    (``RANK``, ``NODE_RANK``, ``RDZV_*``, ``SLURM_*``, ...), ``OMP_NUM_THREADS=1``, the repo root
    first on ``PYTHONPATH``, this interpreter as ``PYTHON`` (read by the launch scripts), then
    ``env``. ``base``: the environment to start from (default: this process's, now)."""
    out = {k: v for k, v in (os.environ if base is None else base).items() if not _is_launch_var(k)}
    out["OMP_NUM_THREADS"] = "1"
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), out.get("PYTHONPATH", "")) if p)
    out["PYTHON"] = sys.executable
    out["PYTHONUNBUFFERED"] = "1"
    if env:
        out.update(env)
    return out


def run_torchrun(
    args: Sequence[str],
    *,
    nproc: int,
    timeout: float = 240,
    env: Mapping[str, str] | None = None,
    nnodes: int = 1,
    extra_torchrun_args: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run ... <args>`` with ``nproc`` processes on this machine.

    ``args`` is what follows the torchrun options: ``["-m", "fusiontrain", "train", ...]`` or
    ``[script_path, ...]``. The rendezvous is c10d on 127.0.0.1 (:data:`LOCAL_RDZV_ENDPOINT` on
    one node, else a fresh port; override it, or
    anything else, through ``extra_torchrun_args``; later options win). Returns the completed
    process with the combined output in ``.stdout``; raises ``AssertionError`` on timeout, and
    on a non-zero exit unless ``check`` is false.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--nnodes",
        str(nnodes),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        LOCAL_RDZV_ENDPOINT if nnodes == 1 else f"127.0.0.1:{free_port()}",
        *extra_torchrun_args,
        *args,
    ]
    (result,) = _run_all([cmd], env=launch_env(env), timeout=timeout, cwd=REPO_ROOT, check=check)
    return result


def run_ranks(
    args: Sequence[str],
    *,
    nproc: int,
    timeout: float = 240,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> list[subprocess.CompletedProcess]:
    """Start ``nproc`` plain processes ``python <args>`` at once, one per rank, with the process-group
    variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) set by
    hand: no torchrun agent, so no rank is killed because another failed, and each rank's output
    is its own. Returns one completed process per rank, in rank order; raises ``AssertionError``
    on timeout, and on a non-zero exit unless ``check`` is false.
    """
    envs = _rank_envs(nproc, env)
    cmds = [[sys.executable, *args] for _ in range(nproc)]
    return _run_all(cmds, env=envs, timeout=timeout, cwd=REPO_ROOT, check=check, ranks=nproc)


def _rank_envs(nproc: int, env: Mapping[str, str] | None) -> list[dict[str, str]]:
    """The launch environment of each of ``nproc`` ranks started by hand: the process-group
    variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` on a fresh port) over :func:`launch_env`."""
    base = launch_env(env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    return [{**base, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(nproc)]


def run_world(
    args: Sequence[str],
    *,
    nproc: int,
    timeout: float = 240,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    beside: Sequence[Sequence[str]] = (),
) -> subprocess.CompletedProcess | tuple[subprocess.CompletedProcess, list[subprocess.CompletedProcess]]:
    """Run ``python <args>`` as one world of ``nproc`` ranks started directly, the way srun, mpirun
    or a Kubernetes job starts them: no torchrun agent, the process-group variables (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) set per rank and the
    rendezvous through ``env://`` (rank 0 hosts the store).

    For tests whose subject is what the ranks do, not the launcher: torchrun's agent costs about
    1.6 CPU-s and 1.8 s of wall time per launch on this machine, and the suite launches about a
    hundred. The torchrun path (its agent's store, restarts, signals, ``--tee``) keeps tests of its
    own (:func:`run_torchrun`). As torchrun does, a rank's failure ends the others (after a short
    grace in which they may report it themselves). Returns one completed process whose output is
    every rank's, in rank order, and whose exit code is a failed rank's own (else 0); raises
    ``AssertionError`` on timeout, and on a non-zero exit unless ``check`` is false.

    ``beside``: other commands (e.g. a ``plan`` of the same config) run at the same time, outside
    the world, with the launch environment without ``env`` (which is the ranks'), and forked as
    the ranks are where they may be; then ``(world result, their results)`` is returned.
    """
    envs = _rank_envs(nproc, env) + [launch_env()] * len(beside)
    cmds = [[sys.executable, *args] for _ in range(nproc)] + [list(command) for command in beside]
    every = _run_all(cmds, env=envs, timeout=timeout, cwd=REPO_ROOT, check=check, end_all_on_failure=True, ranks=len(cmds))
    results, others = every[:nproc], every[nproc:]
    codes = [r.returncode for r in results]
    # A rank's own failure before the signals with which the others were ended.
    code = next((c for c in codes if c > 0), next((c for c in codes if c != 0), 0))
    output = "".join(r.stdout if r.stdout.endswith("\n") or not r.stdout else r.stdout + "\n" for r in results)
    world = subprocess.CompletedProcess(cmds[0], code, output, None)
    return (world, others) if beside else world


def run_script_multinode(
    args: Sequence[str],
    *,
    nnodes: int,
    nproc_per_node: int = 1,
    timeout: float = 240,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> list[subprocess.CompletedProcess]:
    """Start ``nnodes`` copies of ``launch/multinode.sh <args>`` at once on 127.0.0.1, one per
    ``NODE_RANK`` 0..nnodes-1, sharing one rendezvous, and wait for all of them.

    ``env`` goes to every node (``FUSIONTRAIN_ENTRY`` picks what they run). Returns one
    completed process per node, in ``NODE_RANK`` order; raises ``AssertionError`` with each
    node's output tail if any node fails or the run exceeds ``timeout``.
    """
    base = launch_env(env)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or free_port()),
        NNODES=str(nnodes),
        NPROC_PER_NODE=str(nproc_per_node),
    )
    if "RDZV_ID" not in (env or {}):
        base["RDZV_ID"] = f"test-{os.getpid()}-{time.monotonic_ns()}"
    cmds, envs = [], []
    for node_rank in range(nnodes):
        cmds.append(["bash", str(MULTINODE_SH), *args])
        envs.append({**base, "NODE_RANK": str(node_rank)})
    return _run_all(cmds, env=envs, timeout=timeout, cwd=REPO_ROOT)


def run_command(
    cmd: Sequence[str],
    *,
    timeout: float = 240,
    env: Mapping[str, str] | None = None,
    cwd: Path | str = REPO_ROOT,
) -> subprocess.CompletedProcess:
    """Run any launcher command (``launch/torchrun.sh``, ``accelerate launch``, ...) with the
    same environment, output capture, timeout and failure report as :func:`run_torchrun`."""
    (result,) = _run_all([cmd], env=launch_env(env), timeout=timeout, cwd=Path(cwd))
    return result


def run_commands(
    cmds: Sequence[Sequence[str]],
    *,
    timeout: float = 240,
    env: Mapping[str, str] | None = None,
    cwd: Path | str = REPO_ROOT,
    fork: bool = False,
    check: bool = True,
) -> list[subprocess.CompletedProcess]:
    """:func:`run_command` for several commands at once (they run concurrently); each result's
    ``stdout`` is the command's output and error output together. ``fork``: they are the test's
    own Python commands, not launchers, and are forked where they may be (as :func:`run_world`'s
    ranks are). ``check``: raise on a non-zero exit (a timeout always raises)."""
    return _run_all(cmds, env=launch_env(env), timeout=timeout, cwd=Path(cwd), check=check, ranks=len(cmds) if fork else 0)


# -- process plumbing ---------------------------------------------------------------------------


def _run_all(
    cmds: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str] | Sequence[Mapping[str, str]],
    timeout: float,
    cwd: Path,
    check: bool = True,
    end_all_on_failure: bool = False,
    ranks: int = 0,
) -> list[subprocess.CompletedProcess]:
    """Start every command at once (each in its own session), wait for all with one deadline,
    and check the exit codes (unless ``check`` is false; a timeout always raises). With
    ``end_all_on_failure``, a command that exits non-zero ends the others FAILURE_GRACE_S later.
    The first ``ranks`` commands are the test's own Python commands (a world's ranks, what runs
    beside them), not launchers: those :func:`forkable` are forked from the session's
    :class:`~tests.helpers.zygote.Zygote` (:func:`rank_zygote`)."""
    envs = [env] * len(cmds) if isinstance(env, Mapping) else list(env)
    logs = [tempfile.TemporaryFile(mode="w+b") for _ in cmds]
    procs: list[subprocess.Popen | ForkedProcess] = []
    zygote = rank_zygote() if ranks else None
    try:
        for index, (cmd, proc_env, log) in enumerate(zip(cmds, envs, logs)):
            if (
                zygote is not None
                and index < ranks
                and cmd[0] == sys.executable
                and forkable(cmd[1:], proc_env, zygote.env)
            ):
                procs.append(zygote.start(cmd[1:], proc_env, cwd, log.fileno()))
                continue
            procs.append(
                subprocess.Popen(
                    list(cmd),
                    env=dict(proc_env),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        if end_all_on_failure:
            failed_at = None
            while None in (codes := [proc.poll() for proc in procs]) and time.monotonic() < deadline:
                if failed_at is None and any(code not in (None, 0) for code in codes):
                    failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() > failed_at + FAILURE_GRACE_S:
                    for proc in procs:
                        _kill_tree(proc)
                time.sleep(0.05)
        else:
            for proc in procs:
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    break
        timed_out = any(proc.poll() is None for proc in procs)
        if timed_out:
            for proc in procs:
                _kill_tree(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:  # an exception of our own (KeyboardInterrupt): leave nothing behind
                _kill_tree(proc)
    outputs = [_read(log) for log in logs]
    results = [subprocess.CompletedProcess(list(c), p.returncode, o, None) for c, p, o in zip(cmds, procs, outputs)]

    if timed_out:
        raise AssertionError(f"launch timed out after {timeout:.0f} s (process trees killed)\n" + _report(results))
    if check and any(r.returncode != 0 for r in results):
        raise AssertionError("launch failed\n" + _report(results))
    return results


#: Set to 0 to start every rank as a fresh interpreter (to compare, or to rule the zygote out).
FORK_RANKS_VARIABLE = "FUSIONTRAIN_TESTS_FORK_RANKS"
_zygote: Zygote | None = None


def rank_zygote() -> Zygote | None:
    """This process's :class:`~tests.helpers.zygote.Zygote`, started on first use under
    :func:`launch_env` of the environment this process started with (not one a test changed for
    itself) and stopped at exit; None when :data:`FORK_RANKS_VARIABLE` is 0. Forking a rank from
    it skips the 2.7 CPU-s of imports a fresh interpreter pays."""
    global _zygote
    if os.environ.get(FORK_RANKS_VARIABLE, "1") == "0":
        return None
    if _zygote is None:
        _zygote = Zygote(launch_env(base=_START_ENVIRON), REPO_ROOT)
        atexit.register(_zygote.close)
    return _zygote


def _read(log) -> str:
    log.seek(0)
    text = log.read().decode("utf-8", errors="replace")
    log.close()
    return text


def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = text.splitlines()
    head = f"... ({len(lines) - n} earlier lines)\n" if len(lines) > n else ""
    return head + "\n".join(lines[-n:])


def _report(results: Sequence[subprocess.CompletedProcess]) -> str:
    parts = []
    for i, r in enumerate(results):
        name = f"[process {i}] " if len(results) > 1 else ""
        parts.append(f"{name}exit code {r.returncode}: {' '.join(map(str, r.args))}\n{_tail(r.stdout)}")
    return "\n\n".join(parts)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_tree(proc: subprocess.Popen | ForkedProcess, grace: float = 5.0) -> None:
    """SIGTERM the process and every descendant (torchrun's workers live in sessions of their
    own, so the process group alone does not reach them), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    tree = descendant_pids(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    _signal(tree, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    tree = sorted(set(tree) | set(descendant_pids(proc.pid)))
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _signal(tree, signal.SIGKILL)
    proc.wait()

"""Start the suite's ranks by forking a process that has imported torch and fusiontrain already.

Every launched rank of a tiny run spends most of its CPU importing: torch, FSDP2 and DTensor,
dynamo (torch's optimizers import it at their first step), the model families, about 2.7 CPU-s on
this machine, against well under a second of training. The suite starts a few hundred ranks.
:class:`Zygote` is a server process, one per pytest worker, started with the launch environment
(:func:`tests.helpers.launch.launch_env`), that imports those modules once and then forks a child
for every rank asked of it. A child starts as ``python <args>`` would: its own session, the
environment, working folder, ``sys.argv`` and ``sys.path[0]`` of that command, its output to the
caller's file, the module or script run as ``__main__``, and on return the interpreter's normal
exit (``atexit`` handlers, non-daemon threads joined). Only what the imports themselves did is
shared, so a command whose environment changes what happens at import or at interpreter start
(``MALLOC_*``, ``OMP_NUM_THREADS``, ``TORCH_LOGS``, ...) is not forked:
:func:`forkable` says which are.

The protocol, over a Unix socket: the caller sends one JSON request (``argv``, ``env``, ``cwd``)
with its output file's descriptor (``SCM_RIGHTS``); the server forks, answers ``pid N``, and
answers ``exit CODE CPU_SECONDS`` (``-SIGNAL`` for a signal, as ``subprocess`` reports it; the
child's CPU time from ``wait4``) when it has reaped that child. :class:`ForkedProcess` gives the
caller ``subprocess.Popen``'s ``pid``, ``poll``, ``wait`` and ``returncode``.

A rank that starts dataloader workers by ``forkserver`` (the trainer's default) would start the
helper as a fresh interpreter, which imports torch and the data modules again (about 5 CPU-s a
rank here, more than the rank's own start cost before the zygote). So a forked child forks once
more before its command runs, while it is still single-threaded and clean: that grandchild waits
to become the rank's forkserver helper. When the rank starts the helper
(``multiprocessing.util.spawnv_passfds`` with the forkserver's ``-c`` command, the one call this
module replaces, and only in a forked child), the grandchild receives the command, its file
descriptors (``SCM_RIGHTS``, put back at the numbers the command names) and the calling thread's
signal mask, and runs it as ``python -c`` would. It is the rank's child, as a spawned helper is
(``multiprocessing`` polls it with ``waitpid``); a rank that never starts a helper lets it go
(end of file on their socket). A second helper (the first died) is spawned as usual.

Run as a script, this file is the server: ``python zygote.py NAME``, listening on the abstract
Unix socket ``NAME`` (Linux: no file, so no path-length limit and nothing left behind).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

#: What the server imports before it forks: every rank imports these (the trainer, the model
#: families, FSDP2, DCP; dynamo through torch's optimizers), and a rank that reads real data, and
#: its forkserver helper, the data libraries: transformers' tokenizers, its auto classes and the
#: image-processing code every image processor builds on (about 2 CPU-s; a model's own processor
#: module then costs a hundredth of that), ``datasets`` for streams. No model family is named here.
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "fusiontrain.cli",
    "fusiontrain.train.trainer",
    "fusiontrain.source.model_source",
    "fusiontrain.families.registry",
    "tokenizers",
    "transformers",
    "transformers.image_processing_utils",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.image_processing_auto",
    "transformers.models.auto.feature_extraction_auto",
    "datasets",
)
#: Environment variables a forked rank may differ in from the server: read when the code runs, not
#: when a module is imported or the interpreter starts. The process-group variables are set per
#: rank; ``FUSIONTRAIN_*`` are the trainer's own (fault injection, the entry point);
#: ``PYTEST_CURRENT_TEST`` is pytest's note of the test running; inductor reads
#: ``TORCHINDUCTOR_CACHE_DIR`` when it compiles, and writes its default into ``os.environ`` the
#: first time, so a pytest process that compiled a test in-process has it and its server may not.
RUNTIME_VARIABLES = frozenset(
    {
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR",
    }
)
RUNTIME_PREFIXES = ("FUSIONTRAIN_", "WANDB_")
_MAX_REQUEST = 1 << 20
#: How ``multiprocessing.forkserver`` starts its helper: ``python -c "<this>; main(...)"``.
FORKSERVER_COMMAND = "from multiprocessing.forkserver import main"
#: The CPU time (user + system) of every rank this process had forked that has ended, with the
#: descendants each reaped (its dataloader workers): ``pytest --cpu-times`` adds it to the tests'.
forked_cpu_seconds = 0.0


def forkable(args: Sequence[str], env: Mapping[str, str], server_env: Mapping[str, str]) -> bool:
    """Whether ``python <args>`` under ``env`` may be forked from a server started under
    ``server_env``: a module (``-m``) or a script, and no variable that differs between the two
    environments is one read at import or interpreter start."""
    if not args or (args[0].startswith("-") and args[0] != "-m") or (args[0] == "-m" and len(args) < 2):
        return False
    differing = {key for key in set(env) | set(server_env) if env.get(key) != server_env.get(key)}
    return all(key in RUNTIME_VARIABLES or key.startswith(RUNTIME_PREFIXES) for key in differing)


class ForkedProcess:
    """A rank forked by the :class:`Zygote`, with ``subprocess.Popen``'s ``pid``, ``poll()``,
    ``wait()`` and ``returncode``. The rank runs in a session of its own (``pid`` is its process
    group), as ``Popen(start_new_session=True)`` starts one."""

    def __init__(self, connection: socket.socket, pid: int, args: list[str]) -> None:
        self._connection = connection
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self._read_exit()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            ready = select.select([self._connection], [], [], timeout)[0]
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self._read_exit()
        assert self.returncode is not None
        return self.returncode

    def _read_exit(self) -> None:
        global forked_cpu_seconds
        message = _read_line(self._connection)
        self._connection.close()
        if not message.startswith("exit "):
            raise RuntimeError(f"the zygote ended before rank {self.pid} did (it said {message!r})")
        _, code, cpu_seconds = message.split()
        self.returncode = int(code)
        forked_cpu_seconds += float(cpu_seconds)


class Zygote:
    """The caller's side: starts the server on first use and keeps it for the session."""

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        self.env = dict(env)
        self._name = f"fusiontrain-zygote-{os.getpid()}-{secrets.token_hex(8)}"
        self._log = tempfile.TemporaryFile(mode="w+b")
        self._server = subprocess.Popen(
            [sys.executable, __file__, self._name],
            env=self.env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, args: Sequence[str], env: Mapping[str, str], cwd: Path, output: int) -> ForkedProcess:
        """Fork ``python <args>`` with environment ``env`` in folder ``cwd``, its stdout and stderr
        going to the open file descriptor ``output``."""
        connection = self.connect()
        request = json.dumps({"argv": list(args), "env": dict(env), "cwd": str(cwd)}).encode() + b"\n"
        socket.send_fds(connection, [request], [output])
        message = _read_line(connection)
        if not message.startswith("pid "):
            connection.close()
            raise RuntimeError(f"the zygote could not start {list(args)}: {message}")
        return ForkedProcess(connection, int(message.split()[1]), [sys.executable, *args])

    def connect(self, timeout: float = 60.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(_abstract(self._name))
                return connection
            except (FileNotFoundError, ConnectionRefusedError):
                connection.close()
                if self._server.poll() is not None or time.monotonic() > deadline:
                    self._log.seek(0)
                    raise RuntimeError("the zygote did not start:\n" + self._log.read().decode(errors="replace")[-3000:])
                time.sleep(0.05)

    def close(self) -> None:
        if self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
        self._log.close()


def _read_line(connection: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


# -- the server ---------------------------------------------------------------------------------------


def _abstract(name: str) -> str:
    """The address of the abstract Unix socket ``name``."""
    return "\0" + name


def serve(name: str) -> list[str]:
    """Import :data:`PRELOAD`, then fork a child per request until SIGTERM. Returns only in a
    child: the command's arguments (what follows ``python``), which its caller then runs."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(_abstract(name))  # a caller that connects before listen() is refused, and retries
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # child pid -> its caller's connection
    caller = os.getppid()
    while True:
        readable = select.select([listener], [], [], 0.02)[0]
        if os.getppid() != caller:  # the pytest process that started this is gone (killed)
            os._exit(0)
        for pid, connection in list(waiting.items()):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                _send(connection, f"exit {os.waitstatus_to_exitcode(status)} {usage.ru_utime + usage.ru_stime:.3f}")
                connection.close()
                del waiting[pid]
        if not readable:
            continue
        connection, _ = listener.accept()
        try:
            message, fds, _, _ = socket.recv_fds(connection, _MAX_REQUEST, 1)
            request = json.loads(message)
            if len(fds) != 1 or not request.get("argv"):
                raise ValueError(f"a request needs argv and one output descriptor, got {len(fds)} descriptors")
        except (OSError, ValueError) as error:  # a caller that went away, or a malformed request
            _send(connection, f"error {error}")
            connection.close()
            continue
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            listener.close()
            for other in waiting.values():
                other.close()
            connection.close()
            os.close(ready_read)
            _become(request, fds[0], ready_write)
            _prefork_forkserver_helper()
            return request["argv"]
        os.close(fds[0])
        os.close(ready_write)
        os.read(ready_read, 1)  # the child has its own session: the caller may signal its group
        os.close(ready_read)
        _send(connection, f"pid {pid}")
        waiting[pid] = connection


def _send(connection: socket.socket, message: str) -> None:
    try:
        connection.sendall(message.encode() + b"\n")
    except OSError:  # the caller is gone (its test ended): nothing to tell
        pass


def _become(request: dict, output: int, ready: int) -> None:
    """In the forked child: take on the command's session (then say so on the pipe ``ready``),
    output, folder, environment and arguments."""
    os.setsid()
    os.write(ready, b"1")
    os.close(ready)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(null)
    os.close(output)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
    else:
        sys.argv = list(argv)
        sys.path[0] = str(Path(argv[0]).resolve().parent)


def _prefork_forkserver_helper() -> None:
    """In the forked child, before its command runs: fork the process that becomes this rank's
    forkserver helper if the rank starts one, and route that one start to it (module docstring)."""
    import multiprocessing.util

    ours, theirs = socket.socketpair()
    helper = os.fork()
    if helper == 0:
        ours.close()
        _become_forkserver_helper(theirs)  # never returns
    theirs.close()
    spawn = multiprocessing.util.spawnv_passfds
    waiting = [ours]  # emptied when the helper has its command

    def spawnv_passfds(path: str, args: Sequence[str], passfds: Sequence[int]) -> int:
        if not waiting or len(args) < 2 or args[-2] != "-c" or not args[-1].startswith(FORKSERVER_COMMAND):
            return spawn(path, args, passfds)
        connection = waiting.pop()
        mask = sorted(int(sig) for sig in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        request = json.dumps({"code": args[-1], "fds": [int(fd) for fd in passfds], "mask": mask}).encode()
        socket.send_fds(connection, [request], [int(fd) for fd in passfds])
        connection.close()
        return helper

    multiprocessing.util.spawnv_passfds = spawnv_passfds


def _become_forkserver_helper(connection: socket.socket) -> None:
    """The grandchild: wait for the forkserver's command, then run it as ``python -c`` would, with
    exactly its descriptors (at the numbers it names, besides 0-2) and the signal mask of the
    thread that started it; leave when the rank is gone without starting one."""
    try:
        message, fds, _, _ = socket.recv_fds(connection, _MAX_REQUEST, 16)
    except OSError:
        message = b""
    if not message:
        os._exit(0)
    request = json.loads(message)
    targets = request["fds"]
    base = max([*targets, *(int(fd) for fd in os.listdir("/proc/self/fd"))]) + 1
    held = [fcntl.fcntl(fd, fcntl.F_DUPFD, base) for fd in fds]
    for fd in (int(name) for name in os.listdir("/proc/self/fd")):
        if fd > 2 and fd not in held:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, closed already
                pass
    for fd, target in zip(held, targets, strict=True):
        os.dup2(fd, target)  # inheritable, as spawnv_passfds passes them
        os.close(fd)
    signal.pthread_sigmask(signal.SIG_SETMASK, request["mask"])
    sys.argv = ["-c"]
    code = 0
    try:
        exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as leaving:
        code = leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_command(argv: list[str]) -> None:
    """In the forked child: run ``python <argv>``'s module or script as ``__main__``."""
    import runpy

    if argv[0] == "-m":
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the server: leave at once
    command = serve(sys.argv[1])
    run_command(command)  # only a child gets here; the interpreter then exits as after `python <args>`

"""Run several ``python -m fusiontrain`` commands (``plan``, ``train --dry-run``) one after another
in this one process, each followed by this process's peak resident memory so far.

Usage: ``python tests/helpers/plan_many.py ARGS [--- ARGS ...]``, each ``ARGS`` what would follow
``python -m fusiontrain``. After each command's output comes a line
``=== command K exit CODE peak RSS: N KiB`` (``ru_maxrss`` of this process: the high-water mark of
every command so far, so an upper bound of each one's own). The helper exits 0; the test reads the
exit codes from those lines.

The shipped-config plan test runs its nine planner traces through two of these instead of nine
processes: each saves a process start (interpreter, torch, FSDP, the model families) and its
fake-tensor caches warm across configs.
"""

from __future__ import annotations

import resource
import sys

SEPARATOR = "---"
MARKER = "=== command "


def split_commands(argv: list[str]) -> list[list[str]]:
    commands: list[list[str]] = [[]]
    for arg in argv:
        if arg == SEPARATOR:
            commands.append([])
        else:
            commands[-1].append(arg)
    return [command for command in commands if command]


def main(argv: list[str]) -> int:
    from fusiontrain.cli import main as fusiontrain_main

    for index, command in enumerate(split_commands(argv)):
        try:
            code = fusiontrain_main(command)
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code if isinstance(exit_.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"{MARKER}{index} exit {code} peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} KiB", flush=True)
    return 0


def outputs(stdout: str) -> list[tuple[str, int, int]]:
    """``(output, exit code, peak RSS bytes so far)`` of each command, from this helper's stdout."""
    results, chunk = [], []
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            words = line.split()
            results.append(("\n".join(chunk), int(words[4]), int(words[7]) * 1024))
            chunk = []
        else:
            chunk.append(line)
    return results


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

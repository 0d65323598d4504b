"""Run a command and report the peak resident memory of its process.

Usage: ``python tests/helpers/peak_rss.py COMMAND [ARG ...]``. The command's output passes through;
a last line ``peak RSS: N KiB`` follows (the largest ``ru_maxrss`` among this helper's children,
i.e. the command's own high-water mark), and the helper exits with the command's exit code.
"""

from __future__ import annotations

import resource
import subprocess
import sys

PREFIX = "peak RSS: "


def main(argv: list[str]) -> int:
    code = subprocess.call(argv)
    sys.stdout.flush()
    print(f"{PREFIX}{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} KiB", flush=True)
    return code


def peak_rss_bytes(output: str) -> int:
    """The peak from this helper's last line in ``output``."""
    line = next(line for line in reversed(output.splitlines()) if line.startswith(PREFIX))
    return int(line[len(PREFIX) :].split()[0]) * 1024


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

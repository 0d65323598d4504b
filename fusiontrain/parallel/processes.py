"""Finding a process's descendants (Linux ``/proc``): torchrun starts each worker in a session of
its own, so signalling torchrun's process group does not reach them."""

from __future__ import annotations

from pathlib import Path


def parent_pid(pid: int) -> int | None:
    """The parent of live process ``pid``, or None when it is gone (or without ``/proc``)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name (field 2) may hold spaces


def descendant_pids(pid: int) -> list[int]:
    """Every live descendant of ``pid``, parents before children (empty without ``/proc``)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes().decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the command name (field 2) may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found

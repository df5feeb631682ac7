"""Local jobs (submitit's LocalExecutor) as processes: who they are, whether they live, how to end
them. A PID alone is not an identity (PIDs are reused), so an attempt records its host and its
process's start time, and a process counts as the job only when both still match."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None when
    there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def identity(pid: int) -> dict[str, Any]:
    """What an attempt records to recognise its process later."""
    return {"host": socket.gethostname(), "pid_started": start_time(pid)}


def alive(pid: int | str | None, recorded: Mapping[str, Any]) -> bool | None:
    """Whether the process `recorded` describes still runs: None when it cannot be told from here
    (another host), False when it is gone, a zombie, or its PID now belongs to another process."""
    if recorded.get("host") and recorded["host"] != socket.gethostname():
        return None
    try:
        pid = int(pid)  # type: ignore[arg-type]
        os.kill(pid, 0)
    except (OSError, TypeError, ValueError):
        return False
    if _state(pid) in ("Z", "X"):
        return False
    started = recorded.get("pid_started")
    return started is None or start_time(pid) == started


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (submitit's controller starts one task process per rank)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill(pid: int | str, recorded: Mapping[str, Any]) -> bool:
    """SIGKILL a local job and its task processes (a stalled or stopped one too), if it is still the
    recorded process. Returns whether it was."""
    if not alive(pid, recorded):
        return False
    pid = int(pid)
    for target in [*descendants(pid), pid]:
        try:
            os.kill(target, signal.SIGKILL)
        except OSError:
            pass
    return True

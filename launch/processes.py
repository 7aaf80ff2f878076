"""Processes on this machine, from /proc (Linux): is one alive, what did it start.

Used by the run lock (a coordinator on this host is gone once its pid is), the local
executor (a job is its controller's process tree) and a task stopping its worker's ranks.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import List


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return "\nState:\tZ" not in status
    except FileNotFoundError:
        return False


def child_pids(pid: int) -> List[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def process_tree(pid: int) -> List[int]:
    """pid and its descendants, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(child_pids(p))
    return out


def signal_all(pids: List[int], sig: int = signal.SIGTERM) -> None:
    """Send `sig` to each of `pids` that still exists (and is ours)."""
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass

"""The run lock: one coordinator per run directory, RUN_DIR/coordinator/lock.json.

    lock = RunLock(rd)
    lock.acquire()            # or AlreadyRunning(where the other one runs)
    ...                       # a thread refreshes the heartbeat every LOCK_BEAT_S
    lock.release()
    live_coordinator(root)    # launch.start: the other coordinator's lock, or None

lock.json holds {"pid", "host", "token", "slurm_job_id", "started", "heartbeat"}. It is
created with a link (create-if-absent, atomic on every filesystem Sluice runs on). A lock is
held while its heartbeat is younger than LOCK_FRESH_S and, on the holder's own host, while its
pid lives (a killed coordinator is replaced at once); a lock of this process's own Slurm job
is an earlier incarnation of it (requeued: Slurm runs one at a time). A stale lock is set
aside by a rename, so of two coordinators taking it over, one wins.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from launch.processes import pid_alive
from shared.files import atomic_write_json, read_json
from shared.rundir import RunDir

log = logging.getLogger("sluice.coordinator")
# The lock is refreshed this often, and held while younger than LOCK_FRESH_S.
LOCK_BEAT_S = 5.0
LOCK_FRESH_S = 60.0


class AlreadyRunning(Exception):
    """Another coordinator process runs this run directory."""


def live_coordinator(root) -> Optional[dict]:
    """The lock of another coordinator process still running the run in `root`, or None."""
    info = read_json(RunDir(root).lock_file)
    if not isinstance(info, dict):
        return None
    if time.time() - float(info.get("heartbeat", 0)) > LOCK_FRESH_S:
        return None
    if info.get("host") == socket.gethostname():
        pid = int(info.get("pid", 0))
        if pid == os.getpid() or not pid_alive(pid):
            return None
    job = os.environ.get("SLURM_JOB_ID")
    if job and str(info.get("slurm_job_id")) == job and int(info.get("pid", 0)) != os.getpid():
        return None  # our own job's previous incarnation (requeued): Slurm runs one at a time
    return info


def describe_lock(info: dict) -> str:
    where = f"pid {info.get('pid')} on {info.get('host')}"
    if info.get("slurm_job_id"):
        where += f", Slurm job {info['slurm_job_id']}"
    return where


class RunLock:
    """This process's hold on a run directory's lock."""

    def __init__(self, rd: RunDir):
        self.rd = rd
        self.path = rd.lock_file
        self._token: Optional[str] = None
        self._stop: Optional[threading.Event] = None

    def acquire(self) -> None:
        """Become the run's only coordinator, or raise AlreadyRunning. A stale lock (its
        holder dead, or silent for LOCK_FRESH_S) is taken over."""
        path = self.path
        self._token = uuid.uuid4().hex
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "token": self._token,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time()}
        for _ in range(3):
            held = live_coordinator(self.rd.root)
            if held is not None:
                raise AlreadyRunning(describe_lock(held))
            if path.exists():  # stale: set it aside (one taker wins the rename)
                try:
                    os.replace(path, path.with_name(f"lock.stale-{uuid.uuid4().hex[:8]}.json"))
                except FileNotFoundError:
                    pass
                for old in path.parent.glob("lock.stale-*.json"):
                    old.unlink(missing_ok=True)
            tmp = path.with_name(f".lock-{self._token}.tmp")
            tmp.write_text(json.dumps({**mine, "heartbeat": time.time()}))
            try:
                os.link(tmp, path)  # create-if-absent, atomically
            except FileExistsError:
                continue  # another coordinator got there first: look again
            finally:
                tmp.unlink(missing_ok=True)
            break
        else:
            raise AlreadyRunning(describe_lock(read_json(path) or {}))
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="coordinator-lock", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_BEAT_S):
            current = read_json(self.path) or {}
            if current.get("token") != self._token:
                log.error("[coordinator] lost the run lock to %s", describe_lock(current))
                return
            atomic_write_json(self.path, {**current, "heartbeat": time.time()})

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        if (read_json(self.path) or {}).get("token") == self._token:
            self.path.unlink(missing_ok=True)

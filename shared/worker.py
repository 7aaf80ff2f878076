"""Plumbing every role's worker shares: the frozen run config, who and where the worker is,
its heartbeat record, the stop signal, its failure report and test fault points. Paths and
committed directories are shared.rundir's.

Files this module reads and writes in RUN_DIR:

    config.yaml                          the resolved config, frozen at launch (no secrets)
    coordinator/STOP                     exists once the run is finished or stopped: workers exit
    workers/<role>/<job>_<task>_<pid>.json
                                         one per worker: {"role", "job_id", "task_id", "host",
                                         "node", "pid", "gpus", "started", "incarnation",
                                         "heartbeat", "status", "detail"}; the coordinator
                                         checks placement and liveness from these. status:
                                         starting, loading, waiting, working states, then
                                         exited / done / stopped / failed (or "lost", set by
                                         the coordinator when the job died). A failed worker's
                                         detail is one line (Worker.fail): the exception, where
                                         it was raised, and the log holding the traceback.
    workers/<role>/<job>_<task>_<pid>.activity.jsonl
                                         the worker's status changes, one JSON line each:
                                         {"t": <unix s>, "left", "status", "detail"}; a status
                                         holds from its line's t to the next line's "left"
                                         (when the worker left it; the record's write until
                                         t is bookkeeping). launch.timeline draws them and
                                         sums busy time from them. Appended, never
                                         rewritten: one short write per change, no fsync.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from shared import jobenv
from shared.claims import Owner
from shared.config import SluiceConfig, register
from shared.files import atomic_write_bytes, json_bytes
from shared.rundir import RunDir

# A worker record with one of these statuses is of a worker that is gone.
FINAL_STATUSES = ("exited", "done", "stopped", "failed", "lost")
log = logging.getLogger("sluice.worker")


def load_run_config(run_dir) -> SluiceConfig:
    """The run's frozen config, typed against the schema."""
    register()
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    path = rd.config_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {rd.root} is not a Sluice run directory "
                                "(start one with python -m launch.run conf=NAME)")
    node = OmegaConf.merge(OmegaConf.structured(SluiceConfig), OmegaConf.load(path))
    return OmegaConf.to_object(node)


def node_name() -> str:
    """The Slurm node name when under Slurm (several nodes may share one host in tests)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class StopRequested(Exception):
    """A graceful stop (SIGTERM: the pre-timeout signal passed on by the job's task, scancel,
    preemption) arrived while the worker was inside an interruptible section."""


class Worker:
    """A role's worker process: registers itself, heartbeats, and watches for STOP.

    The record's heartbeat is refreshed by a background thread every `beat_every_s` for as
    long as the process lives, so a worker busy in one long call (a generate, an optimizer
    batch over 32k tokens, a checkpoint save) never looks dead; `status` and `detail` say
    what it is doing. `incarnation` is Slurm's restart count of the job (a requeued job runs
    again under the same id): a record of an earlier incarnation is stale.

    Graceful stop: after `install_stop_handler()`, SIGTERM makes `should_stop()` true and,
    inside `with worker.interruptible():`, raises StopRequested at once, so that a long
    generate or forward is abandoned; `with claim:` blocks release their claims on the way
    out, and the stage ends with status "stopped"."""

    def __init__(self, run_dir, role: str, beat_every_s: float = 5.0):
        self.rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.cfg = load_run_config(self.rd)
        self.role = role
        self.owner = Owner.from_env()
        job = self.owner.job_id or "local"
        task = self.owner.task_id or "0"
        self.record_path = self.rd.worker_record(role, job, task, self.owner.pid)
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        self.activity_path = activity_path(self.record_path)
        self._activity = None  # opened at the first status change
        self._logged_status: Optional[str] = None
        self.beat_every_s = beat_every_s
        self._last_beat = 0.0
        self._lock = threading.Lock()
        self.stop_signal: Optional[str] = None
        self._interruptible = 0
        self.info = {
            "role": role, "job_id": self.owner.job_id, "task_id": self.owner.task_id,
            "host": socket.gethostname(), "node": node_name(), "pid": self.owner.pid,
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": time.time(),
            "incarnation": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "status": "starting", "detail": "",
        }
        self.beat("starting", force=True)
        self._beats_done = threading.Event()
        threading.Thread(target=self._beat_loop, name="worker-heartbeat", daemon=True).start()

    def _beat_loop(self) -> None:
        while not self._beats_done.wait(self.beat_every_s):
            self.beat(force=True)

    def beat(self, status: Optional[str] = None, detail: Optional[str] = None, force: bool = False) -> None:
        with self._lock:
            now = time.time()
            changed = status is not None and status != self._logged_status
            if status is not None:
                force = force or status != self.info["status"]
                self.info["status"] = status
            if detail is not None:
                self.info["detail"] = detail
            if force or now - self._last_beat >= self.beat_every_s:
                self.info["heartbeat"] = now
                # Not fsync'd: a status is news, not state (a crash loses at most the last
                # one, and the coordinator judges liveness by the heartbeat's age). Two
                # fsyncs per status change cost more than a short shard's work.
                atomic_write_bytes(self.record_path, json_bytes(self.info), fsync=False, sync_dir=False)
                self._last_beat = now
            if changed:
                # The old status ended when this call began, the new one starts now: the
                # record's write between them is neither (a busy span is the work alone).
                self._log_activity(now, time.time())

    def _log_activity(self, left: float, now: float) -> None:
        """Append the status just set to the activity log (best effort: a full disk or a
        vanished run directory must not kill the worker over a diagnostic)."""
        line = json.dumps({"t": round(now, 4), "left": round(left, 4), "status": self.info["status"],
                           "detail": str(self.info.get("detail") or "")[:200]}) + "\n"
        self._logged_status = self.info["status"]
        try:
            if self._activity is None:
                self.activity_path.parent.mkdir(parents=True, exist_ok=True)
                self._activity = open(self.activity_path, "a", buffering=1)
            self._activity.write(line)
        except OSError as e:
            log.warning("%s: cannot append to the activity log (%s)", self.activity_path, e)

    # -- graceful stop

    def install_stop_handler(self) -> None:
        """SIGTERM asks this worker to stop. Only the main thread may set signal handlers: a
        worker run in a thread (tests) keeps the process's own."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        first = self.stop_signal is None
        self.stop_signal = signal.Signals(signum).name
        if first:
            log.info("%s worker: %s, stopping", self.role, self.stop_signal)
        if self._interruptible:
            raise StopRequested(self.stop_signal)

    @contextmanager
    def interruptible(self):
        """A section a graceful stop may abandon at once (raises StopRequested)."""
        if self.stop_signal is not None:
            raise StopRequested(self.stop_signal)
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    def should_stop(self) -> bool:
        if self.stop_signal is not None:
            return True
        # A one-shot task (launch.resubmit --step N) redoes its step even on a finished run.
        return self.rd.stop_file.exists() and not jobenv.one_shot()

    def fail(self, exc: BaseException) -> None:
        """The worker's failure report, one form for every role: the exception, where it was
        raised and where its full traceback is (the job's log). launch.inspect shows it."""
        summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if len(summary) > 1500:
            summary = summary[:1500] + " ..."
        frames = traceback.extract_tb(exc.__traceback__)
        at = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
        logs = self.rd.log_dir(os.environ.get(jobenv.JOB_KEY) or self.role)
        self.beat("failed", detail=f"{summary}{at}; full traceback in {logs}/", force=True)

    def finish(self, status: str = "exited") -> None:
        """The worker's last word: `status` (exited, done, stopped), then no more heartbeats."""
        if status == "exited" and self.stop_signal is not None:
            status = "stopped"
        self.beat(status, f"on {self.stop_signal}" if status == "stopped" and self.stop_signal
                  else None, force=True)
        self._beats_done.set()


def activity_path(record_path: Path) -> Path:
    """The activity log beside a worker record (workers/<role>/<name>.activity.jsonl)."""
    return record_path.with_name(record_path.name[: -len(".json")] + ACTIVITY_SUFFIX)


ACTIVITY_SUFFIX = ".activity.jsonl"


def fault_point(name: str, step: int) -> None:
    """Fault injection for tests: SLUICE_FAULTS="checkpoint_save:2" SIGKILLs this process when
    it reaches the point `checkpoint_save` at step 2 (a real kill at an exact place, e.g. after
    a checkpoint's data is written and before it is committed); "optimizer_batch:2:sleep=30"
    makes it sleep 30 s there instead (a worker busy in one long call), and
    "optimizer_batch:2:raise" raises RuntimeError there (a bug in the worker). When SLUICE_FAULTS_DIR
    names a directory, each fault happens only the first time in a run (a restarted worker
    passes the point). Unset in production."""
    spec = os.environ.get(jobenv.FAULTS)
    if not spec:
        return
    for item in spec.split(","):
        parts = item.split(":")
        if parts[:2] != [name, str(step)]:
            continue
        once = os.environ.get(jobenv.FAULTS_DIR)
        if once:
            try:
                os.close(os.open(Path(once, f"{name}-{step}"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
        if len(parts) == 3 and parts[2].startswith("sleep="):
            time.sleep(float(parts[2][len("sleep="):]))
        elif len(parts) == 3 and parts[2] == "raise":
            raise RuntimeError(f"injected fault {name}:{step}")
        else:
            os.kill(os.getpid(), signal.SIGKILL)

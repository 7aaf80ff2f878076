"""The local executor: every job is a submitit local job (a controller process and one process
per task) on this machine. For `make smoke`, laptops and CI boxes without Slurm.

One job per role and node (`job_units(plan, merge_shared_nodes=False)`): one machine has no
nodes to allocate, and a failed worker then restarts only its own role's job. A job's id is
its controller's pid; a restarted coordinator finds a live job by that pid, or by the job
name the controller carries in its environment (SLUICE_JOB_NAME).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import submitit
from submitit.local.local import LocalJob

from launch.executors.base import (Executor, UnitTask, job_name, key_of_job_name, log_folder,
                                   time_limit_min)
from launch.processes import pid_alive, process_tree, signal_all
from shared import jobenv
from shared.partition import JobPlan, job_units

# The job name of a local job, in its controller's environment (Slurm has the real name):
# how a restarted coordinator finds the jobs of its run that state.json does not record.
JOB_NAME_ENV = "SLUICE_JOB_NAME"


class LocalExecutor(Executor):
    kind = "local"

    def units(self) -> List[JobPlan]:
        return job_units(self.plan, merge_shared_nodes=False)

    def submit(self, unit: JobPlan, step: Optional[int] = None):
        ex = submitit.LocalExecutor(folder=log_folder(self.run_dir, unit.key) / "%j")
        ex.update_parameters(timeout_min=time_limit_min(self.cfg.cluster.time_limit),
                             signal_delay_s=self.cfg.cluster.signal_delay_s,
                             tasks_per_node=len(unit.workers))
        # Copied into the job by submitit, which sets CUDA_VISIBLE_DEVICES="" for its jobs:
        # the job's name, and the GPUs this process may use (its workers index into them).
        exported = {JOB_NAME_ENV: job_name(self.run_dir, unit.key, step is not None),
                    jobenv.VISIBLE_DEVICES: os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        before = {name: os.environ.get(name) for name in exported}
        os.environ.update(exported)
        try:
            return ex.submit(UnitTask(str(self.run_dir), unit, local=True, step=step,
                                      synthetic=self.cfg.synthetic.enabled))
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def reattach(self, key: str, job_id: str):
        # No Popen: judged by its pid (state).
        return LocalJob(folder=log_folder(self.run_dir, key) / "%j", job_id=job_id)

    def _is_controller(self, job) -> bool:
        """The pid of a re-attached job is still its submitit controller (not a recycled pid
        now held by an unrelated process): its command line runs submitit's local controller
        on this job's log folder."""
        try:
            cmdline = Path(f"/proc/{int(job.job_id)}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            return False
        folder = str(Path(job.paths.folder).parent).encode()
        return b"submitit.local._local" in cmdline and folder in cmdline

    @staticmethod
    def _result(job) -> Optional[str]:
        path = job.paths.result_pickle
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                outcome = pickle.load(f)[0]
        except (OSError, EOFError, pickle.UnpicklingError, IndexError, TypeError):
            return "FAILED"
        return "COMPLETED" if outcome == "success" else "FAILED"

    def state(self, job) -> str:
        proc = getattr(job, "_process", None)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return "RUNNING"
            return self._result(job) or ("COMPLETED" if rc == 0 else "FAILED")
        if pid_alive(int(job.job_id)) and self._is_controller(job):
            return "RUNNING"
        return self._result(job) or "VANISHED"

    def live_jobs(self) -> Dict[str, str]:
        found = {}
        prefix = f"{JOB_NAME_ENV}=".encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
                if b"submitit.local._local" not in cmdline:
                    continue
                environ = Path(entry.path, "environ").read_bytes().split(b"\0")
            except OSError:
                continue  # gone, or another user's
            for var in environ:
                if var.startswith(prefix):
                    key = key_of_job_name(self.run_dir, var[len(prefix):].decode(errors="replace"))
                    if key is not None and pid_alive(int(entry.name)):
                        found[entry.name] = key
        return found

    def cancel(self, job, grace_s: float = 10.0) -> None:
        """The same as scancel, by hand over the job's process tree (controller, submitit
        tasks, workers): SIGTERM, then SIGKILL after `grace_s`. Signalling the controller alone
        would stop nothing (it forwards SIGTERM to the tasks, whose workers must get it)."""
        pid = int(job.job_id)
        proc = getattr(job, "_process", None)
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not (pid_alive(pid) and self._is_controller(job)):
            return
        tree = process_tree(pid)
        signal_all(tree[::-1], signal.SIGTERM)  # the workers first: they release their claims
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
            if proc is not None:
                proc.poll()  # reap the controller if it is our child
            time.sleep(0.1)
        signal_all([p for p in tree if pid_alive(p)], signal.SIGKILL)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

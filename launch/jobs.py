"""Role jobs through submitit: what runs in a job, how it is submitted, how it is watched.

Each role's task is a `RoleTask`, a small picklable callable that runs the role's stage as a
child process (`python -m stages.X RUN_DIR`, or `torchrun ... -m stages.X RUN_DIR` when the
task spans several GPUs or nodes). The coordinator never imports torch or vLLM; the child
process does. Slurm's pre-timeout signal reaches submitit in the task, which calls
`RoleTask.checkpoint`: the child is asked to stop (SIGTERM: workers release their claims) and
the job is requeued.

The same code path serves both executors: submitit's Slurm executor on a cluster and its
local executor (one process per task) on a laptop or CI box.
"""

from __future__ import annotations

import ctypes
import getpass
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import submitit

from shared.config import SluiceConfig
from shared.partition import Plan

ROLE_MODULE = {"generation": "stages.generate", "teacher": "stages.score", "training": "stages.train"}
# Job states after which a task is gone for good (first word of sacct's state).
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE", "INTERRUPTED", "VANISHED"}
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
               "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"}
# One sacct call (covering every job submitit watches) at most this often; job_state() in
# between answers from that call's results. A coordinator polling three roles every
# queue.poll_s would otherwise run three sacct a poll against slurmdbd.
SACCT_INTERVAL_S = 2.0
# Environment of a one-shot task (launch.resubmit --step N): the worker does that step even
# on a finished run, whose coordinator/STOP would otherwise make it exit at once.
ONE_SHOT_ENV = "SLUICE_ONE_SHOT_STEP"
# The job name of a local job, in its controller's environment (Slurm has the real name):
# how a restarted coordinator finds the jobs of its run that state.json does not record.
JOB_NAME_ENV = "SLUICE_JOB_NAME"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn of the stage process: SIGKILL it when the task process dies (Linux), so a
    killed task (local cancel, a crashed submitit process) never leaves an orphan worker
    that goes on claiming and committing shards beside its replacement."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _first_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True)
    return out.stdout.split()[0]


@dataclass
class RoleTask:
    """One task of a role job (picklable: submitit ships it to the node)."""

    run_dir: str
    role: str
    task_index: int
    gpus_per_task: int
    num_nodes: int = 1
    local: bool = False
    step: Optional[int] = None
    """Process only this step, then exit (launch.resubmit on a finished run)."""

    def command(self) -> List[str]:
        py, module = sys.executable, ROLE_MODULE[self.role]
        args = [self.run_dir] + ([] if self.step is None else ["--step", str(self.step)])
        multi = self.role in ("training", "teacher") and (self.gpus_per_task > 1 or self.num_nodes > 1)
        if not multi:
            return [py, "-m", module, *args]
        nproc = self.gpus_per_task // self.num_nodes
        if self.num_nodes == 1:
            dist = ["--standalone", f"--nnodes=1"]
        else:
            job = int(os.environ.get("SLURM_JOB_ID", "0"))
            port = 20000 + job % 20000  # distinct per job: several runs may share a node
            dist = [f"--nnodes={self.num_nodes}", f"--node_rank={os.environ.get('SLURM_NODEID', '0')}",
                    "--rdzv_backend=c10d", f"--rdzv_endpoint={_first_host()}:{port}",
                    f"--rdzv_id=sluice-{job}"]
        return [py, "-m", "torch.distributed.run", *dist, f"--nproc_per_node={nproc}",
                "-m", module, *args]

    def __call__(self) -> int:
        env = dict(os.environ)
        jenv = submitit.JobEnvironment()
        env["SLUICE_JOB_ID"] = str(jenv.job_id)
        env["SLUICE_TASK_ID"] = str(self.task_index)
        env["SLUICE_ROLE"] = self.role
        if self.step is not None:
            env[ONE_SHOT_ENV] = str(self.step)
        cmd = self.command()
        print(f"[sluice {self.role} task {self.task_index}] {' '.join(cmd)}", flush=True)
        self._child = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        rc = self._child.wait()
        if rc != 0:
            why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            raise RuntimeError(f"sluice {self.role} worker (task {self.task_index}, job "
                               f"{jenv.job_id}) ended with {why}; its output is above")
        return rc

    def checkpoint(self, *args, **kwargs):
        """Slurm's pre-timeout signal: stop the worker cleanly, then requeue this task."""
        child = getattr(self, "_child", None)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
        fresh = RoleTask(self.run_dir, self.role, self.task_index, self.gpus_per_task,
                         self.num_nodes, self.local, self.step)
        return submitit.helpers.DelayedSubmission(fresh)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_child", None)  # a Popen does not travel
        return state


def time_limit_min(limit: str) -> int:
    """Slurm time 'D-HH:MM:SS', 'HH:MM:SS' or 'MM' in minutes."""
    days = 0
    if "-" in limit:
        d, limit = limit.split("-", 1)
        days = int(d)
    parts = [int(p) for p in limit.split(":")]
    while len(parts) < 3:
        parts = [0] + parts if len(parts) == 2 else parts + [0, 0]
    h, m, s = parts[-3:]
    return days * 1440 + h * 60 + m + (1 if s else 0)


def log_folder(run_dir: Path, role: str) -> Path:
    return Path(run_dir) / "logs" / role


def job_name(run_dir: Path, role: str, one_shot: bool = False) -> str:
    """``sluice-<role>-<run tag>`` (``-redo`` for launch.resubmit's one-shot jobs): squeue
    tells the runs apart, and a restarted coordinator finds its run's jobs by name."""
    tag = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return f"sluice-{role}-{tag}" + ("-redo" if one_shot else "")


def make_executor(kind: str, run_dir: Path, cfg: SluiceConfig, plan: Plan, role: str,
                  one_shot: bool = False):
    rp = plan.roles[role]
    folder = log_folder(run_dir, role) / "%j"
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=time_limit_min(cfg.cluster.time_limit))
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    gpus_per_node = rp.gpus_per_node if role == "training" else rp.gpus_per_task
    params = dict(
        name=job_name(run_dir, role, one_shot),
        timeout_min=time_limit_min(cfg.cluster.time_limit),
        nodes=rp.num_nodes if role == "training" else 1,
        tasks_per_node=1,
        cpus_per_task=max(1, cfg.cluster.cpus_per_gpu * gpus_per_node),
        slurm_gres=f"gpu:{gpus_per_node}",
        slurm_signal_delay_s=120,
        slurm_setup=list(cfg.cluster.setup),
    )
    if cfg.cluster.partition:
        params["slurm_partition"] = cfg.cluster.partition
    if cfg.cluster.mem_per_gpu_gb:
        params["slurm_mem"] = f"{cfg.cluster.mem_per_gpu_gb * gpus_per_node}G"
    extra = {}
    if cfg.cluster.account:
        extra["account"] = cfg.cluster.account
    if cfg.cluster.qos:
        extra["qos"] = cfg.cluster.qos
    if plan.isolated:
        # Whole nodes: Slurm then cannot place two roles on one node.
        extra["exclusive"] = True
    if extra:
        params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def submit_tasks(kind: str, run_dir: Path, cfg: SluiceConfig, plan: Plan, role: str,
                 task_indices: List[int], step: Optional[int] = None) -> Dict[int, submitit.Job]:
    """Submit tasks of a role (an array on Slurm); returns task index -> job."""
    rp = plan.roles[role]
    ex = make_executor(kind, run_dir, cfg, plan, role, one_shot=step is not None)
    tasks = [RoleTask(str(run_dir), role, i, rp.gpus_per_task,
                      rp.num_nodes if role == "training" else 1, kind == "local", step)
             for i in task_indices]
    jobs: Dict[int, submitit.Job] = {}
    if kind == "local":
        gpus = [g for ids in rp.gpu_ids for g in ids]
        before = os.environ.get(JOB_NAME_ENV)
        os.environ[JOB_NAME_ENV] = job_name(run_dir, role, step is not None)  # copied by submitit
        try:
            for t in tasks:
                mine = gpus[t.task_index * rp.gpus_per_task:(t.task_index + 1) * rp.gpus_per_task]
                ex.update_parameters(gpus_per_node=len(mine), visible_gpus=mine)
                jobs[t.task_index] = ex.submit(t)
        finally:
            if before is None:
                os.environ.pop(JOB_NAME_ENV, None)
            else:
                os.environ[JOB_NAME_ENV] = before
        return jobs
    if len(tasks) > 1:
        ex.update_parameters(slurm_array_parallelism=len(tasks))
        with ex.batch():
            submitted = [ex.submit(t) for t in tasks]
        return {t.task_index: j for t, j in zip(tasks, submitted)}
    return {tasks[0].task_index: ex.submit(tasks[0])}


def reattach(kind: str, run_dir: Path, role: str, job_id: str) -> submitit.Job:
    """A job object for a job submitted by an earlier coordinator process."""
    folder = log_folder(run_dir, role) / "%j"
    if kind == "local":
        from submitit.local.local import LocalJob

        return LocalJob(folder=folder, job_id=job_id)  # no Popen: judged by its pid (job_state)
    return submitit.SlurmJob(folder=folder, job_id=job_id)


def live_jobs_named(kind: str, run_dir: Path, role: str) -> List[str]:
    """Ids of the live jobs named ``job_name(run_dir, role)`` (not one-shot redo jobs), as
    submitit spells them ("123", "123_4" for array tasks; a local job's controller pid)."""
    name = job_name(run_dir, role)
    if kind != "local":
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-n", name, "-o", "%i"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"squeue failed ({out.returncode}): {out.stderr.strip()}")
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    found = []
    want = f"{JOB_NAME_ENV}={name}".encode()
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
        if want in environ and _pid_alive(int(entry.name)):
            found.append(entry.name)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return "\nState:\tZ" not in status
    except FileNotFoundError:
        return False


def _is_local_controller(job) -> bool:
    """The pid of a re-attached local job is still its submitit controller (not a recycled pid
    now held by an unrelated process): its command line runs submitit's local controller on
    this role's log folder."""
    try:
        cmdline = Path(f"/proc/{int(job.job_id)}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError):
        return False
    role_logs = str(Path(job.paths.folder).parent).encode()
    return b"submitit.local._local" in cmdline and role_logs in cmdline


def _local_result(job) -> Optional[str]:
    path = job.paths.result_pickle
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            outcome = pickle.load(f)[0]
    except Exception:
        return "FAILED"
    return "COMPLETED" if outcome == "success" else "FAILED"


_last_sacct = [float("-inf")]


def job_state(kind: str, job) -> str:
    """Normalised state: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, VANISHED,
    or UNKNOWN (Slurm has no record of it yet)."""
    if kind == "local":
        proc = getattr(job, "_process", None)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return "RUNNING"
            return _local_result(job) or ("COMPLETED" if rc == 0 else "FAILED")
        if _pid_alive(int(job.job_id)) and _is_local_controller(job):
            return "RUNNING"
        return _local_result(job) or "VANISHED"
    now = time.monotonic()
    mode = "cache"
    if now - _last_sacct[0] >= SACCT_INTERVAL_S:
        mode, _last_sacct[0] = "force", now
    try:
        state = job.watcher.get_state(job.job_id, mode=mode)
    except Exception:
        return "UNKNOWN"
    word = (state or "UNKNOWN").split()[0].upper()
    return word


def _children(pid: int) -> List[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _process_tree(pid: int) -> List[int]:
    """pid and its descendants, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(_children(p))
    return out


def _signal_all(pids: List[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def cancel(kind: str, job, grace_s: float = 10.0) -> None:
    """Stop a job. Slurm: scancel (SIGTERM to every process of the job, SIGKILL after KillWait).
    Local: the same by hand over the job's process tree (controller, submitit task, worker):
    submitit's local controller forwards SIGTERM to the task, which ignores it, so signalling
    the controller alone would stop nothing."""
    if kind != "local":
        subprocess.run(["scancel", str(job.job_id)], capture_output=True)
        return
    pid = int(job.job_id)
    proc = getattr(job, "_process", None)
    if proc is not None:
        if proc.poll() is not None:
            return
    elif not (_pid_alive(pid) and _is_local_controller(job)):
        return
    tree = _process_tree(pid)
    _signal_all(tree[::-1], signal.SIGTERM)  # the worker first: it releases its claims
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_pid_alive(p) for p in tree):
        if proc is not None:
            proc.poll()  # reap the controller if it is our child
        time.sleep(0.1)
    _signal_all([p for p in tree if _pid_alive(p)], signal.SIGKILL)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def stderr_tail(job, lines: int = 15) -> str:
    for path in (job.paths.stderr, job.paths.stdout):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        if text.strip():
            return "\n".join(text.rstrip().splitlines()[-lines:])
    return "(no output)"


def wait_all(kind: str, jobs, timeout_s: float) -> None:
    """Wait for jobs to end by themselves (workers exit on STOP); cancel what is left."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if all(job_state(kind, j) not in LIVE_STATES for j in jobs):
            return
        time.sleep(0.5)
    for j in jobs:
        if job_state(kind, j) in LIVE_STATES:
            cancel(kind, j)

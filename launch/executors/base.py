"""What runs inside a job, and the interface every executor implements.

A job (`shared.partition.JobPlan`) holds whole plan nodes and runs one task per worker: a vLLM
engine, a teacher replica, or one node's torchrun of the trainer. Every task runs the same
picklable `UnitTask`; it finds its worker from its place in the job (node, task on the node),
binds it to its own GPUs (CUDA_VISIBLE_DEVICES) and starts the worker as a child process:

    python -m stages.generate RUN_DIR                          one engine (vLLM: TP in-process)
    python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=G -m stages.score RUN_DIR
    python -m torch.distributed.run --nnodes=N --node_rank=R --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:PORT --rdzv_id=sluice-JOB --nproc_per_node=G -m stages.train RUN_DIR

The coordinator never imports torch or vLLM: the child process does. A worker that fails
ends its whole job (the job is the unit that is resubmitted): srun --kill-on-bad-exit on
Slurm, the task stopping its siblings under the local executor. Slurm's pre-timeout signal
(USR2) and SIGTERM make every task stop its worker cleanly (SIGTERM to the stage processes:
claims released, the trainer checkpoints), record why in RUN_DIR/jobs/<job id>.json and end
normally; the coordinator then submits the job's replacement without counting a failure.

Executors (`local.LocalExecutor`, `slurm.SlurmExecutor`, `allocation.AllocationExecutor`:
the jobs as srun steps of one allocation) submit, watch, find and cancel jobs behind one
small interface (`Executor`); the coordinator only talks to that.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import submitit

from launch.processes import child_pids
from shared import jobenv
from shared.partition import JobPlan, WorkerPlan
from shared.pipeline import ROLE
from shared.rundir import RunDir
from shared.slurm_time import minutes

# Job states after which a job is gone for good (first word of sacct's state).
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE", "INTERRUPTED", "VANISHED", "ALLOCATION_ENDED"}
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
               "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}
# Seconds a worker gets to stop on SIGTERM (release its claims) before it is killed.
STOP_GRACE_S = 60.0
_PR_SET_PDEATHSIG = 1


class SchedulerError(RuntimeError):
    """The scheduler could not be asked (sacct/squeue failed): nothing is known about the
    jobs this round, and nothing may be concluded from that."""


def _worker_preexec() -> None:
    """preexec_fn of the worker.

    SIGKILL it when the task process dies (Linux), so a killed task (local cancel, a crashed
    submitit process) never leaves an orphan worker that goes on claiming and committing
    shards beside its replacement.

    Ignore SIGUSR2 in it and in everything it starts (torchrun's ranks, vLLM's engine
    processes inherit the disposition). Slurm sends the pre-timeout signal to every process
    of the job step, and a process without a handler dies of it at once. The task process
    alone handles it, by asking the worker to stop (SIGTERM)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def job_end_path(run_dir, job_id: str) -> Path:
    """RUN_DIR/jobs/<job id>.json: why a job's workers were told to stop, written by its
    tasks when the signal arrives: {"job_id", "job", "reason": "time_limit" (the pre-timeout
    signal) or "sigterm" (scancel, preemption), "time", "incarnation"}."""
    return RunDir(run_dir).job_record(job_id)


def rdzv_port(job_id: str) -> int:
    """The trainer's rendezvous port: distinct per job, as several runs may share a node."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


@dataclass(frozen=True)
class LaunchContext:
    """What a worker's command line depends on at run time: the job id and the trainer's
    rendezvous endpoint (its first node's address, a port of the job's own)."""

    job_id: str
    rdzv_host: str
    rdzv_port: str


def worker_command(w: WorkerPlan, run_dir: str, ctx: LaunchContext, step: Optional[int] = None,
                   python: str = sys.executable, synthetic: bool = False) -> List[str]:
    """The worker's command line (also what tests/golden pins for every recipe); `synthetic`
    (synthetic.enabled): the benchmarks' sleeping stand-in for the role, one process."""
    module = ROLE[w.role].module
    args = [run_dir] + ([] if step is None else ["--step", str(step)])
    if synthetic:
        return [python, "-m", SYNTHETIC_MODULE, *args, "--role", w.role]
    if not w.multiprocess:
        return [python, "-m", module, *args]
    if w.nnodes == 1:
        dist = ["--standalone", "--nnodes=1"]
    else:
        dist = [f"--nnodes={w.nnodes}", f"--node_rank={w.node_rank}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={ctx.rdzv_host}:{ctx.rdzv_port}",
                f"--rdzv_id=sluice-{ctx.job_id}"]
    return [python, "-m", "torch.distributed.run", *dist, f"--nproc_per_node={len(w.gpus)}",
            "-m", module, *args]




# The synthetic workers' module (synthetic.enabled: benchmarks and tests).
SYNTHETIC_MODULE = "bench.synthetic"


def run_command(cmd: List[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """A Slurm command's output; a command that hangs or is missing is a failed one (124, 127)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {e.timeout:.0f}s")
    except OSError as e:
        return subprocess.CompletedProcess(cmd, 127, "", str(e))


def hostnames(nodelist: str) -> List[str]:
    """`scontrol show hostnames`: a Slurm node list, expanded, in order."""
    out = run_command(["scontrol", "show", "hostnames", nodelist])
    if out.returncode != 0:
        raise SchedulerError(f"scontrol show hostnames {nodelist} failed: {out.stderr.strip()}")
    return out.stdout.split()


def step_first_node_addr() -> str:
    """The address of the first node of this job step (SLURM_STEP_NODELIST): its NodeAddr as
    Slurm knows it (what slurmd listens on), so no name lookup of the node name is needed."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    first = hostnames(nodes)[0]
    shown = run_command(["scontrol", "show", "node", "-o", first]).stdout
    for field_ in shown.split():
        if field_.startswith("NodeAddr="):
            return field_[len("NodeAddr="):]
    return first


def visible_devices(indices: Sequence[int], inherited: Optional[str]) -> str:
    """CUDA_VISIBLE_DEVICES of a worker: `indices` into the devices its job sees (`inherited`,
    the job's own CUDA_VISIBLE_DEVICES), or the indices themselves when the job sets none."""
    if not inherited:
        return ",".join(str(i) for i in indices)
    held = inherited.split(",")
    if max(indices, default=-1) >= len(held):
        raise RuntimeError(f"the job sees GPUs {inherited}, but its worker needs GPU indices "
                           f"{list(indices)}: the job holds fewer GPUs than the partition plan; "
                           "check cluster.gpus_per_node against the nodes")
    return ",".join(held[i] for i in indices)


@dataclass
class UnitTask:
    """Every task of a job runs this (picklable: submitit ships it to the nodes)."""

    run_dir: str
    unit: JobPlan
    local: bool
    step: Optional[int] = None
    """Process only this step, then exit (launch.resubmit on a finished run)."""
    synthetic: bool = False
    """Start the synthetic stand-in of each role (synthetic.enabled)."""
    in_allocation: bool = False
    """A job step of the run's allocation (launch.executor=allocation), started by srun from
    the coordinator's node rather than from the job's own first node."""
    _child: Optional[subprocess.Popen] = field(default=None, repr=False, compare=False)
    _stop_reason: Optional[str] = field(default=None, repr=False, compare=False)

    def job_devices(self) -> Optional[str]:
        """The GPUs this job holds, as CUDA_VISIBLE_DEVICES lists them (None: all of the node's):
        Slurm's binding, or for a local job those of the process that submitted it."""
        return os.environ.get(jobenv.VISIBLE_DEVICES if self.local else "CUDA_VISIBLE_DEVICES")

    def my_worker(self, node: int, local_rank: int) -> Optional[WorkerPlan]:
        """The worker of Slurm task (SLURM_NODEID, SLURM_LOCALID); the local executor runs all
        of a job's tasks on this machine, numbered through its nodes."""
        if self.local:
            return self.unit.workers[local_rank] if local_rank < len(self.unit.workers) else None
        return self.unit.slots().get((node, local_rank))

    def context(self, job_id: str) -> LaunchContext:
        port = str(rdzv_port(job_id))
        if self.local:
            return LaunchContext(job_id, "127.0.0.1", port)
        if self.in_allocation:
            # srun ran on the coordinator's node: the step's first node hosts the rendezvous.
            return LaunchContext(job_id, step_first_node_addr(), port)
        # srun ran on the batch host, the job's first node: its address needs no name lookup.
        host = os.environ.get("SLURM_LAUNCH_NODE_IPADDR")
        if not host:
            host = hostnames(os.environ.get("SLURM_JOB_NODELIST", ""))[0]
        return LaunchContext(job_id, host, port)

    def end_time(self) -> Optional[float]:
        """When this job reaches its time limit (epoch seconds), if it can be known: the
        trainer checkpoints ahead of the stop with it."""
        if self.local:
            timeout = os.environ.get("SUBMITIT_LOCAL_TIMEOUT_S")
            return time.time() + float(timeout) if timeout else None
        slurm_job = os.environ.get("SLURM_JOB_ID", "") if self.in_allocation else self._job_id
        try:
            out = subprocess.run(["squeue", "-h", "-j", slurm_job, "-o", "%e"], capture_output=True,
                                 text=True, timeout=60)
            return time.mktime(time.strptime(out.stdout.strip(), "%Y-%m-%dT%H:%M:%S"))
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return None

    def __call__(self) -> int:
        jenv = submitit.JobEnvironment()
        return self.run(str(jenv.job_id), jenv.node, jenv.local_rank, jenv.global_rank)

    def run(self, job_id: str, node: int, local_rank: int, global_rank: int) -> int:
        """Start this task's worker and wait for it: the task (`node`, `local_rank`) of job
        `job_id` (submitit's job, or the coordinator's name for an allocation's step)."""
        self._job_id = job_id
        w = self.my_worker(node, local_rank)
        if w is None:  # a spare task slot on a node with fewer workers than others
            print(f"[sluice {self.unit.key}] task {global_rank}: no worker here", flush=True)
            return 0
        env = dict(os.environ)
        env[jobenv.JOB_ID] = self._job_id
        env[jobenv.TASK_ID] = str(w.task)
        env[jobenv.ROLE] = w.role
        env[jobenv.JOB_KEY] = self.unit.key
        indices = list(w.gpus) if self.local else self.unit.gpu_positions(w)
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(indices, self.job_devices())
        if self.step is not None:
            env[jobenv.ONE_SHOT_STEP] = str(self.step)
        end = self.end_time()
        if end is not None:
            env[jobenv.JOB_END_TIME] = str(end)
        cmd = worker_command(w, self.run_dir, self.context(self._job_id), self.step,
                             synthetic=self.synthetic)
        print(f"[sluice {w.role} task {w.task} node_rank {w.node_rank}] "
              f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} {' '.join(cmd)}", flush=True)
        self._worker = w
        # Both signals ask the worker to stop cleanly: the pre-timeout signal (USR2; this
        # replaces submitit's requeue: the coordinator submits the job's replacement) and
        # SIGTERM (scancel, preemption, a failed sibling under the local executor; submitit
        # itself would ignore it).
        signal.signal(signal.SIGUSR2, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self._child = subprocess.Popen(cmd, env=env, preexec_fn=_worker_preexec)
        rc = self._child.wait()
        if self._stop_reason is not None:
            print(f"[sluice {w.role} task {w.task}] worker stopped on {self._stop_reason} "
                  f"(exit {rc})", flush=True)
            return 0
        if rc != 0:
            why = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            if self.local and len(self.unit.workers) > 1:
                # srun --kill-on-bad-exit does this on Slurm: the job ends, and is resubmitted whole.
                os.kill(os.getppid(), signal.SIGTERM)
            raise RuntimeError(f"sluice {w.role} worker (task {w.task}, job {job_id}) ended "
                               f"with {why}; its output is above")
        return rc

    def _on_signal(self, signum, frame) -> None:
        reason = "time_limit" if signum == signal.SIGUSR2 else "sigterm"
        if self._stop_reason is not None:
            return
        self._stop_reason = reason
        end = {"job_id": self._job_id, "job": self.unit.key, "reason": reason, "time": time.time(),
               "incarnation": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}
        try:
            path = job_end_path(self.run_dir, self._job_id)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(end))
            os.replace(tmp, path)
        except OSError as e:
            print(f"[sluice {self.unit.key}] cannot record the stop ({e})", file=sys.stderr, flush=True)
        self._stop_worker()

    def _stop_worker(self) -> None:
        """SIGTERM to the worker's stage processes: the worker itself, or torchrun's ranks (not
        torchrun: it would SIGKILL its ranks 30 s later, before a checkpoint is saved)."""
        child = self._child
        if child is None or child.poll() is not None:
            return
        targets = child_pids(child.pid) if self._worker.multiprocess else []
        for pid in targets or [child.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_child"] = None  # a Popen does not travel
        state["_stop_reason"] = None
        return state


def time_limit_min(limit: str) -> int:
    """Slurm time 'D-HH:MM:SS', 'HH:MM:SS', 'MM:SS' or 'MM' in whole minutes (rounded up)."""
    return minutes(limit)


def run_tag(run_dir) -> str:
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]


def job_name(run_dir, key: str, one_shot: bool = False) -> str:
    """``sluice-<job key>-<run tag>`` (``-redo`` for launch.resubmit's one-shot jobs): squeue
    tells the runs apart, and a restarted coordinator finds its run's jobs by name."""
    return f"sluice-{key}-{run_tag(run_dir)}" + ("-redo" if one_shot else "")


def key_of_job_name(run_dir, name: str) -> Optional[str]:
    """The job key in a job name of this run's (not a one-shot redo job), else None."""
    suffix = f"-{run_tag(run_dir)}"
    if name.startswith("sluice-") and name.endswith(suffix):
        return name[len("sluice-"):-len(suffix)]
    return None


def log_folder(run_dir, key: str) -> Path:
    return RunDir(run_dir).log_dir(key)


class Executor:
    """Submits, watches, finds and cancels the jobs of one run.

    Job objects are submitit jobs (`job.job_id`, `job.paths.stdout/stderr`)."""

    kind = "?"

    def __init__(self, run_dir, cfg, plan):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.plan = plan

    def units(self) -> List[JobPlan]:
        raise NotImplementedError

    def submit(self, unit: JobPlan, step: Optional[int] = None):
        """Submit one job; `step`: a one-shot job that only does that step."""
        raise NotImplementedError

    def reattach(self, key: str, job_id: str):
        """A job object for a job submitted by an earlier coordinator process."""
        raise NotImplementedError

    def state(self, job) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ..., VANISHED, or UNKNOWN
        (the scheduler has no record of it yet). Raises SchedulerError when it cannot tell."""
        raise NotImplementedError

    def started_at(self, job) -> Optional[float]:
        """When the job's current incarnation started (a requeued job starts again), if known."""
        return None

    def cancel(self, job, grace_s: float = 10.0) -> None:
        raise NotImplementedError

    def submit_problem(self, unit: JobPlan) -> Optional[str]:
        """Why `unit` cannot be submitted from this process, with the fix (None: it can)."""
        return None

    def failure_is_fatal(self, job, state: str) -> Optional[str]:
        """Why the run cannot go on after `job` ended in `state` (None: resubmit it)."""
        return None

    def live_jobs(self) -> Dict[str, str]:
        """Live jobs of this run (not one-shot redo jobs): job id -> job key."""
        raise NotImplementedError

    def wait_all(self, jobs, timeout_s: float) -> None:
        """Wait for jobs to end by themselves (workers exit on STOP); cancel what is left."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if all(self.state(j) not in LIVE_STATES for j in jobs):
                    return
            except SchedulerError:
                pass
            time.sleep(0.5)
        for j in jobs:
            try:
                live = self.state(j) in LIVE_STATES
            except SchedulerError:
                live = True
            if live:
                self.cancel(j)


def stderr_tail(job, lines: int = 15) -> str:
    for path in (job.paths.stderr, job.paths.stdout):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        if text.strip():
            return "\n".join(text.rstrip().splitlines()[-lines:])
    return "(no output)"


def units_by_key(units: Sequence[JobPlan]) -> Dict[str, JobPlan]:
    return {u.key: u for u in units}


def one_shot_unit(units: Sequence[JobPlan], role: str) -> JobPlan:
    """The job that redoes one step of `role` on a finished run: one engine or teacher
    replica (the trainer: all of its nodes), taken from the role's first job."""
    first = next(u for u in units if role in u.roles)
    return first.only(role, first_worker=role != "training")


__all__ = ["Executor", "FAILED_STATES", "LIVE_STATES", "LaunchContext",
           "SchedulerError", "UnitTask", "job_name", "key_of_job_name", "log_folder",
           "one_shot_unit", "stderr_tail", "time_limit_min", "units_by_key", "visible_devices",
           "worker_command"]

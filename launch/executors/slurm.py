"""The Slurm executor: one sbatch job per group of whole nodes, through submitit.

What each job asks for (the exact scripts of every recipe are pinned in tests/golden/):

    #SBATCH --nodes=<its plan nodes>   --ntasks-per-node=<workers per node>
    #SBATCH --gres=gpu[:type]:<GPUs used per node>   --cpus-per-task=<cpus_per_gpu x GPUs / tasks>
    #SBATCH --exclusive --mem=0        (cluster.exclusive; --mem=<mem_per_gpu_gb x GPUs>G if set)
    #SBATCH --signal=USR2@<cluster.signal_delay_s> --time=<cluster.time_limit>, partition/account/qos/reservation/
            constraint/exclude/nodelist/extra options from cluster.*
    srun --cpus-per-task=<same> --kill-on-bad-exit=1 python -m submitit.core._submit ...

`--cpus-per-task` is passed to srun too: Slurm 22.05-23.02 does not let srun inherit it. Jobs
are submitted with the submitting process's SLURM_*/SBATCH_*/SALLOC_*/SRUN_* variables removed
(SLURM_CONF kept): a coordinator that runs inside a job or an salloc would otherwise pass its own
allocation's settings (SLURM_MEM_PER_CPU, ...) to the role jobs, whose srun then fails.

Job states come from one `sacct` call for all watched jobs at most every SACCT_INTERVAL_S;
when sacct fails (slurmdbd down, accounting disabled) from `squeue` (a job it does not list has
ended: VANISHED); when both fail, `state` raises SchedulerError and nothing is concluded.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from launch.executors.base import (Executor, LaunchContext, SchedulerError, UnitTask, job_name,
                                   key_of_job_name, log_folder, run_command, time_limit_min,
                                   worker_command)
from shared import sbatch
from shared.partition import JobPlan, job_units

# The coordinator needs little time to stop: it saves its state and submits its successor.
COORDINATOR_SIGNAL_DELAY_S = 90
# One sacct call (covering every job watched) at most this often.
SACCT_INTERVAL_S = 2.0
_INHERITED_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")
_KEPT = {"SLURM_CONF"}  # which cluster to talk to


def inherited_slurm_vars(environ=None) -> List[str]:
    """Variables a submitting process inherited from its own job or allocation (or a user's
    SBATCH_* defaults), which must not reach the jobs it submits."""
    environ = os.environ if environ is None else environ
    return sorted(k for k in environ if k.startswith(_INHERITED_PREFIXES) and k not in _KEPT)


def sbatch_command(*args: str) -> List[str]:
    """sbatch ARGS run without the inherited Slurm variables."""
    unset = [arg for name in inherited_slurm_vars() for arg in ("-u", name)]
    return ["env", *unset, "sbatch", *args]


class _Sbatch(submitit.SlurmExecutor):
    """submitit's Slurm executor, submitting with the inherited Slurm variables removed."""

    def _make_submission_command(self, submission_file_path: Path) -> List[str]:
        return sbatch_command(str(submission_file_path))


def _common(cfg, name: str, minutes: int, cpus: int, extra_args: List[str], extra_key: str,
            partition, account, qos, signal_delay_s: int) -> dict:
    params = dict(job_name=name, time=minutes, cpus_per_task=cpus, signal_delay_s=signal_delay_s,
                  srun_args=[f"--cpus-per-task={cpus}"], wckey=None)
    if cfg.cluster.setup:
        params["setup"] = list(cfg.cluster.setup)
    for k, v in (("partition", partition), ("account", account), ("qos", qos)):
        if v:
            params[k] = v
    extra = sbatch.parse(extra_key, list(extra_args))
    if extra:
        params["additional_parameters"] = extra
    return params


def role_job_params(cfg, unit: JobPlan, name: str) -> dict:
    """submitit (sbatch) parameters of one role job."""
    cl = cfg.cluster
    gpus = unit.gpus_per_node
    cpus = max(1, cl.cpus_per_gpu * gpus // unit.tasks_per_node)
    params = _common(cfg, name, time_limit_min(cl.time_limit), cpus, cl.sbatch_args,
                     "cluster.sbatch_args", cl.partition, cl.account, cl.qos, cl.signal_delay_s)
    params.update(nodes=len(unit.nodes), ntasks_per_node=unit.tasks_per_node,
                  gres=f"gpu:{cl.gpu_type}:{gpus}" if cl.gpu_type else f"gpu:{gpus}")
    params["srun_args"].append("--kill-on-bad-exit=1")
    if cl.exclusive:
        params["exclusive"] = True
    if cl.mem_per_gpu_gb:
        params["mem"] = f"{cl.mem_per_gpu_gb * gpus}G"
    elif cl.exclusive:
        params["mem"] = "0"  # all of each node's memory
    for k in ("constraint", "exclude", "nodelist"):
        if getattr(cl, k):
            params[k] = getattr(cl, k)
    if cl.reservation:
        params.setdefault("additional_parameters", {})["reservation"] = cl.reservation
    return params


def coordinator_params(cfg, name: str = "sluice-coordinator") -> dict:
    """submitit (sbatch) parameters of the coordinator job (cluster.coordinator.*)."""
    co = cfg.cluster.coordinator
    params = _common(cfg, name, time_limit_min(co.time_limit), co.cpus, co.sbatch_args,
                     "cluster.coordinator.sbatch_args", co.partition,
                     co.account or cfg.cluster.account, co.qos, COORDINATOR_SIGNAL_DELAY_S)
    params.update(nodes=1, ntasks_per_node=1)
    if co.mem_gb:
        params["mem"] = f"{co.mem_gb}G"
    return params


def submitit_command(folder, python: str = sys.executable) -> str:
    """The command submitit's sbatch script runs (SlurmExecutor._submitit_command_str)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(params: dict, folder, python: str = sys.executable) -> str:
    """The sbatch script submitit writes for `params` (the same function it submits with)."""
    return _make_sbatch_string(command=submitit_command(folder, python), folder=folder, **params)


def render_run(cfg, plan, run_dir: str = "/RUN_DIR", python: str = "PYTHON") -> str:
    """Everything the Slurm executor submits for a run, as text: the coordinator's sbatch
    script, then per job its sbatch script and, per task, the worker's GPUs (indices into the
    job's CUDA_VISIBLE_DEVICES on its node) and command line. launch.dry_run prints it;
    tests/golden pins it for every recipe."""
    ctx = LaunchContext("$SLURM_JOB_ID", "$SLURM_LAUNCH_NODE_IPADDR", "$((20000 + SLURM_JOB_ID % 20000))")
    out = [f"# what the Slurm executor submits: {len(plan_units := job_units(plan, True))} role "
           f"job(s) on {sum(len(u.nodes) for u in plan_units)} node(s) (cluster.num_nodes="
           f"{plan.num_nodes}), and the coordinator",
           "", "## coordinator", "",
           render_sbatch(coordinator_params(cfg, f"sluice-coordinator-<run tag>"),
                         f"{run_dir}/logs/coordinator/%j", python).rstrip()]
    for unit in plan_units:
        out += ["", f"## job {unit.key}: roles {', '.join(unit.roles)}; plan nodes "
                f"{list(unit.nodes)}", "",
                render_sbatch(role_job_params(cfg, unit, f"sluice-{unit.key}-<run tag>"),
                              f"{run_dir}/logs/{unit.key}/%j", python).rstrip(), ""]
        for (node, local), w in sorted(unit.slots().items()):
            cmd = " ".join(worker_command(w, run_dir, ctx, python=python))
            out.append(f"# task node {node} local {local}: {w.role} {w.task}, GPUs "
                       f"{unit.gpu_positions(w)} of the job's on its node\n{cmd}")
    return "\n".join(out) + "\n"


def submit_coordinator(cfg, run_dir: Path, fn, *args, dependency: Optional[str] = None):
    """Submit `fn(*args)` as the run's coordinator job (after `dependency`, e.g.
    "afterany:123"); returns the submitit job."""
    folder = log_folder(run_dir, "coordinator") / "%j"
    ex = _Sbatch(folder=folder)
    params = coordinator_params(cfg, job_name(run_dir, "coordinator"))
    if dependency:
        params["dependency"] = dependency
    ex.update_parameters(**params)
    return ex.submit(fn, *args)


def _run(cmd: List[str]) -> subprocess.CompletedProcess:
    return run_command(cmd, timeout=120)


class SlurmExecutor(Executor):
    kind = "slurm"

    def __init__(self, run_dir, cfg, plan):
        super().__init__(run_dir, cfg, plan)
        self._watched: set = set()
        self._states: Dict[str, str] = {}
        self._starts: Dict[str, float] = {}
        self._checked = float("-inf")

    def units(self) -> List[JobPlan]:
        return job_units(self.plan, merge_shared_nodes=True)

    def submit(self, unit: JobPlan, step: Optional[int] = None):
        ex = _Sbatch(folder=log_folder(self.run_dir, unit.key) / "%j")
        ex.update_parameters(**role_job_params(self.cfg, unit,
                                               job_name(self.run_dir, unit.key, step is not None)))
        job = ex.submit(UnitTask(str(self.run_dir), unit, local=False, step=step,
                                 synthetic=self.cfg.synthetic.enabled))
        self._watched.add(str(job.job_id))
        self._checked = float("-inf")
        return job

    def reattach(self, key: str, job_id: str):
        self._watched.add(str(job_id))
        return submitit.SlurmJob(folder=log_folder(self.run_dir, key) / "%j", job_id=str(job_id))

    def _sacct(self, ids: List[str]) -> Tuple[Optional[Dict[str, str]], str]:
        out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start", "-j", ",".join(sorted(ids))])
        if out.returncode != 0:
            return None, out.stderr.strip() or f"exit status {out.returncode}"
        states = {}
        for line in out.stdout.splitlines():
            fields = line.split("|")
            if len(fields) < 3 or not fields[0] or not fields[1]:
                continue
            job = fields[0].strip()
            states[job] = fields[1].split()[0].upper()  # "CANCELLED by 0" -> CANCELLED
            try:
                self._starts[job] = time.mktime(time.strptime(fields[2].strip(), "%Y-%m-%dT%H:%M:%S"))
            except ValueError:  # "Unknown", "None": not started (again) yet
                self._starts.pop(job, None)
        return states, ""

    def _squeue(self, ids: List[str]) -> Tuple[Optional[Dict[str, str]], str]:
        out = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T"])
        if out.returncode != 0:
            return None, out.stderr.strip() or f"exit status {out.returncode}"
        listed = dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)
        return {i: listed.get(i, "VANISHED") for i in ids}, ""

    def state(self, job) -> str:
        job_id = str(job.job_id)
        self._watched.add(job_id)
        now = time.monotonic()
        if now - self._checked >= SACCT_INTERVAL_S or job_id not in self._states:
            ids = sorted(self._watched)
            states, why = self._sacct(ids)
            if states is None:
                states, why2 = self._squeue(ids)
                if states is None:
                    raise SchedulerError(f"sacct failed ({why}) and squeue failed ({why2})")
            self._states = states
            self._checked = now
        return self._states.get(job_id, "UNKNOWN")

    def started_at(self, job) -> Optional[float]:
        return self._starts.get(str(job.job_id))

    def cancel(self, job, grace_s: float = 10.0) -> None:
        """scancel: SIGTERM to every process of the job, SIGKILL after the site's KillWait."""
        out = _run(["scancel", str(job.job_id)])
        if out.returncode != 0:
            print(f"sluice: scancel {job.job_id} failed: {out.stderr.strip()}", file=sys.stderr)
        self._checked = float("-inf")

    def live_jobs(self) -> Dict[str, str]:
        out = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%j"])
        if out.returncode != 0:
            raise SchedulerError(f"squeue failed: {out.stderr.strip()}")
        found = {}
        for line in out.stdout.splitlines():
            job_id, _, name = line.strip().partition("|")
            key = key_of_job_name(self.run_dir, name)
            if key is not None and key != "coordinator":
                found[job_id] = key
        return found


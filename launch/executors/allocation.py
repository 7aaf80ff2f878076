"""The allocation executor: a whole run inside one Slurm allocation (launch.executor=allocation).

    python -m launch.run conf=X launch.executor=allocation         # login node: one sbatch -N<n>
    sbatch -N3 --gres=gpu:4 slurm/sluice.sbatch conf=X key=value   # the same, by hand
    salloc -N3 --gres=gpu:4 ...; python -m launch.run conf=X launch.executor=allocation

The coordinator runs inside the allocation (its batch step, or the salloc shell) and starts
each job of the partition plan (`job_units(plan, merge_shared_nodes=True)`, the same jobs the
Slurm executor submits) as a job step on that job's own nodes:

    srun --nodes=N --nodelist=<its hosts> --ntasks=N*T --ntasks-per-node=T --exact
         --cpus-per-task=C --gres=gpu:G --mem=0 --kill-on-bad-exit=1
         --job-name=sluice-<key>-<run tag>.<incarnation>.<n>
         PYTHON -u -m launch.executors.allocation task RUN_DIR --job-key KEY --job-id ID

Plan node i is the allocation's i-th host (`scontrol show hostnames $SLURM_JOB_NODELIST`), so
the roles' node sets are disjoint by construction; the allocation is checked against the plan
(node count, GPUs per node) before anything starts, and refused (exit 2) with the fix. Every
task runs the same `UnitTask` as under the other executors (its GPUs: the step's
CUDA_VISIBLE_DEVICES; a multi-node trainer's rendezvous: the step's first node).

A step's id for Sluice (claims, worker records, state.json) is
`<allocation>.<incarnation>.<key>.<n>`, assigned before srun runs, and the step's name carries
it, so a restarted coordinator finds its live steps with `squeue -s`. A step that fails is
started again as a new step (same retry accounting as the other executors); a node that fails
stops the run cleanly (resumable in a new allocation). On the allocation's pre-timeout signal
(`--signal=B:USR2@cluster.signal_delay_s`) the coordinator stops its steps as the other
executors stop their jobs (`stop_steps`: the trainer checkpoints); the batch step that hosts
it (`python -m launch.host allocation`) then submits the allocation's successor or requeues it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

from launch.executors.base import (Executor, LaunchContext, SchedulerError, UnitTask, hostnames,
                                   job_name, log_folder, one_shot_unit, run_command, run_tag,
                                   time_limit_min, units_by_key, worker_command)
from launch.executors.slurm import sbatch_command
from shared import sbatch
from shared.errors import UserError
from shared.files import read_json
from shared.partition import JobPlan, Plan, job_units
from shared.rundir import RunDir
from shared.worker import load_run_config

KIND = "allocation"
# A step of an allocation (or an incarnation of it) that is over: the scheduler's doing (a
# time limit, a requeue, a preemption), never a failure of the role.
ALLOCATION_ENDED = "ALLOCATION_ENDED"
# Where launch.run writes the allocation's batch script (the successor resubmits it).
SCRIPT = "allocation.sbatch"
# What the batch script runs: the coordinator, hosted as the allocation's batch step.
HOST_MODULE = "launch.host"
# squeue is asked about the steps at most this often.
SQUEUE_INTERVAL_S = 2.0
# What srun writes when a node of the step failed or cannot run it.
_NODE_FAILURE = re.compile(r"Node failure on|NODE_FAIL|Task launch for \S+ failed on node|"
                           r"Required node not available|Requested node configuration is not available")


def allocation_gpus_per_node(job_id: str, environ=None) -> Optional[int]:
    """GPUs the allocation holds on each of its nodes (the fewest of any node), if known:
    SLURM_GPUS_ON_NODE in a batch step, else the GRES of `scontrol show job -d`."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(environ["SLURM_GPUS_ON_NODE"])
    out = run_command(["scontrol", "show", "job", "-d", job_id])
    counts = [int(m) for m in re.findall(r"GRES=gpu(?::[^:(\s]+)?:(\d+)", out.stdout)]
    return min(counts) if counts else None


def allocation_problem(plan, units: Sequence[JobPlan], hosts: Sequence[str], nodelist: str,
                       gpus_per_node: Optional[int]) -> Optional[str]:
    """Why an allocation of `hosts` (with `gpus_per_node` GPUs each, None: unknown) cannot run
    the plan, with the fix; None when it can."""
    need = plan.num_nodes
    roles = ", ".join(f"{r} {p.num_nodes}" for r, p in plan.roles.items())
    if len(hosts) != need:
        return (f"the allocation holds {len(hosts)} node(s) ({nodelist}), but the partition plan "
                f"places the roles on cluster.num_nodes={need} (nodes per role: {roles}). Fix: "
                f"submit with sbatch -N{need} (or salloc -N{need}), or fit the recipe to "
                f"{len(hosts)} node(s) with cluster.num_nodes and "
                "distillation.resource_isolation.roles")
    used = max(u.gpus_per_node for u in units)
    if gpus_per_node is not None and gpus_per_node < used:
        return (f"the allocation holds {gpus_per_node} GPU(s) per node, but the partition plan "
                f"uses {used} on a node (cluster.gpus_per_node={plan.gpus_per_node}). Fix: "
                f"submit with --gres=gpu:{used} (or --gpus-per-node={used}), or lower "
                "cluster.gpus_per_node and the roles' gpus_per_node")
    return None


class Allocation:
    """The Slurm allocation this process runs in (SLURM_JOB_ID), or None outside one."""

    def __init__(self, job_id: str, nodelist: str, incarnation: int = 0):
        self.job_id = job_id
        self.nodelist = nodelist
        self.incarnation = incarnation
        self._hosts: Optional[List[str]] = None

    @classmethod
    def current(cls, environ=None) -> Optional["Allocation"]:
        environ = os.environ if environ is None else environ
        job_id = environ.get("SLURM_JOB_ID")
        if not job_id:
            return None
        return cls(job_id, environ.get("SLURM_JOB_NODELIST", ""),
                   int(environ.get("SLURM_RESTART_COUNT") or 0))

    @property
    def hosts(self) -> List[str]:
        if self._hosts is None:
            self._hosts = hostnames(self.nodelist)
        return self._hosts

    def check(self, plan, units: Sequence[JobPlan], environ=None) -> None:
        """Raise UserError (exit 2) unless this allocation can run the plan."""
        problem = allocation_problem(plan, units, self.hosts, self.nodelist,
                                     allocation_gpus_per_node(self.job_id, environ))
        if problem:
            raise UserError(f"Slurm job {self.job_id} cannot run this run: {problem}.")


def require_allocation(what: str) -> Allocation:
    alloc = Allocation.current()
    if alloc is None:
        raise UserError(f"{what}: launch.executor=allocation starts job steps inside a Slurm "
                        "allocation, and this process runs in none (SLURM_JOB_ID is not set). "
                        "Fix: run it inside the run's allocation (salloc, or the batch job), or "
                        "resume the run from a login node with python -m launch.run "
                        "launch.run_dir=RUN_DIR, which submits the allocation.")
    return alloc


# ------------------------------------------------------------------------------- steps


def step_job_id(alloc: str, incarnation: int, key: str, n: int) -> str:
    return f"{alloc}.{incarnation}.{key}.{n}"


def parse_step_job_id(job_id: str):
    """(allocation, incarnation, key, n) of a step's job id."""
    alloc, incarnation, rest = str(job_id).split(".", 2)
    key, n = rest.rsplit(".", 1)
    return alloc, int(incarnation), key, int(n)


def step_name(run_dir, key: str, incarnation: int, n: int, one_shot: bool = False) -> str:
    return f"{job_name(run_dir, key, one_shot)}.{incarnation}.{n}"


def srun_command(cfg, unit: JobPlan, hosts: Sequence[str], name: str, run_dir: str, job_id: str,
                 redo_role: Optional[str] = None, step: Optional[int] = None,
                 python: str = sys.executable) -> List[str]:
    """The srun that starts job `unit` as a step on `hosts` (its own nodes of the allocation)."""
    cl = cfg.cluster
    gpus = unit.gpus_per_node
    cpus = max(1, cl.cpus_per_gpu * gpus // unit.tasks_per_node)
    gres = f"gpu:{cl.gpu_type}:{gpus}" if cl.gpu_type else f"gpu:{gpus}"
    cmd = ["srun", f"--nodes={len(unit.nodes)}", f"--nodelist={','.join(hosts)}",
           f"--ntasks={len(unit.nodes) * unit.tasks_per_node}",
           f"--ntasks-per-node={unit.tasks_per_node}", "--exact", f"--cpus-per-task={cpus}",
           f"--gres={gres}", "--mem=0", "--kill-on-bad-exit=1", f"--job-name={name}",
           python, "-u", "-m", __name__, "task", str(run_dir), "--job-key", unit.key,
           "--job-id", job_id]
    if redo_role is not None:
        cmd += ["--redo", redo_role]
    if step is not None:
        cmd += ["--step", str(step)]
    return cmd


def node_failure(text: str) -> Optional[str]:
    """srun's report of a failed node in its output (the line), if any."""
    return next((line.strip() for line in text.splitlines() if _NODE_FAILURE.search(line)), None)


class StepJob:
    """One job step of the allocation, as the coordinator watches it (the executors' job
    objects: `job_id`, `paths.stdout/stderr`)."""

    def __init__(self, job_id: str, key: str, folder: Path, proc: Optional[subprocess.Popen] = None,
                 started: Optional[float] = None):
        self.job_id = job_id
        self.key = key
        self.folder = Path(folder)
        self.proc = proc
        self.started = started
        self.paths = SimpleNamespace(folder=self.folder, stdout=self.folder / "stdout",
                                     stderr=self.folder / "stderr")

    @property
    def alloc(self) -> str:
        return parse_step_job_id(self.job_id)[0]

    @property
    def incarnation(self) -> int:
        return parse_step_job_id(self.job_id)[1]

    def __repr__(self) -> str:
        return f"StepJob({self.job_id})"


class AllocationExecutor(Executor):
    kind = KIND

    def __init__(self, run_dir, cfg, plan, allocation: Optional[Allocation] = None):
        super().__init__(run_dir, cfg, plan)
        self.allocation = allocation if allocation is not None else Allocation.current()
        self._steps: Dict[str, Dict[str, str]] = {}
        """allocation id -> {Sluice job id: Slurm step id} of its live steps of this run."""
        self._steps_at: Dict[str, float] = {}
        self._redo: set = set()
        """Job ids of one-shot steps (launch.resubmit): never the run's own jobs."""

    def units(self) -> List[JobPlan]:
        return job_units(self.plan, merge_shared_nodes=True)

    def check(self) -> None:
        require_allocation("the coordinator").check(self.plan, self.units())

    def submit_problem(self, unit: JobPlan) -> Optional[str]:
        gpus = self.cfg.cluster.gpus_per_node
        how = (f"run this command inside an allocation of the run's shape: salloc "
               f"-N{self.plan.num_nodes} --gres=gpu:{gpus} <same command> (the step runs on its "
               f"plan nodes {list(unit.nodes)}), or resume the run with python -m launch.run "
               f"launch.run_dir={self.run_dir}, whose coordinator restarts every role")
        a = self.allocation
        if a is None:
            return (f"launch.executor=allocation starts job steps only inside a Slurm allocation; "
                    f"this process runs in none. Fix: {how}")
        if len(a.hosts) <= max(unit.nodes):
            return (f"allocation {a.job_id} holds {len(a.hosts)} node(s), and the {unit.key} step "
                    f"runs on plan node {max(unit.nodes)}. Fix: {how}")
        return None

    def hosts_of(self, unit: JobPlan) -> List[str]:
        hosts = require_allocation("starting a job step").hosts
        return [hosts[n] for n in unit.nodes]

    def _next_serial(self, key: str) -> int:
        a = self.allocation
        prefix = f"{a.job_id}.{a.incarnation}.{key}."
        folder = log_folder(self.run_dir, key)
        taken = [int(p.name[len(prefix):]) for p in folder.glob(prefix + "*")
                 if p.name[len(prefix):].isdigit()] if folder.exists() else []
        return max(taken, default=0) + 1

    def submit(self, unit: JobPlan, step: Optional[int] = None):
        problem = self.submit_problem(unit)
        if problem:
            raise UserError(f"cannot start the {unit.key} job step: {problem}")
        alloc = self.allocation
        n = self._next_serial(unit.key)
        job_id = step_job_id(alloc.job_id, alloc.incarnation, unit.key, n)
        folder = log_folder(self.run_dir, unit.key) / job_id
        folder.mkdir(parents=True, exist_ok=True)
        one_shot = step is not None
        cmd = srun_command(self.cfg, unit, self.hosts_of(unit),
                           step_name(self.run_dir, unit.key, alloc.incarnation, n, one_shot),
                           str(self.run_dir), job_id,
                           redo_role=unit.roles[0] if one_shot else None, step=step)
        (folder / "command").write_text(shlex.join(cmd) + "\n")
        with open(folder / "stdout", "ab") as out, open(folder / "stderr", "ab") as err:
            # Its own session: a Ctrl-C in an salloc shell reaches the coordinator only.
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self._steps_at.pop(alloc.job_id, None)
        return StepJob(job_id, unit.key, folder, proc, time.time())

    def reattach(self, key: str, job_id: str):
        return StepJob(str(job_id), key, log_folder(self.run_dir, key) / str(job_id))

    # -------------------------------------------------------------------- squeue

    def live_steps(self, alloc: str, fresh: bool = False) -> Dict[str, str]:
        """{Sluice job id: Slurm step id} of this run's live steps in allocation `alloc`."""
        now = time.monotonic()
        if not fresh and now - self._steps_at.get(alloc, float("-inf")) < SQUEUE_INTERVAL_S:
            return self._steps[alloc]
        out = run_command(["squeue", "-h", "-s", "-j", alloc, "-o", "%i|%j"])
        if out.returncode != 0:
            if "Invalid job id" in out.stderr:  # the allocation is gone
                out = subprocess.CompletedProcess(out.args, 0, "", "")
            else:
                raise SchedulerError(f"squeue -s -j {alloc} failed: {out.stderr.strip()}")
        found: Dict[str, str] = {}
        tag = f"-{run_tag(self.run_dir)}"
        for line in out.stdout.splitlines():
            step_id, _, name = line.strip().partition("|")
            base, _, rest = name.partition(f"{tag}")
            parts = rest.split(".")
            if not name.startswith("sluice-") or len(parts) != 3 or parts[0] not in ("", "-redo"):
                continue
            key = base[len("sluice-"):]
            job_id = step_job_id(alloc, int(parts[1]), key, int(parts[2]))
            found[job_id] = step_id
            if parts[0] == "-redo":
                self._redo.add(job_id)
        self._steps[alloc], self._steps_at[alloc] = found, now
        return found

    def _step_id(self, job: StepJob, fresh: bool = False) -> Optional[str]:
        """Its Slurm step id while it runs; None also when squeue cannot be asked (a cancel
        then falls back on its srun, as for a step not created yet)."""
        try:
            return self.live_steps(job.alloc, fresh).get(job.job_id)
        except SchedulerError:
            return None

    # -------------------------------------------------------------------- the interface

    def state(self, job) -> str:
        if job.proc is not None:
            rc = job.proc.poll()
            if rc is None:
                return "RUNNING"
            try:
                said = Path(job.paths.stderr).read_text(errors="replace")
            except OSError:
                said = ""
            if node_failure(said):  # srun itself may exit 0 after "Node failure on <node>"
                return "NODE_FAIL"
            return "COMPLETED" if rc == 0 else "FAILED"
        # Started by an earlier coordinator process (SchedulerError: squeue cannot say).
        if job.job_id in self.live_steps(job.alloc):
            return "RUNNING"
        a = self.allocation
        if a is not None and (job.alloc, job.incarnation) == (a.job_id, a.incarnation):
            return "VANISHED"  # ended in this allocation while no coordinator watched it
        return ALLOCATION_ENDED

    def started_at(self, job) -> Optional[float]:
        return job.started

    def failure_is_fatal(self, job, state: str) -> Optional[str]:
        """Why the run cannot go on in this allocation after `job` ended in `state` (a node
        failed: no new step can use it), else None."""
        if state != "NODE_FAIL":
            return None
        try:
            said = node_failure(Path(job.paths.stderr).read_text(errors="replace")) or state
        except OSError:
            said = state
        alloc = self.allocation.job_id if self.allocation else "?"
        return (f"a node of allocation {alloc} failed under job step {job.job_id} ({job.key}): "
                f"{said}. Its nodes cannot be replaced inside this allocation: the run stops "
                "here, resumable. Fix: resume it in a new allocation with python -m launch.run "
                f"launch.run_dir={self.run_dir} (add cluster.exclude=<the node> if it stays bad)")

    def signal_step(self, job, sig: int) -> bool:
        """Send `sig` to every process of the step; False when it is not running."""
        if job.proc is not None and job.proc.poll() is None and sig == signal.SIGUSR2:
            job.proc.send_signal(sig)  # srun forwards it to every task of the step
            return True
        step = self._step_id(job, fresh=True)
        if step is None:
            return False
        run_command(["scancel", f"--signal={signal.Signals(sig).name[3:]}", step])
        return True

    def cancel(self, job, grace_s: float = 10.0) -> None:
        """scancel of the step: SIGTERM to its processes (the tasks record why, the workers
        release their claims), SIGKILL after the site's KillWait; a step srun has not created
        yet is withdrawn by killing its srun."""
        step = self._step_id(job, fresh=True)
        if step is not None:
            out = run_command(["scancel", step])
            if out.returncode != 0:
                print(f"sluice: scancel {step} failed: {out.stderr.strip()}", file=sys.stderr)
        elif job.proc is not None and job.proc.poll() is None:
            job.proc.kill()
        if job.proc is not None:
            try:
                job.proc.wait(timeout=grace_s + 30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
        self._steps_at.clear()

    def stop_steps(self, jobs, timeout_s: float) -> None:
        """The pre-timeout stop: USR2 to every step (as Slurm signals the role jobs of the
        Slurm executor: the trainer checkpoints, claims are released, each task records
        why), then wait up to `timeout_s` for them to end, and cancel what is left."""
        for job in jobs:
            self.signal_step(job, signal.SIGUSR2)
        self.wait_all(jobs, timeout_s)

    def live_jobs(self) -> Dict[str, str]:
        a = self.allocation
        if a is None:
            return {}
        out = {}
        for job_id, _ in self.live_steps(a.job_id, fresh=True).items():
            alloc, incarnation, key, _n = parse_step_job_id(job_id)
            if incarnation == a.incarnation and job_id not in self._redo:
                out[job_id] = key
        return out


# ------------------------------------------------------------------------ the batch script


def script_path(run_dir) -> Path:
    return RunDir(run_dir).coordinator_dir / SCRIPT


def render_script(cfg, plan, run_dir: str, python: str = sys.executable,
                  workdir: Optional[str] = None) -> str:
    """The batch script of a run's allocation (written to RUN_DIR/coordinator/allocation.sbatch,
    submitted by launch.run, resubmitted by each allocation for its successor)."""
    cl = cfg.cluster
    gpus = cl.gpus_per_node
    lines = ["#!/bin/bash",
             f"# Sluice: run {run_dir} inside one allocation (launch.executor=allocation).",
             "# The coordinator runs here and starts each role's job step on its own nodes;",
             "# before the time limit it stops them and submits this script again (afterany).",
             f"#SBATCH --job-name={job_name(run_dir, 'allocation')}",
             f"#SBATCH --nodes={plan.num_nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={max(1, cl.cpus_per_gpu * gpus)}",
             f"#SBATCH --gres={f'gpu:{cl.gpu_type}:{gpus}' if cl.gpu_type else f'gpu:{gpus}'}"]
    if cl.exclusive:
        lines.append("#SBATCH --exclusive")
    if cl.mem_per_gpu_gb:
        lines.append(f"#SBATCH --mem={cl.mem_per_gpu_gb * gpus}G")
    elif cl.exclusive:
        lines.append("#SBATCH --mem=0")
    lines += [f"#SBATCH --time={time_limit_min(cl.time_limit)}",
              f"#SBATCH --signal=B:USR2@{cl.signal_delay_s}",
              "#SBATCH --requeue",
              # A failed node does not end the allocation: the coordinator stops the run cleanly
              # and names the node (a new allocation resumes it).
              "#SBATCH --no-kill",
              "#SBATCH --open-mode=append",
              f"#SBATCH --output={run_dir}/logs/allocation/%j.out",
              f"#SBATCH --error={run_dir}/logs/allocation/%j.out"]
    for k in ("partition", "account", "qos", "reservation", "constraint", "exclude", "nodelist"):
        if getattr(cl, k):
            lines.append(f"#SBATCH --{k}={getattr(cl, k)}")
    for k, v in sbatch.parse("cluster.sbatch_args", list(cl.sbatch_args)).items():
        lines.append(f"#SBATCH --{k.replace('_', '-')}" + ("" if v is True else f"={v}"))
    lines += list(cl.setup)
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)}")
    lines.append(f"exec {python} -u -m {HOST_MODULE} allocation {run_dir} "
                 f"--resubmit {run_dir}/coordinator/{SCRIPT}")
    return "\n".join(lines) + "\n"


def render_allocation(cfg, plan, run_dir: str = "/RUN_DIR", python: str = "PYTHON") -> str:
    """Everything an allocation run starts, as text: the batch script, then per job step its
    srun (hosts: plan node i is the allocation's i-th host) and per task the worker's command.
    tests/golden/allocation/ pins it for every recipe."""
    units = job_units(plan, True)
    hosts = [f"HOST{i}" for i in range(plan.num_nodes)]
    ctx = LaunchContext("$SLUICE_JOB_ID", "<first node of the step>", "$((20000 + digits of SLUICE_JOB_ID % 20000))")
    out = [f"# what an allocation run starts: one allocation of {plan.num_nodes} node(s), "
           f"{len(units)} job step(s)", "", "## batch script", "",
           render_script(cfg, plan, run_dir, python, workdir="REPO").rstrip()]
    for unit in units:
        job_id = step_job_id("$SLURM_JOB_ID", 0, unit.key, 1)
        cmd = srun_command(cfg, unit, [hosts[n] for n in unit.nodes],
                           step_name(run_dir, unit.key, 0, 1), run_dir, job_id, python=python)
        out += ["", f"## step {unit.key}: roles {', '.join(unit.roles)}; plan nodes {list(unit.nodes)}",
                "", shlex.join(cmd)]
        for (node, local), w in sorted(unit.slots().items()):
            out.append(f"# task node {node} local {local}: {w.role} {w.task}, GPUs "
                       f"{unit.gpu_positions(w)} of the step's on its node\n"
                       + " ".join(worker_command(w, run_dir, ctx, python=python)))
    return ("\n".join(out) + "\n").replace(run_tag(run_dir), "<run tag>")


def submit_allocation(cfg, plan, run_dir: Path, dependency: Optional[str] = None) -> str:
    """Write the run's batch script and sbatch it (after `dependency`); returns the job id."""
    path = script_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "logs" / "allocation").mkdir(parents=True, exist_ok=True)
    if not path.exists() or dependency is None:
        path.write_text(render_script(cfg, plan, str(run_dir), workdir=os.getcwd()))
    return sbatch_script(path, dependency)


def sbatch_script(path: Path, dependency: Optional[str]) -> str:
    """sbatch `path` (after `dependency`); returns the job id."""
    out = run_command(sbatch_command("--parsable", *([f"--dependency={dependency}"] if dependency else []),
                                     str(path)), timeout=120)
    if out.returncode != 0:
        raise SchedulerError(f"sbatch {path} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


# ------------------------------------------------------------------------ entry points


def run_task(run_dir: str, key: str, job_id: str, redo: Optional[str], step: Optional[int]) -> int:
    """One task of a job step: the worker of (SLURM_NODEID, SLURM_LOCALID)."""
    rd = RunDir(run_dir)
    plan = Plan.from_dict(read_json(rd.run_file)["plan"])
    units = job_units(plan, True)
    unit = one_shot_unit(units, redo) if redo else units_by_key(units)[key]
    cfg = load_run_config(rd)
    task = UnitTask(str(rd.root), unit, local=False, step=step, synthetic=cfg.synthetic.enabled,
                    in_allocation=True)
    env = os.environ
    try:
        return task.run(job_id, int(env.get("SLURM_NODEID", 0)), int(env.get("SLURM_LOCALID", 0)),
                        int(env.get("SLURM_PROCID", 0)))
    except RuntimeError as e:
        print(f"sluice: {e}", file=sys.stderr, flush=True)
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.executors.allocation")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("task", help="one task of a job step (srun starts it)")
    t.add_argument("run_dir")
    t.add_argument("--job-key", required=True)
    t.add_argument("--job-id", required=True)
    t.add_argument("--redo")
    t.add_argument("--step", type=int)
    args = p.parse_args(argv)
    try:
        return run_task(args.run_dir, args.job_key, args.job_id, args.redo, args.step)
    except UserError as e:
        print(f"sluice: {e.message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

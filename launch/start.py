"""Create (or reopen) a run directory and start its coordinator. Called by launch.run.

A new run directory gets:

    config.yaml    the resolved config (prompt paths made absolute, secrets never written)
    run.json       {"schema_version", "code_version" (git sha, "+dirty" if modified),
                    "created", "recipe", "argv", "executor", "plan"}

An existing run directory is resumed with the config frozen in it: overrides given to
launch.run then only change `launch.*` (how the coordinator is started), never the science.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from launch import access, coordinator
from launch.executors.allocation import Allocation, submit_allocation
from launch.executors.base import SchedulerError, job_name
from launch.executors.slurm import submit_coordinator
from launch.host import CoordinatorJob, run_in_allocation
from launch.lock import describe_lock, live_coordinator
from shared import schemas
from shared.config_check import resolve_path
from shared.errors import UserError
from shared.files import atomic_write_bytes, atomic_write_json, read_json
from shared.models import TINY_PREFIX
from shared.partition import job_units
from shared.recipe import REPO_ROOT
from shared.rundir import FOLDERS, RunDir
from tinymodels.build import ensure_model

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN")
# 2: jobs are whole-node groups keyed by job key (coordinator/state.json, logs/<key>/).
RUN_SCHEMA_VERSION = 2


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def scrub_secrets(text: str) -> str:
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, f"<{name} redacted>")
    return text


def resolve_executor(requested: str) -> str:
    if requested == "allocation":
        if shutil.which("sbatch") is None and not os.environ.get("SLURM_JOB_ID"):
            raise UserError("config error: launch.executor='allocation': sbatch is not on PATH and "
                            "this process runs in no Slurm allocation. Fix: run on a Slurm login "
                            "node (launch.run submits the allocation), inside an salloc, or use "
                            "launch.executor=local.")
        return requested
    if requested != "auto":
        if requested == "slurm" and shutil.which("sbatch") is None:
            raise UserError("config error: launch.executor='slurm': sbatch is not on PATH. "
                            "Fix: run on a Slurm login node, or use launch.executor=local.")
        return requested
    return "slurm" if shutil.which("sbatch") else "local"


def _absolute_paths(node) -> None:
    for key in ("data.default.prompt_file", "data.default.system_prompt_file",
                "data.train.prompt_file", "data.train.system_prompt_file",
                "data.validation.prompt_file", "data.validation.system_prompt_file",
                "data.train.data_path", "data.validation.data_path"):
        value = OmegaConf.select(node, key)
        if isinstance(value, str):
            found = resolve_path(value)
            if found is not None:
                OmegaConf.update(node, key, str(found))


def default_run_dir(name: str) -> Path:
    base = Path(os.environ.get("SLUICE_RUNS", Path.cwd() / "runs"))
    return base / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(run_dir: Path, recipe: str, node, plan, executor: str, share_group=None) -> None:
    _absolute_paths(node)
    access.create_run_dir(run_dir, share_group)
    rd = RunDir(run_dir)
    for sub in FOLDERS:
        rd.path(sub).mkdir(exist_ok=True)
    atomic_write_bytes(rd.config_file, scrub_secrets(OmegaConf.to_yaml(node)).encode())
    atomic_write_json(rd.run_file, {
        "schema_version": RUN_SCHEMA_VERSION, "shard_schema_version": schemas.SCHEMA_VERSION,
        "code_version": code_version(), "created": time.time(), "recipe": recipe,
        "argv": [scrub_secrets(a) for a in sys.argv[1:]], "executor": executor,
        "plan": plan.to_dict(),
    })


def ensure_models(cfg) -> None:
    """The built-in tiny models are built once on the launching machine (cached), so the
    workers, on the same shared filesystem, find them ready."""
    for key, name in (("policy.model_name", cfg.policy.model_name),
                      ("teacher.model_name", cfg.teacher.model_name)):
        if name.startswith(TINY_PREFIX):
            ensure_model(name, key)


def in_allocation(cfg) -> bool:
    """launch.executor=allocation inside a Slurm allocation (salloc, or slurm/sluice.sbatch):
    the coordinator runs here, in the foreground."""
    return cfg.launch.executor == "allocation" and bool(os.environ.get("SLURM_JOB_ID"))


def start(conf: str, cfg, node, plan) -> int:
    if cfg.launch.run_dir:
        run_dir = Path(cfg.launch.run_dir).expanduser().resolve()
    elif in_allocation(cfg):
        # The same directory when Slurm requeues the job and this command runs again.
        base = Path(os.environ.get("SLUICE_RUNS", Path.cwd() / "runs"))
        run_dir = (base / f"{cfg.launch.name or Path(conf).stem}-job{os.environ['SLURM_JOB_ID']}").resolve()
    else:
        run_dir = default_run_dir(cfg.launch.name or Path(conf).stem).resolve()
    if in_allocation(cfg):
        Allocation.current().check(plan, job_units(plan, True))
    if RunDir(run_dir).run_file.exists():
        held = live_coordinator(run_dir)
        if held is not None:
            raise UserError(f"a coordinator is already running {run_dir} ({describe_lock(held)}). "
                            f"Fix: watch it with python -m launch.inspect {run_dir}; to restart it, "
                            "stop that process (or scancel its job) first.")
        access.check_run_dir(run_dir)
        run = read_json(RunDir(run_dir).run_file)
        if run is None or run.get("schema_version") != RUN_SCHEMA_VERSION:
            raise UserError(f"{run_dir} was made by another version of Sluice (run schema "
                            f"{(run or {}).get('schema_version')}, this one writes "
                            f"{RUN_SCHEMA_VERSION}). Fix: resume it with the Sluice version that "
                            "started it (run.json records its code_version), or start a new run.")
        executor = run["executor"]
        access.apply_umask(cfg.launch.share_group)
        print(f"Resuming {run_dir} (config frozen at its first launch)")
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"launch.run_dir={str(run_dir)!r} exists and is not a Sluice run "
                            "directory. Fix: choose a new or empty directory.")
        executor = resolve_executor(cfg.launch.executor)
        ensure_models(cfg)
        create_run_dir(run_dir, conf, node, plan, executor, cfg.launch.share_group)
        warning = access.parent_warning(run_dir)
        if warning:
            print(warning, file=sys.stderr)
        print(f"Run directory: {run_dir}")
    if executor == "allocation":
        return start_allocation(conf, cfg, plan, run_dir)
    watch = (f"  watch:   python -m launch.inspect {run_dir}\n"
             f"  log:     tail -f {run_dir}/logs/coordinator/coordinator.log\n"
             f"  resume:  python -m launch.run conf={conf} launch.run_dir={run_dir}")
    if not cfg.launch.detach:
        print(watch.replace(f"  log:     tail -f {run_dir}/logs/coordinator/coordinator.log\n", ""))
        return coordinator.main([str(run_dir)])
    log_dir = RunDir(run_dir).log_dir("coordinator")
    log_dir.mkdir(parents=True, exist_ok=True)
    if executor == "slurm":
        job = submit_coordinator(cfg, run_dir, CoordinatorJob(str(run_dir)))
        print(f"Coordinator: Slurm job {job.job_id}\n{watch.replace('coordinator/coordinator.log', f'coordinator/{job.job_id}/{job.job_id}_0_log.out')}")
        return 0
    with open(log_dir / "coordinator.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launch.coordinator", str(run_dir)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=os.getcwd())
    atomic_write_json(log_dir / "coordinator.pid.json", {"pid": proc.pid, "started": time.time()})
    print(f"Coordinator: local process {proc.pid}\n{watch}")
    return 0


def start_allocation(conf: str, cfg, plan, run_dir: Path) -> int:
    """launch.executor=allocation: inside an allocation, run the coordinator here; on a login
    node, submit the run's allocation (RUN_DIR/coordinator/allocation.sbatch)."""
    if os.environ.get("SLURM_JOB_ID"):
        print(f"  watch:   python -m launch.inspect {run_dir}", flush=True)
        return run_in_allocation(run_dir)
    name = job_name(run_dir, "allocation")
    queued = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True,
                            text=True).stdout.split("\n")[0].strip()
    if queued:
        raise UserError(f"the allocation of {run_dir} is already in the queue (job {queued}). "
                        f"Fix: wait for it (python -m launch.inspect {run_dir}), or scancel it "
                        "first to start another.")
    try:
        job_id = submit_allocation(cfg, plan, run_dir)
    except SchedulerError as e:
        raise UserError(f"cannot submit the allocation of {run_dir}: {e}. Fix: check the "
                        "cluster.* keys (partition, account, qos, time_limit) against sinfo and "
                        "sacctmgr, then resume with the same command.") from e
    print(f"Allocation: Slurm job {job_id} ({plan.num_nodes} node(s); the coordinator and every "
          f"role run inside it)\n"
          f"  watch:   python -m launch.inspect {run_dir}\n"
          f"  log:     tail -f {run_dir}/logs/allocation/{job_id}.out\n"
          f"  resume:  python -m launch.run conf={conf} launch.run_dir={run_dir}", flush=True)
    return 0

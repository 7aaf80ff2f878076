"""Executors: how a run's jobs are submitted, watched, found again and cancelled.

    from launch.executors import make_executor
    ex = make_executor("slurm", run_dir, cfg, plan)
    for unit in ex.units(): job = ex.submit(unit)

`local` (submitit's local executor: make smoke, CI, laptops), `slurm` (sbatch through
submitit: one job per role and node group) and `allocation` (the run inside one allocation,
the roles as srun job steps) implement `base.Executor`; the coordinator only uses that
interface.
"""

from __future__ import annotations

from typing import get_args

from launch.executors.allocation import AllocationExecutor
from launch.executors.base import Executor
from launch.executors.local import LocalExecutor
from launch.executors.slurm import SlurmExecutor
from shared.config import ExecutorKind

# The kinds a run directory records (run.json); "auto" is resolved before that.
EXECUTORS = tuple(k for k in get_args(ExecutorKind) if k != "auto")


def make_executor(kind: str, run_dir, cfg, plan) -> Executor:
    if kind == "local":
        return LocalExecutor(run_dir, cfg, plan)
    if kind == "slurm":
        return SlurmExecutor(run_dir, cfg, plan)
    if kind == "allocation":
        return AllocationExecutor(run_dir, cfg, plan)
    raise ValueError(f"unknown executor {kind!r}: one of {', '.join(EXECUTORS)}")

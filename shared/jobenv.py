"""The environment a job task hands to the worker it starts (launch.executors.base.UnitTask),
named once for both sides: the executor that sets it and the worker code that reads it.

    SLUICE_JOB_ID          the job id as submitit and the coordinator know it ("123_4" for an
                           array task; a pid for the local executor): claims and worker
                           records carry it, so the coordinator finds a dead job's claims
    SLUICE_TASK_ID         the worker's task number within its job
    SLUICE_ROLE            generation, teacher, trainer
    SLUICE_JOB_KEY         the job's key in the coordinator's state (e.g. "generation")
    SLUICE_JOB_END_TIME    when the job's time limit ends (unix s): the trainer checkpoints
                           ahead of a step the stop would likely cut
    SLUICE_ONE_SHOT_STEP   a one-shot task (launch.resubmit --step N): the worker does that
                           step even on a finished run, whose coordinator/STOP would
                           otherwise make it exit at once
    SLUICE_VISIBLE_DEVICES the GPUs the process that started a local job may use (its
                           CUDA_VISIBLE_DEVICES; submitit blanks that variable in local jobs)

Fault injection for tests (shared.worker.fault_point; unset in production):

    SLUICE_FAULTS          "point:step[:sleep=S],...": kill (or stall) a worker at a point
    SLUICE_FAULTS_DIR      with it, each fault happens once per run
"""

from __future__ import annotations

import os
from typing import Optional

JOB_ID = "SLUICE_JOB_ID"
TASK_ID = "SLUICE_TASK_ID"
ROLE = "SLUICE_ROLE"
JOB_KEY = "SLUICE_JOB_KEY"
JOB_END_TIME = "SLUICE_JOB_END_TIME"
ONE_SHOT_STEP = "SLUICE_ONE_SHOT_STEP"
VISIBLE_DEVICES = "SLUICE_VISIBLE_DEVICES"
FAULTS = "SLUICE_FAULTS"
FAULTS_DIR = "SLUICE_FAULTS_DIR"


def job_id() -> Optional[str]:
    """This worker's job id: Sluice's own, else Slurm's (a process started by hand under
    srun or sbatch), else None."""
    env = os.environ
    return env.get(JOB_ID) or env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")


def task_id() -> Optional[str]:
    env = os.environ
    return env.get(TASK_ID) or env.get("SLURM_ARRAY_TASK_ID") or env.get("SLURM_PROCID")


def one_shot() -> bool:
    return bool(os.environ.get(ONE_SHOT_STEP))


def job_end_time() -> Optional[float]:
    """When the job's time limit ends (unix s), where the executor knows it."""
    end = os.environ.get(JOB_END_TIME)
    return float(end) if end else None

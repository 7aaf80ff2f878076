"""The process that hosts a run's coordinator under Slurm, and hands the run on before its
time limit: as a Slurm job of its own, or as the batch step of the run's allocation.

    CoordinatorJob(RUN_DIR)           # what launch.run submits through submitit (slurm executor)
    python -m launch.host allocation RUN_DIR --resubmit RUN_DIR/coordinator/allocation.sbatch
                                      # the allocation's batch script (allocation executor)
    run_in_allocation(RUN_DIR)        # launch.run inside an salloc

Both run `launch.coordinator.main` with the pre-timeout signal (USR2) set to raise the
coordinator's hand-off flag. When the coordinator returns HANDED_OFF (saved, its jobs left
running, or for an allocation its steps stopped):
- a coordinator job submits its successor, a job that depends on this one (afterany) and so
  starts as soon as this one ends (requeueing it instead would hold it two minutes in Slurm's
  requeue delay); if sbatch refuses, it requeues itself;
- an allocation submits its successor allocation (its own batch script, afterany) or, for an
  allocation Sluice did not write, requeues itself (`scontrol requeue`).
Either way the run resumes from RUN_DIR. A job that Slurm itself requeues (preemption,
scontrol requeue) resumes the same way in its next incarnation. The executors import nothing
from here: this module sits above the coordinator, which sits above them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from submitit.core.utils import FailedJobError, FailedSubmissionError

from launch import coordinator
from launch.events import append_event
from launch.executors.allocation import require_allocation, sbatch_script
from launch.executors.base import SchedulerError, run_command
from launch.executors.slurm import submit_coordinator
from shared.errors import UserError
from shared.files import read_json
from shared.partition import Plan, job_units
from shared.rundir import RunDir
from shared.worker import load_run_config

log = logging.getLogger("sluice.coordinator")


class CoordinatorJob:
    """The coordinator as a Slurm job (what launch.run submits through submitit)."""

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    def __call__(self) -> int:
        signal.signal(signal.SIGUSR2, coordinator.request_handoff)  # instead of submitit's requeue
        rc = coordinator.main([self.run_dir])
        if coordinator.handoff_requested() and rc == coordinator.HANDED_OFF:
            return self.submit_successor()
        if rc != 0:  # the job shows FAILED in sacct, not COMPLETED
            raise RuntimeError(f"the coordinator of {self.run_dir} exited with status {rc}; "
                               "its output is above")
        return rc

    def submit_successor(self) -> int:
        job_id = os.environ.get("SLURM_JOB_ID", "")
        rd = RunDir(self.run_dir)
        try:
            successor = submit_coordinator(load_run_config(rd), rd.root, CoordinatorJob(self.run_dir),
                                           dependency=f"afterany:{job_id}" if job_id else None)
        except (OSError, FailedJobError, FailedSubmissionError) as e:
            # sbatch refused: fall back on Slurm's own requeue of this job.
            log.error("[coordinator] cannot submit the next coordinator job (%s); requeueing job %s",
                      e, job_id)
            subprocess.run(["scontrol", "requeue", job_id], check=False)
            return 0
        append_event(rd, "coordinator_handoff", from_job=job_id, to_job=str(successor.job_id))
        log.info("[coordinator] handed the run over to coordinator job %s (starts when job %s ends)",
                 successor.job_id, job_id)
        return 0


def continue_later(run_dir, script: Optional[str]) -> int:
    """After the coordinator stopped on the allocation's pre-timeout signal: submit the
    successor allocation (the run's own script, afterany), else requeue this one."""
    rd = RunDir(run_dir)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if script and Path(script).exists():
        try:
            successor = sbatch_script(Path(script), f"afterany:{job_id}")
        except SchedulerError as e:
            print(f"sluice: cannot submit the next allocation ({e}); requeueing job {job_id}",
                  file=sys.stderr, flush=True)
        else:
            append_event(rd, "allocation_handoff", from_job=job_id, to_job=successor)
            print(f"sluice: the run goes on in allocation {successor} (starts when {job_id} ends)",
                  flush=True)
            return 0
    out = run_command(["scontrol", "requeue", job_id])
    if out.returncode == 0:
        append_event(rd, "allocation_requeued", job=job_id)
        print(f"sluice: requeued allocation {job_id}: the run resumes when it starts again",
              flush=True)
        return 0
    print(f"sluice: cannot requeue allocation {job_id} ({out.stderr.strip()}). The run is saved: "
          f"resume it with python -m launch.run launch.run_dir={run_dir}", file=sys.stderr, flush=True)
    return 0


def run_in_allocation(run_dir, script: Optional[str] = None) -> int:
    """The coordinator of an allocation run (the batch step, or launch.run in an salloc)."""
    run = read_json(RunDir(run_dir).run_file)
    if run is None:
        raise UserError(f"{run_dir}: not a Sluice run directory (no run.json).")
    plan = Plan.from_dict(run["plan"])
    require_allocation("launch.executor=allocation").check(plan, job_units(plan, True))
    signal.signal(signal.SIGUSR2, coordinator.request_handoff)
    rc = coordinator.main([str(run_dir)])
    if rc == coordinator.HANDED_OFF:
        return continue_later(run_dir, script)
    return rc


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.host", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("allocation", help="the coordinator, as the batch step of the run's allocation")
    a.add_argument("run_dir")
    a.add_argument("--resubmit", help="the batch script to submit as the successor allocation")
    args = p.parse_args(argv)
    try:
        return run_in_allocation(Path(args.run_dir).resolve(), args.resubmit)
    except UserError as e:
        print(f"sluice: {e.message}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

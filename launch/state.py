"""RUN_DIR/coordinator/state.json: what a coordinator knows that the run directory's other
files do not say (the jobs it submitted, the retries they cost), so that a restarted one goes
on where the last one stopped.

    {"phase": "starting" | "running" | "finishing" | "finished" | "failed",
     "total_steps", "trained_step", "logged_step",
     "jobs": {job key: {"job_id", "attempt", "submitted", "roles"}},
     "retries": {job key: n}, "failed_at_step": {job key: trained step of its last failure},
     "down": {job key: {"since", "cause"}}}         # a job away for a time limit or requeue

Job keys name the jobs of the partition plan (shared.partition.job_units), e.g. training-n0,
generation-n1. Written atomically after every change that matters (a job submitted, a retry
counted, each poll).
"""

from __future__ import annotations

from typing import Iterable

from shared.files import atomic_write_json, read_json
from shared.rundir import RunDir


class RunState(dict):
    """state.json as a dict (its keys above), with `save`."""

    def __init__(self, rd: RunDir, keys: Iterable[str] = ()):
        super().__init__(read_json(rd.state_file) or {
            "jobs": {}, "retries": {k: 0 for k in keys}, "phase": "starting"})
        self.rd = rd

    def save(self) -> None:
        atomic_write_json(self.rd.state_file, dict(self))

"""The teacher's side of the queue, without torch: which scored shard to claim next.

    tq = TeacherQueue(RUN_DIR, cfg, worker, step=None)
    found = tq.next_claim()        # (scored_queue, rollouts_queue, claim) or None
    if found is None: tq.pacer.sleep(tq.due_at)

stages/score.py runs it on rank 0 around the model; bench/synthetic.py around a sleep.
"""

from __future__ import annotations

import time
from typing import Optional

from shared.config import SluiceConfig
from shared.queue import Owner, StageQueue
from shared.rundir import RunDir, active_steps
from shared.waiting import Pacer
from shared.worker import Worker


class TeacherQueue:
    """Rank 0's side of the teacher worker: which scored shard to claim next, and when the
    rollouts shard it waits for may land. Used as is by the synthetic teacher (bench/synthetic.py)."""

    def __init__(self, run_dir, cfg: SluiceConfig, worker: Worker, step: Optional[int]):
        self.rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.cfg, self.worker, self.step = cfg, worker, step
        self.owner = Owner.from_env()
        # step -> when it was seen complete. Rechecked every lease_s: a complete step becomes
        # pending again when its shards are quarantined (a resume from an older checkpoint
        # redoes it, launch.resubmit, a corrupt shard found by a reader).
        self.finished_steps: dict[int, float] = {}
        self.committed = 0
        self.pacer = Pacer(cfg.queue.poll_s, cfg.queue.fast_poll_s)
        self.due_at: Optional[float] = None  # when a rollouts shard waited for may land

    def _queues(self, step: int) -> tuple[StageQueue, StageQueue]:
        lease = self.cfg.queue.lease_s
        return (StageQueue(self.rd, step, "rollouts", lease_s=lease),
                StageQueue(self.rd, step, "scored", lease_s=lease, compression=self.cfg.queue.compression))

    def next_claim(self):
        """``(scored_queue, rollouts_queue, claim)`` of a claimable shard, or None."""
        steps = [self.step] if self.step is not None else active_steps(self.rd, "scored")
        self.due_at = None
        for step in steps:
            if time.monotonic() - self.finished_steps.get(step, -float("inf")) < self.cfg.queue.lease_s:
                continue
            rollouts, scored = self._queues(step)
            if scored.expected() is None:
                continue
            pending = scored.pending(fast=True)
            if not pending:
                self.finished_steps[step] = time.monotonic()
                continue
            committed = rollouts.committed(fast=True)
            due = self.pacer.due(rollouts, [i for i in pending if i not in committed], committed)
            if due is not None:
                self.due_at = due if self.due_at is None else min(self.due_at, due)
            while True:
                candidates = [i for i in pending if i in committed]
                claim = scored.claim_next(self.owner, candidates=candidates)
                if claim is None:
                    if candidates:
                        self.pacer.lost()  # landed, and taken by other teachers
                    break
                if scored.record(claim.index) is None:
                    self.pacer.won()
                    return scored, rollouts, claim
                # Committed by another worker between our pending() scan and the claim.
                pending.remove(claim.index)
                claim.release()
        return None

    def done(self) -> bool:
        if self.worker.should_stop():
            return True
        return self.step is not None and self._queues(self.step)[1].is_complete(fast=True)

"""The teacher's side of the queue, without torch: which scored shard to claim, and the loop.

    tq = TeacherQueue(RUN_DIR, cfg, worker, step=None)
    tq.serve(score)    # score(rollouts_table, step, where) -> (scored_table, extra): claim, read,
                       # score, commit, until STOP (or the step is complete)

stages/score.py serves with the model on rank 0 (and tells its other ranks what to forward
through `announce`); bench/synthetic.py serves with a sleep.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from shared.claims import Owner
from shared.config import SluiceConfig
from shared.queue import ClaimLostError, CorruptShardError, StageQueue
from shared.rundir import RunDir, active_steps
from shared.waiting import Pacer
from shared.worker import Worker

log = logging.getLogger("sluice.score")


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
            self.due_at = self.pacer.earliest(
                self.due_at, self.pacer.due(rollouts, [i for i in pending if i not in committed], committed))
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

    def serve(self, score: Callable, once: bool = False, announce: Callable = lambda message: None) -> int:
        """Claim, read, score and commit scored shards until STOP (or, with a step, until it is
        complete; `once`: until nothing is claimable). `score(rollouts, step, where)` returns
        (scored table, extra for the commit record); `announce` hears "stop", "idle" (every
        look that found nothing) and each rollouts table before it is scored. Returns the
        shards committed."""
        cfg, worker = self.cfg, self.worker
        while True:
            if self.done():
                announce("stop")
                break
            found = self.next_claim()
            if found is None:
                if once:
                    announce("stop")
                    break
                worker.beat("waiting", detail="no claimable scored shard")
                announce("idle")
                self.pacer.sleep(self.due_at)
                continue
            scored_q, rollouts_q, claim = found
            where = f"step {scored_q.step} shard {claim.index}"
            with claim.start_heartbeat(cfg.queue.heartbeat_s):
                try:
                    rollouts = rollouts_q.read(claim.index)
                except CorruptShardError as e:
                    log.error("%s", e)  # quarantined: generation redoes it, we score it after
                    announce("idle")
                    continue
                announce(rollouts)
                worker.beat("scoring", detail=where, force=True)
                started = time.perf_counter()
                table, extra = score(rollouts, scored_q.step, where)
                score_s = time.perf_counter() - started
                worker.beat("committing", detail=where)
                extra["score_s"] = round(score_s, 3)
                try:
                    scored_q.commit(claim.index, table, extra_meta=extra, claim=claim)
                except ClaimLostError as e:
                    log.warning("%s", e)
                    continue
            self.committed += 1
            log.info("committed scored %s: %d rows, %d tokens in %.2fs", where, table.num_rows,
                     extra.get("tokens", 0), score_s)
        return self.committed

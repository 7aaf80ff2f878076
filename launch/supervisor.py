"""Job supervision: a run's jobs submitted, watched, judged when they end, resubmitted, and
their workers checked (placement, liveness). The coordinator drives it once per poll.

    sup = Supervisor(rd, cfg, plan, executor, state, events.event, validation)
    dead = sup.attach_saved_jobs()       # jobs of an earlier coordinator: watched again
    sup.ensure_jobs(dead)                # every job of the plan has one
    sup.watch_jobs(); sup.check_workers()    # each poll

What it decides, and where it is recorded:
- A job that ended: "done" (the run was over for it), "scheduler" (a time limit, a preemption,
  the allocation's end: resubmitted, never a failure) or "failed" (resubmitted and counted
  against launch.max_retries; past it, RunFailed). Its claims are released at once (its
  shards are redone now, not after the lease) and its workers' records marked lost. Events:
  job_submitted, job_resubmitted, job_failed, job_time_limit, job_preempted, job_requeued,
  job_back, job_reattached, orphan_job_cancelled, retries_refilled, scheduler_unreachable.
- Slurm requeued a running job (it runs again under its id): its workers are gone, its next
  incarnation's are the only live ones.
- A worker whose heartbeat is stale past 2 x queue.lease_s (LOADING_GRACE_S while it loads)
  is hung: its job is cancelled, then resubmitted as a failure (worker_hung).
- Two isolated roles on one node: RunFailed (placement_violation).
Retries and jobs live in coordinator/state.json (launch.state), so a restarted coordinator
re-attaches to live jobs instead of submitting them twice, and cancels live jobs of the run
that state.json does not know (a coordinator killed between submitting and saving).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

from launch.events import RunFailed
from launch.executors import base as J
from launch.state import RunState
from launch.validation import Validation
from shared.config import SluiceConfig
from shared.files import atomic_write_json, read_json
from shared.partition import Plan
from shared.pipeline import ROLE_NAMES, WORKER_STAGES
from shared.queue import StageQueue
from shared.retention import committed_checkpoints, invalidate_after
from shared.rundir import RunDir, active_steps, last_trained_step, worker_records
from shared.worker import FINAL_STATUSES, fault_point

# A worker starting up or loading a model may be silent this long before it counts as hung.
LOADING_GRACE_S = 1800.0
# A job Slurm accounting has never heard of after this long counts as vanished.
UNKNOWN_GRACE_S = 300.0
# States in which a job that was running has been requeued (it runs again under its id).
REQUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
# Ends that are the scheduler's doing, never a failure (besides a stop on the pre-timeout
# signal, which ends COMPLETED with RUN_DIR/jobs/<id>.json saying so).
SCHEDULER_END_STATES = {"TIMEOUT", "PREEMPTED", "ALLOCATION_ENDED"}
# A worker record that started this long before its job's current start is of an earlier
# incarnation (requeueing takes Slurm two minutes, so incarnations are far apart).
INCARNATION_SLACK_S = 30.0


class Supervisor:
    """The jobs of one run, through its executor (`launch.executors`)."""

    def __init__(self, rd: RunDir, cfg: SluiceConfig, plan: Plan, executor: J.Executor,
                 state: RunState, event: Callable[..., None], validation: Validation):
        self.rd, self.cfg, self.plan, self.executor = rd, cfg, plan, executor
        self.state, self.event, self.validation = state, event, validation
        self.units = J.units_by_key(executor.units())
        self.jobs: Dict[str, object] = {}
        """job key -> the live job this coordinator watches."""
        self._unknown_since: Dict[str, float] = {}
        self._running: Dict[str, str] = {}
        """job key -> id of its job, while seen RUNNING (a later PENDING means requeued)."""
        self._cancelled_hung: set = set()
        """Ids of jobs this coordinator cancelled as hung: their end is a failure."""
        self._scheduler_down = False

    def redo_after(self, ckpt: int) -> None:
        """Training restarts from checkpoint `ckpt`: what came after it is set aside
        (shared.retention.invalidate_after) and redone."""
        redone, _ = invalidate_after(self.rd, ckpt)
        if redone:
            self.event("steps_redone", from_checkpoint=ckpt, steps=redone)
        self.validation.forget_after(ckpt)

    # ------------------------------------------------------------------ jobs

    def attach_saved_jobs(self) -> List[str]:
        """Re-attach the jobs an earlier coordinator process submitted (state.json): a job still
        alive keeps working and is watched again, never submitted twice. Returns the keys of
        the jobs that died while no coordinator watched (their claims are released now)."""
        dead: List[str] = []
        for key, info in self.state.get("jobs", {}).items():
            if key not in self.units:
                continue
            job = self.executor.reattach(key, info["job_id"])
            try:
                state = self.executor.state(job)
            except J.SchedulerError:
                state = "UNKNOWN"  # watched; judged once the scheduler answers
            # UNKNOWN: Slurm has no accounting record yet (just submitted): watch it.
            if state in J.LIVE_STATES or state == "UNKNOWN":
                self.jobs[key] = job
                self.event("job_reattached", job=key, roles=list(self.units[key].roles),
                           job_id=info["job_id"], state=state)
            elif self._judge_end(key, job, state, while_coordinator_down=True) == "failed":
                dead.append(key)
        self.cancel_orphans()
        return dead

    def cancel_orphans(self) -> None:
        """Cancel live jobs of this run that state.json does not record: a coordinator killed
        between submitting jobs and saving their ids leaves them behind. They would work beside
        the replacements this coordinator submits (the queue's claims keep every shard
        exactly-once, but they hold GPUs, and two trainers would train the same steps)."""
        known = {str(j.job_id) for j in self.jobs.values()}
        try:
            found = self.executor.live_jobs()
        except (OSError, J.SchedulerError) as e:
            self.event("orphan_scan_failed", error=str(e))
            return
        for job_id, key in sorted(found.items()):
            if job_id in known:
                continue
            job = self.executor.reattach(key, job_id)
            self.executor.cancel(job)
            broken = self._break_claims(job_id)
            self._mark_workers_lost(job_id, "CANCELLED")
            self.event("orphan_job_cancelled", job=key, roles=list(self.units[key].roles) if key in self.units
                       else [], job_id=job_id, claims_released=broken, log=str(job.paths.stderr))

    def submit(self, key: str, retry: bool) -> None:
        unit = self.units[key]
        if "training" in unit.roles:
            ck = max(committed_checkpoints(self.rd), default=0)
            if last_trained_step(self.rd) > ck:
                self.redo_after(ck)
        job = self.executor.submit(unit)
        # Tests kill the coordinator here (job submitted, not yet in state.json): the
        # restarted coordinator must find and cancel it (cancel_orphans).
        for role in unit.roles:
            fault_point(f"coordinator_submitted_{role}", last_trained_step(self.rd))
        saved = self.state["jobs"].get(key, {})
        self.jobs[key] = job
        attempt = saved.get("attempt", 0) + (1 if retry else 0)
        self.state["jobs"][key] = {"job_id": str(job.job_id), "attempt": attempt,
                                   "submitted": time.time(), "roles": list(unit.roles)}
        self.state.save()
        self.event("job_resubmitted" if retry else "job_submitted", job=key, roles=list(unit.roles),
                   job_id=str(job.job_id), nodes=len(unit.nodes), tasks=len(unit.workers))

    def ensure_jobs(self, dead: Optional[List[str]] = None) -> None:
        """Submit every job of the plan that has none; `dead` jobs count as retries."""
        dead = dead or []
        for key in self.units:
            if key in self.jobs:
                continue
            if key in dead:
                self._count_retry(key, "its job died while no coordinator ran")
            self.submit(key, retry=key in dead)

    def _count_retry(self, key: str, last: str) -> None:
        """A real failure of job `key`. Its budget (launch.max_retries) refills once the run
        has trained launch.retry_refill_steps steps since its last failure."""
        trained = last_trained_step(self.rd)
        last_at = self.state.setdefault("failed_at_step", {}).get(key)
        if last_at is not None and trained - last_at >= self.cfg.launch.retry_refill_steps \
                and self.state["retries"].get(key, 0):
            self.event("retries_refilled", job=key, after_steps=trained - last_at)
            self.state["retries"][key] = 0
        self.state["failed_at_step"][key] = trained
        self.state["retries"][key] = self.state["retries"].get(key, 0) + 1
        if self.state["retries"][key] > self.cfg.launch.max_retries:
            roles = "+".join(self.units[key].roles)
            raise RunFailed(
                f"the {roles} job {key} failed more than launch.max_retries="
                f"{self.cfg.launch.max_retries} times; last: {last}\n"
                f"Fix the cause, then resume with: python -m launch.run "
                f"conf={self.rd.config_file} launch.run_dir={self.rd.root} "
                f"(or raise launch.max_retries)")

    def _mark_workers_lost(self, job_id: str, state: str, before: Optional[float] = None) -> None:
        """The worker records of a dead job (or, with `before`, of its incarnations that started
        before that time) say so: inspect shows it, placement and liveness checks skip them.
        A record of a worker that recorded its own end is left as it is."""
        for p, info in worker_records(self.rd):
            if str(info.get("job_id")) != job_id or info.get("status") in FINAL_STATUSES:
                continue
            if before is not None and info.get("started", 0) >= before:
                continue
            info.update(status="lost", detail=f"job {job_id} {state}")
            atomic_write_json(p, info)

    def _break_claims(self, job_id: str) -> int:
        """Release the claims a dead job held, so its shards are redone now, not after the lease."""
        n = 0
        for t in active_steps(self.rd, "prompts"):
            for stage in WORKER_STAGES:
                n += len(StageQueue(self.rd, t, stage).break_claims(job_id))
        return n + self.validation.break_claims(job_id)

    def watch_jobs(self) -> None:
        now = time.monotonic()
        for key, job in list(self.jobs.items()):
            job_id = str(job.job_id)
            try:
                state = self.executor.state(job)
            except J.SchedulerError as e:
                # Nothing is known this round (slurmdbd and slurmctld unreachable): conclude nothing.
                if not self._scheduler_down:
                    self.event("scheduler_unreachable", error=str(e))
                self._scheduler_down = True
                return
            if self._scheduler_down:
                self._scheduler_down = False
                self.event("scheduler_reachable")
            if state == "UNKNOWN":
                # Slurm accounting has not seen the job yet (normal for seconds after
                # sbatch); one it never sees (a stale id in state.json) is gone.
                first = self._unknown_since.setdefault(job_id, now)
                if now - first < UNKNOWN_GRACE_S:
                    continue
                state = "VANISHED"
            else:
                self._unknown_since.pop(job_id, None)
            if state == "RUNNING":
                self._running[key] = job_id
            elif state in REQUEUED_STATES and self._running.get(key) == job_id:
                self._requeued(key, job, state)
            if state in J.LIVE_STATES:
                continue
            del self.jobs[key]
            self._running.pop(key, None)
            outcome = self._judge_end(key, job, state)
            if outcome == "failed":
                fatal = self.executor.failure_is_fatal(job, state)
                if fatal:
                    raise RunFailed(fatal)
                said = "".join(f"\n  {line}" for line in self._failure_reports(job_id))
                self._count_retry(key, f"job {job_id} ({key}) ended {state}.{said}\nLog: "
                                       f"{job.paths.stderr}\n--- last lines ---\n{J.stderr_tail(job)}")
                self.submit(key, retry=True)
            elif outcome == "scheduler":
                self.submit(key, retry=False)

    def _judge_end(self, key: str, job, state: str, while_coordinator_down: bool = False) -> str:
        """A job of the run ended: "done" (the run was over for it), "scheduler" (a time limit
        or a preemption: normal life on a cluster, never a failure) or "failed". Releases its
        claims and records what happened."""
        job_id = str(job.job_id)
        if state == "COMPLETED" and (self.state.get("phase") == "finishing" or
                                     last_trained_step(self.rd) >= self.state.get("total_steps", 1 << 62)):
            return "done"  # its workers saw the run end
        roles = list(self.units[key].roles)
        broken = self._break_claims(job_id)
        self._mark_workers_lost(job_id, f"ended {state}")  # failed records stay as they are
        extra = {"while_coordinator_down": True} if while_coordinator_down else {}
        end = read_json(J.job_end_path(self.rd.root, job_id)) or {}
        if job_id not in self._cancelled_hung and (
                state in SCHEDULER_END_STATES or (state == "COMPLETED" and end.get("reason"))):
            cause = "time_limit" if end.get("reason") == "time_limit" or state == "TIMEOUT" \
                else "preempted"
            self.event("job_" + cause, job=key, roles=roles, job_id=job_id, state=state,
                       claims_released=broken, **extra)
            self._went_down(key, cause, end.get("time", time.time()))
            return "scheduler"
        if state == "COMPLETED" and while_coordinator_down:
            return "done"  # e.g. a worker that saw STOP of an earlier, finished coordinator
        said = self._failure_reports(job_id)
        self.event("job_failed", job=key, roles=roles, job_id=job_id, state=state,
                   claims_released=broken, log=str(job.paths.stderr),
                   last_lines=J.stderr_tail(job), **({"worker_said": said} if said else {}),
                   **extra)
        return "failed"

    def _failure_reports(self, job_id: str) -> List[str]:
        """What the job's failed workers reported (shared.worker.Worker.fail), one line each."""
        return [f"{info.get('role')} task {info.get('task_id')} on {info.get('node')}: "
                f"{info.get('detail')}" for _, info in worker_records(self.rd)
                if str(info.get("job_id")) == job_id and info.get("status") == "failed"]

    def _requeued(self, key: str, job, state: str) -> None:
        """Slurm requeued a running job (preemption, scontrol requeue): it runs again later
        under the same id. Its workers are gone now: their claims are released and their
        records marked, so that the next incarnation's records are the only live ones."""
        job_id = str(job.job_id)
        del self._running[key]
        broken = self._break_claims(job_id)
        self._mark_workers_lost(job_id, f"requeued ({state})")
        self.event("job_requeued", job=key, roles=list(self.units[key].roles), job_id=job_id,
                   state=state, claims_released=broken)
        self._went_down(key, "requeued", time.time())
        self.state.save()

    def _went_down(self, key: str, cause: str, since: float) -> None:
        self.state.setdefault("down", {})[key] = {"since": since, "cause": cause}

    def _check_back(self, records: Dict[str, list]) -> None:
        """A job that was down (time limit, preemption, requeue) is back once a worker of its
        current job is past loading: the wall-clock it lost goes into events (job_back) and
        launch.inspect."""
        down = self.state.get("down", {})
        for key in list(down):
            job = self.jobs.get(key)
            if job is None:
                continue
            since = down[key]["since"]
            for recs in records.values():
                ready = [r for r in recs if str(r.get("job_id")) == str(job.job_id)
                         and r.get("started", 0) >= since - 1
                         and r.get("status") not in ("starting", "loading")]
                if ready:
                    self.event("job_back", job=key, job_id=str(job.job_id), cause=down[key]["cause"],
                               down_s=round(time.time() - since, 1))
                    del down[key]
                    break

    def check_workers(self) -> None:
        """Placement (no node shared by isolated roles) and liveness (hung workers), from the
        records of the workers of the jobs this coordinator watches (a dead job's stale record
        never counts, nor does a one-shot launch.resubmit job's)."""
        tracked: Dict[str, Dict[str, object]] = {role: {} for role in ROLE_NAMES}
        for key, job in self.jobs.items():
            for role in self.units[key].roles:
                tracked[role][str(job.job_id)] = job
        records: Dict[str, list] = {}
        for role in ROLE_NAMES:
            for _, info in worker_records(self.rd, role):
                if info.get("status") in FINAL_STATUSES:
                    continue
                job = tracked[role].get(str(info.get("job_id")))
                if job is None:
                    continue
                start = self.executor.started_at(job)
                if start is not None and info.get("started", 0) < start - INCARNATION_SLACK_S:
                    # A worker of an earlier incarnation of this (requeued) job: gone.
                    self._mark_workers_lost(str(job.job_id), "requeued (earlier incarnation)",
                                            before=start - INCARNATION_SLACK_S)
                    continue
                records.setdefault(role, []).append(info)
        self._check_back(records)
        if self.plan.isolated:
            nodes = {r: {i["node"] for i in recs} for r, recs in records.items()}
            for a in ROLE_NAMES:
                for b in ROLE_NAMES:
                    if a < b and nodes.get(a, set()) & nodes.get(b, set()):
                        shared = sorted(nodes[a] & nodes[b])
                        self.event("placement_violation", roles=[a, b], nodes=shared)
                        raise RunFailed(
                            f"resource isolation violated: roles {a} and {b} both run on "
                            f"{', '.join(shared)}; distillation.resource_isolation enforces "
                            "node-level role isolation. Fix: give each role whole nodes "
                            "(check the partition's node sharing policy)")
        lease = self.cfg.queue.lease_s
        now = time.time()
        for role, recs in records.items():
            for info in recs:
                hb = info.get("heartbeat", 0)
                # Loading a large model or starting an engine may go long without a heartbeat.
                limit = max(2 * lease, LOADING_GRACE_S) if info.get("status") in ("starting", "loading") \
                    else 2 * lease
                job = tracked[role].get(str(info.get("job_id")))
                if now - hb > limit and job is not None and str(job.job_id) not in self._cancelled_hung:
                    # The heartbeat comes from a thread of the worker's process: a stale one
                    # means the process is gone or frozen, never just busy.
                    self.event("worker_hung", role=role, job_id=str(job.job_id), status=info.get("status"),
                               heartbeat_age_s=round(now - hb, 1))
                    self._cancelled_hung.add(str(job.job_id))
                    self.executor.cancel(job)  # watch_jobs then sees it end and resubmits

    # ------------------------------------------------------------------ stopping

    def stop_for_time_limit(self) -> None:
        """The allocation's pre-timeout signal: its job steps stop as role jobs stop at theirs
        (the trainer checkpoints), within the signal's lead less a margin for the successor."""
        budget = max(10.0, self.cfg.cluster.signal_delay_s - 30.0)
        self.executor.stop_steps(list(self.jobs.values()), budget)
        self.event("steps_stopped", reason="time limit of the allocation",
                   jobs=sorted(str(j.job_id) for j in self.jobs.values()))
        self.state.save()

    def stop_all(self, timeout_s: float = 120) -> None:
        """Wait for the jobs to end by themselves (their workers saw STOP); cancel the rest."""
        self.executor.wait_all(list(self.jobs.values()), timeout_s)

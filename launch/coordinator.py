"""The coordinator: owns a run's state machine. CPU only; never imports torch or vLLM.

    python -m launch.coordinator RUN_DIR          # what launch.run starts (job or process)

It submits the role jobs through submitit, writes each step's prompts, watches jobs and
worker heartbeats, resubmits what failed (up to launch.max_retries per job), logs metrics,
and ends the run. All of its state is in RUN_DIR, so it can be killed and restarted at any
time (launch.run on the run directory does that).

Files it writes:

    coordinator/state.json      {"jobs": {job key: {"job_id", "attempt", "submitted", "roles"}},
                                 "retries": {job key: n}, "phase", "total_steps",
                                 "trained_step", "logged_step"}; job keys name the jobs of
                                 the partition plan (shared.partition.job_units), e.g.
                                 training-n0, generation-n1
    coordinator/events.jsonl    append-only, one JSON object a line: {"time", "event", ...}
    coordinator/STOP            the run is over ({"reason": ...}): workers exit
    coordinator/lock.json       {"pid", "host", "token", "started", "heartbeat"} while a
                                coordinator runs the run (refreshed every few seconds): a
                                second coordinator on the same run refuses to start
    data/train.arrow            the tokenized training prompts (fixed at the first start)
    data/summary.json           rows used and rows skipped by reason
    steps/<t>/prompts/...       prompts shards (one row per sample), and EXPECTED for the
                                rollouts and scored stages of the step
    metrics.jsonl               one JSON object per step (train/*, timing/*)

and it prunes weights/<step> (written by training) to what is still needed: see weights_needed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow as pa

from launch.executors import base as J
from launch.executors import make_executor
from launch.executors.local import pid_alive
from shared import schemas
from shared.files import atomic_write_json, read_json
from shared.partition import Plan
from shared.pipeline import ROLE, ROLE_NAMES, WORKER_STAGES
from shared.queue import StageQueue
from shared.rundir import (CHECKPOINTS, COMMITTED, CONFIG, DATA_SUMMARY, HELDOUT, TRAIN_DATA,
                           TRAIN_RECORD, WEIGHTS, RunDir, active_steps, append_event, append_metrics, commit_dir,
                           committed_steps, is_committed_dir, read_metrics, step_name, temp_dir_for,
                           worker_records)
from shared.worker import FINAL_STATUSES, fault_point, load_run_config

log = logging.getLogger("sluice.coordinator")
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
# The coordinator lock: refreshed this often, held while younger than LOCK_FRESH_S (on the
# lock holder's own host, only while its pid lives: a killed coordinator is replaced at once).
LOCK_BEAT_S = 5.0
LOCK_FRESH_S = 60.0


def weights_needed(committed: List[int], trained: int, checkpoints: List[int], staleness: int,
                   validations: List[int], keep_period: Optional[int]) -> set:
    """The versions of weights/<v> a run still needs, of the `committed` ones:

    - generation: the newest version and the `staleness` + 1 before it (a generation worker
      may still be loading one of them for a step it took before the newest appeared), and
      the same window below the trained step;
    - a resume: training restarts from the newest checkpoint, and generation then starts
      from that checkpoint's weights: the window below the newest checkpoint;
    - validation: versions scheduled and not yet collected (`validations`);
    - the user's retention: the steps of kept checkpoints, every `keep_period`-th step.
    """
    if not committed:
        return set()
    window = staleness + 1
    needed = set()
    for top in (max(committed), trained, max(checkpoints, default=0)):
        needed.update(range(top - window, top + 1))
    needed.update(validations)
    needed.update(checkpoints)
    if keep_period:
        needed.update(v for v in committed if v % keep_period == 0)
    return needed & set(committed)


def _lock_path(root) -> Path:
    return RunDir(root).lock_file


def live_coordinator(root) -> Optional[dict]:
    """The lock of another coordinator process still running the run in `root`, or None."""
    info = read_json(_lock_path(root))
    if not isinstance(info, dict):
        return None
    if time.time() - float(info.get("heartbeat", 0)) > LOCK_FRESH_S:
        return None
    if info.get("host") == socket.gethostname():
        pid = int(info.get("pid", 0))
        if pid == os.getpid() or not pid_alive(pid):
            return None
    job = os.environ.get("SLURM_JOB_ID")
    if job and str(info.get("slurm_job_id")) == job and int(info.get("pid", 0)) != os.getpid():
        return None  # our own job's previous incarnation (requeued): Slurm runs one at a time
    return info


def describe_lock(info: dict) -> str:
    where = f"pid {info.get('pid')} on {info.get('host')}"
    if info.get("slurm_job_id"):
        where += f", Slurm job {info['slurm_job_id']}"
    return where


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class RunFailed(Exception):
    """The run cannot go on (a role past its retry budget, a placement violation)."""


class AlreadyRunning(Exception):
    """Another coordinator process runs this run directory."""


class Coordinator:
    def __init__(self, run_dir):
        self.rd = RunDir(run_dir)
        self.root = self.rd.root
        self.cfg = load_run_config(self.rd)
        run = read_json(self.rd.run_file)
        if run is None:
            raise FileNotFoundError(f"{self.root}/run.json missing: not a Sluice run directory")
        self.plan = Plan.from_dict(run["plan"])
        self.kind = run["executor"]
        self.executor = make_executor(self.kind, self.root, self.cfg, self.plan)
        self.units = J.units_by_key(self.executor.units())
        self.state = read_json(self.rd.state_file) or {
            "jobs": {}, "retries": {k: 0 for k in self.units}, "phase": "starting"}
        self.jobs: Dict[str, object] = {}
        """job key -> the live job this coordinator watches."""
        self.poll_s = self.cfg.queue.poll_s
        events = self.rd.events_file
        events.parent.mkdir(parents=True, exist_ok=True)
        self._events = open(events, "a+b")
        self._events.seek(0, os.SEEK_END)
        if self._events.tell() > 0:
            self._events.seek(-1, os.SEEK_END)
            if self._events.read(1) != b"\n":
                # A coordinator killed mid-write left half a line: end it, so the next event
                # is a line of its own (readers skip the damaged one).
                self._events.write(b"\n")
        self._logged: set = set()
        self._unknown_since: Dict[str, float] = {}
        self._running: Dict[str, str] = {}
        """job key -> id of its job, while seen RUNNING (a later PENDING means requeued)."""
        self._cancelled_hung: set = set()
        """Ids of jobs this coordinator cancelled as hung: their end is a failure."""
        self._started = time.time()
        self._step_done_at: Dict[int, float] = {}
        self._cpu_logged = time.process_time()
        self._last_progress = ""
        from launch.validation import Validation

        self.validation = Validation(self.rd, self.cfg)
        self.logger = None  # launch.logger.MetricsLogger, started in run()

    # ------------------------------------------------------------------ bookkeeping

    def event(self, name: str, **fields) -> None:
        rec = {"time": round(time.time(), 3), "event": name, **fields}
        self._events.write((json.dumps(rec, sort_keys=True, default=str) + "\n").encode())
        self._events.flush()
        os.fsync(self._events.fileno())
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        log.info("[coordinator] %s %s", name, detail)

    def save_state(self) -> None:
        atomic_write_json(self.rd.state_file, self.state)

    # ------------------------------------------------------------------ the lock

    def acquire_lock(self) -> None:
        """Become the run's only coordinator, or raise AlreadyRunning. A stale lock (its
        holder dead, or silent for LOCK_FRESH_S) is taken over."""
        path = _lock_path(self.root)
        self._lock_token = uuid.uuid4().hex
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "token": self._lock_token,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time()}
        for _ in range(3):
            held = live_coordinator(self.root)
            if held is not None:
                raise AlreadyRunning(describe_lock(held))
            if path.exists():  # stale: set it aside (one taker wins the rename)
                try:
                    os.replace(path, path.with_name(f"lock.stale-{uuid.uuid4().hex[:8]}.json"))
                except FileNotFoundError:
                    pass
                for old in path.parent.glob("lock.stale-*.json"):
                    old.unlink(missing_ok=True)
            tmp = path.with_name(f".lock-{self._lock_token}.tmp")
            tmp.write_text(json.dumps({**mine, "heartbeat": time.time()}))
            try:
                os.link(tmp, path)  # create-if-absent, atomically
            except FileExistsError:
                continue  # another coordinator got there first: look again
            finally:
                tmp.unlink(missing_ok=True)
            break
        else:
            raise AlreadyRunning(describe_lock(read_json(path) or {}))
        self._lock_stop = threading.Event()

        def beat() -> None:
            while not self._lock_stop.wait(LOCK_BEAT_S):
                current = read_json(path) or {}
                if current.get("token") != self._lock_token:
                    log.error("[coordinator] lost the run lock to %s", describe_lock(current))
                    return
                atomic_write_json(path, {**current, "heartbeat": time.time()})

        threading.Thread(target=beat, name="coordinator-lock", daemon=True).start()

    def release_lock(self) -> None:
        if getattr(self, "_lock_stop", None) is None:
            return
        self._lock_stop.set()
        path = _lock_path(self.root)
        if (read_json(path) or {}).get("token") == self._lock_token:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ data and prompts

    def prepare_data(self) -> None:
        """Tokenize the training prompts once; later starts reuse data/train.arrow."""
        path = self.rd.data_file(TRAIN_DATA)
        if path.exists():
            return
        from shared.chat import ChatTokenizer
        from shared.data import PromptBuilder, load_rows, save_prompt_rows, split_validation
        from shared.models import find_model

        cfg = self.cfg
        tok_name = cfg.policy.tokenizer.name or cfg.policy.model_name
        tokenizer = ChatTokenizer.from_dir(find_model(tok_name))
        rows, skipped = load_rows(cfg.data.train, cfg, "train")
        rows, held_out = split_validation(rows, cfg.data.train)
        builder = PromptBuilder(cfg, tokenizer, cfg.data.train)
        kept, too_long = [], 0
        limit = min(cfg.data.max_input_seq_length, cfg.policy.max_total_sequence_length - 1)
        for r in rows:
            ids = builder.prompt_ids(r["problem"])
            if len(ids) > limit:
                too_long += 1
                continue
            kept.append({**r, "prompt_ids": ids})
        skipped["prompt_too_long"] = too_long
        if len(kept) < cfg.distillation.num_prompts_per_step:
            raise RunFailed(
                f"only {len(kept)} usable training prompts (skipped: {skipped}) but "
                f"distillation.num_prompts_per_step={cfg.distillation.num_prompts_per_step}; "
                "use a larger dataset or fewer prompts per step")
        save_prompt_rows(path, kept)
        if held_out:
            atomic_write_json(self.rd.data_file(HELDOUT), held_out)
        atomic_write_json(self.rd.data_file(DATA_SUMMARY),
                          {"train_rows": len(kept), "skipped": skipped,
                           "held_out_for_validation": len(held_out)})
        self.event("data_prepared", rows=len(kept), skipped=skipped)

    def _train_table(self) -> pa.Table:
        if not hasattr(self, "_train"):
            with pa.memory_map(str(self.rd.data_file(TRAIN_DATA))) as f:
                self._train = pa.ipc.open_file(f).read_all()
        return self._train

    def loader(self):
        from shared.data import StepLoader

        d = self.cfg.distillation
        return StepLoader(self._train_table().num_rows, d.num_prompts_per_step, d.seed,
                          self.cfg.data.shuffle)

    def num_shards(self) -> int:
        d, q = self.cfg.distillation, self.cfg.queue
        if q.prompts_per_shard > 0:
            n = -(-d.num_prompts_per_step // q.prompts_per_shard)
        else:
            # Two shards per worker so the teacher can start while generation finishes a step.
            n = 2 * max(self.plan.roles["generation"].num_tasks, self.plan.roles["teacher"].num_tasks)
        return max(1, min(n, d.num_prompts_per_step))

    def write_prompts(self, step: int) -> None:
        q = StageQueue(self.rd, step, "prompts", lease_s=self.cfg.queue.lease_s)
        n = self.num_shards()
        if q.expected() is None:
            q.expect(n)
        n = q.expected()
        for stage in WORKER_STAGES:
            sq = StageQueue(self.rd, step, stage)
            if sq.expected() is None:
                sq.expect(n)
        pending = q.pending(fast=True)  # every poll, for every step ahead: never a listing
        if not pending:
            return
        d = self.cfg.distillation
        table = self._train_table()
        positions = self.loader().rows_for_step(step)
        picked = table.take(pa.array(positions)).to_pylist()
        shards: List[List[dict]] = [[] for _ in range(n)]
        for i, r in enumerate(picked):
            for g in range(d.num_generations_per_prompt):
                shards[i * n // len(picked)].append({
                    "sample_id": f"{step:06d}-{i:05d}-{g:02d}", "step": step,
                    "problem": r["problem"], "answer": r["answer"],
                    "prompt_ids": r["prompt_ids"], "dataset": r["dataset"], "index": r["index"],
                    "static_trace": r["trace"],
                })
        for k in pending:
            q.commit(k, schemas.build_table("prompts", shards[k]))
        self.event("prompts_written", step=step, shards=n,
                   samples=len(picked) * d.num_generations_per_prompt)

    # ------------------------------------------------------------------ steps

    def trained_step(self) -> int:
        """Highest step t such that steps 1..t all have train.json."""
        t = 0
        while self.rd.train_record(t + 1).is_file():
            t += 1
        return t

    def last_checkpoint(self) -> int:
        return max(committed_steps(self.rd, CHECKPOINTS), default=0)

    def prune_weights(self, trained: int, total: int) -> List[int]:
        """Delete the weights/<v> no longer needed (weights_needed); returns the versions
        deleted. A version disappears from listings at once (renamed out of the digits'
        namespace), then its files are removed."""
        root = self.rd.weights_root
        committed = committed_steps(self.rd, WEIGHTS)
        checkpoints = committed_steps(self.rd, CHECKPOINTS)
        pending = [v for v in self.validation.versions(total) if not self.validation.is_collected(v)]
        needed = weights_needed(committed, trained, checkpoints, self.cfg.distillation.max_staleness,
                                pending, self.cfg.checkpointing.keep_weights_period)
        dropped = [v for v in committed if v not in needed]
        for v in dropped:
            doomed = root / f".pruned-{step_name(v)}-{uuid.uuid4().hex[:8]}"
            os.replace(self.rd.weights_dir(v), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        if dropped:
            self.event("weights_pruned", versions=dropped)
        return dropped

    def invalidate_after(self, ckpt: int) -> None:
        """Training restarts from checkpoint `ckpt`: steps after it are redone. Their results
        and the rollouts generated with weights that will be replaced are set aside (moved to
        quarantine/, not deleted)."""
        redone = []
        for t in active_steps(self.rd, "prompts"):
            if t <= ckpt:
                continue
            tj = self.rd.train_record(t)
            if tj.exists():
                os.replace(tj, tj.with_name(f"{TRAIN_RECORD}.superseded-{int(time.time())}"))
                redone.append(t)
            if t >= ckpt + 2:  # generated with weights of a step that is redone
                for stage in WORKER_STAGES:
                    q = StageQueue(self.rd, t, stage)
                    for k in list(q.committed()):
                        q.quarantine(k, f"redo: training resumed from checkpoint {ckpt}")
        if redone:
            self.event("steps_redone", from_checkpoint=ckpt, steps=redone)
        self.validation.invalidate_after(ckpt)

    def total_steps(self) -> int:
        d = self.cfg.distillation
        return self.loader().total_steps(d.max_num_steps, d.max_num_epochs)

    # ------------------------------------------------------------------ jobs

    def _attach_saved_jobs(self) -> List[str]:
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
        self._cancel_orphans()
        return dead

    def _cancel_orphans(self) -> None:
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
            ck = self.last_checkpoint()
            if self.trained_step() > ck:
                self.invalidate_after(ck)
        job = self.executor.submit(unit)
        # Tests kill the coordinator here (job submitted, not yet in state.json): the
        # restarted coordinator must find and cancel it (_cancel_orphans).
        for role in unit.roles:
            fault_point(f"coordinator_submitted_{role}", self.trained_step())
        saved = self.state["jobs"].get(key, {})
        self.jobs[key] = job
        attempt = saved.get("attempt", 0) + (1 if retry else 0)
        self.state["jobs"][key] = {"job_id": str(job.job_id), "attempt": attempt,
                                   "submitted": time.time(), "roles": list(unit.roles)}
        self.save_state()
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
        trained = self.trained_step()
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
                f"conf={self.root / CONFIG} launch.run_dir={self.root} "
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
                if not getattr(self, "_scheduler_down", False):
                    self.event("scheduler_unreachable", error=str(e))
                self._scheduler_down = True
                return
            if getattr(self, "_scheduler_down", False):
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
                                     self.trained_step() >= self.state.get("total_steps", 1 << 62)):
            return "done"  # its workers saw the run end
        roles = list(self.units[key].roles)
        broken = self._break_claims(job_id)
        self._mark_workers_lost(job_id, f"ended {state}")  # failed records stay as they are
        extra = {"while_coordinator_down": True} if while_coordinator_down else {}
        end = read_json(J.job_end_path(self.root, job_id)) or {}
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
        self.save_state()

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

    # ------------------------------------------------------------------ metrics

    def logged_steps(self) -> set:
        """Steps that already have their row in metrics.jsonl (a restarted coordinator that
        died between writing a row and saving state.json must not write it twice)."""
        return {r.get("step") for r in read_metrics(self.rd) if "train/loss" in r}

    def log_step(self, step: int) -> None:
        from launch.metrics import step_metrics

        if step in self._logged:
            return
        row = step_metrics(self.rd, step, self.cfg)
        # The coordinator's own cost (its process: polls, prompts, metrics) since the last row.
        cpu = time.process_time()
        row["timing/coordinator_cpu_s"] = round(cpu - self._cpu_logged, 4)
        self._cpu_logged = cpu
        append_metrics(self.rd, row)
        for stage in ("prompts", *WORKER_STAGES):  # the step is done: its summaries are final
            StageQueue(self.rd, step, stage).refresh_manifest()
        self._logged.add(step)
        if self.logger is not None:
            self.logger.log(row, step=step)
        self.state["logged_step"] = step
        parts = [f"loss={row.get('train/loss', float('nan')):.4f}",
                 f"gen_tokens/sample={row.get('train/mean_gen_tokens_per_sample', 0):.1f}",
                 f"step_time={row.get('timing/step', 0):.1f}s"]
        total = self.state["total_steps"]
        self._step_done_at[step] = time.time()
        done = sorted(self._step_done_at)
        if len(done) >= 2:
            # Recent pace (steps overlap, so per-step wall times would over-count).
            recent = done[-min(len(done), 5):]
            pace = (self._step_done_at[recent[-1]] - self._step_done_at[recent[0]]) / (len(recent) - 1)
            parts.append(f"eta={_duration(pace * (total - step))}")
        log.info("[coordinator] step %d/%d done: %s", step, total, " ".join(parts))

    def report_progress(self, trained: int) -> None:
        """One console line per change of the current step's progress: prompts written,
        rollouts generated, samples scored, and the steps trained, with the step's age."""
        step = trained + 1
        if step > self.state.get("total_steps", 0):
            return
        counts = []
        for stage in ("prompts", "rollouts", "scored"):
            q = StageQueue(self.rd, step, stage)
            expected = q.expected()
            committed = q.committed(fast=True)
            rows = sum(r.get("rows", 0) for r in committed.values())
            counts.append(f"{stage} {len(committed)}/{expected or '?'} ({rows} rows)")
        line = f"step {step}/{self.state['total_steps']}: " + " | ".join(counts)
        if line != self._last_progress:
            self._last_progress = line
            log.info("[coordinator] %s", line)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        self.rd.coordinator_dir.mkdir(parents=True, exist_ok=True)
        stop = self.rd.stop_file
        if stop.exists() and self.state.get("phase") == "finished":
            print(f"run {self.root} is already finished")
            return 0
        try:
            self.acquire_lock()
        except AlreadyRunning as e:
            print(f"sluice: a coordinator is already running {self.root} ({e}); not starting a "
                  "second one. Watch it with python -m launch.inspect; to restart it, stop it first.",
                  file=sys.stderr)
            return 2
        try:
            return self._run(stop)
        finally:
            self.release_lock()

    def _run(self, stop: Path) -> int:
        stop.unlink(missing_ok=True)
        labels = ", ".join(f"{ROLE[r].label}={p.num_nodes}x{p.gpus_per_node}GPUs"
                           for r, p in self.plan.roles.items())
        log.info(("Isolated clusters created: " if self.plan.isolated else "Clusters created: ") + labels)
        self.event("coordinator_started", pid=os.getpid(), executor=self.kind, plan=labels)
        try:
            self.prepare_data()
            self.validation.prepare()
            from launch.logger import MetricsLogger

            try:
                self.logger = MetricsLogger(self.rd, self.cfg)
            except ValueError as e:  # wandb could not start: before any job is submitted
                raise RunFailed(str(e)) from e
            total = self.total_steps()
            self.state.update(total_steps=total, phase="running")
            self.save_state()
            self._logged = self.logged_steps()
            dead = self._attach_saved_jobs()
            if self.trained_step() < total or not self.validation.done(total):
                self.ensure_jobs(dead)
            pruned_at = None
            while True:
                trained = self.trained_step()
                for t in range(1, trained + 1):
                    self.log_step(t)
                self.state["trained_step"] = trained
                self.report_progress(trained)
                for row in self.validation.poll(trained, total):
                    self.logger.log(row, step=row["step"])
                    self.event("validated", **row)
                if trained >= total and self.validation.done(total):
                    break
                # Prompts one step beyond what generation may start now (steps up to trained
                # + 1 + max_staleness): the next step's are ready when its weights land, so the
                # coordinator's own poll is never on a hand-off's path.
                ahead = 1 + self.cfg.distillation.max_staleness
                for t in range(trained + 1, min(total, trained + 1 + ahead) + 1):
                    self.write_prompts(t)
                if trained != pruned_at:  # versions fall out of use only as training progresses
                    self.prune_weights(trained, total)
                    pruned_at = trained
                self.watch_jobs()
                self.check_workers()
                self.save_state()
                if _HANDOFF.is_set():
                    self.event("coordinator_stopping", reason="time limit of its job: handing over")
                    if self.kind == "allocation":
                        self.stop_steps_for_time_limit()
                    return HANDED_OFF
                time.sleep(self.poll_s)
            return self.finish()
        except RunFailed as e:
            self.event("run_failed", reason=str(e).splitlines()[0])
            atomic_write_json(stop, {"reason": "failed", "detail": str(e)})
            self.state["phase"] = "failed"
            self.save_state()
            self.stop_all()
            print(f"sluice: run failed: {e}", file=sys.stderr)
            return 1
        finally:
            if self.logger is not None:
                self.logger.close()

    def stop_steps_for_time_limit(self) -> None:
        """The allocation's pre-timeout signal: its job steps stop as role jobs stop at theirs
        (the trainer checkpoints), within the signal's lead less a margin for the successor."""
        budget = max(10.0, self.cfg.cluster.signal_delay_s - 30.0)
        self.executor.stop_steps(list(self.jobs.values()), budget)
        self.event("steps_stopped", reason="time limit of the allocation",
                   jobs=sorted(str(j.job_id) for j in self.jobs.values()))
        self.save_state()

    def stop_all(self, timeout_s: float = 120) -> None:
        self.executor.wait_all(list(self.jobs.values()), timeout_s)

    def publish_final(self, step: int) -> Path:
        """checkpointing.save_consolidated: RUN_DIR/final, the student after the last step in
        Hugging Face format (weights/<step>, which training exported in the base model's
        dtype, with its config and tokenizer): hard links where the filesystem allows, else
        copies, committed as one directory."""
        src, final = self.rd.weights_dir(step), self.rd.final_dir
        if not is_committed_dir(src):
            raise RunFailed(f"{src} is not committed: cannot publish the final model "
                            "(checkpointing.save_consolidated)")
        tmp = temp_dir_for(final)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != COMMITTED:
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        commit_dir(tmp, final, {"step": step, "from": str(src), "format": "hf-safetensors",
                                "model_name": self.cfg.policy.model_name})
        self.event("final_published", step=step, path=str(final))
        return final

    def finish(self) -> int:
        self.state["phase"] = "finishing"
        self.save_state()
        atomic_write_json(self.rd.stop_file, {"reason": "finished"})
        self.stop_all()
        if self.cfg.checkpointing.save_consolidated:
            self.publish_final(self.state["total_steps"])
        self.state["phase"] = "finished"
        self.save_state()
        from launch.metrics import summary

        text = summary(self.rd, time.time() - self._started)
        self.event("run_finished", steps=self.state["total_steps"])
        print(text)
        return 0


class CoordinatorJob:
    """The coordinator as a Slurm job (what launch.run submits through submitit).

    Before the job's time limit (the pre-timeout signal, USR2) the coordinator hands the run
    over: it submits its successor, a job that depends on this one (afterany) and so starts
    as soon as this one ends, saves its state and exits. The successor carries on from
    RUN_DIR; the role jobs keep working meanwhile. (Requeueing the job instead would hold it
    two minutes in Slurm's requeue delay.) A job that Slurm itself requeues (preemption,
    scontrol requeue) resumes the same way in its next incarnation."""

    def __init__(self, run_dir: str):
        self.run_dir = str(run_dir)

    def __call__(self) -> int:
        signal.signal(signal.SIGUSR2, _request_handoff)  # instead of submitit's requeue
        rc = main([self.run_dir])
        if _HANDOFF.is_set() and rc == HANDED_OFF:
            return self.submit_successor()
        if rc != 0:  # the job shows FAILED in sacct, not COMPLETED
            raise RuntimeError(f"the coordinator of {self.run_dir} exited with status {rc}; "
                               "its output is above")
        return rc

    def submit_successor(self) -> int:
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        from launch.executors.slurm import submit_coordinator

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


_HANDOFF = threading.Event()
# main()'s exit status when the coordinator stopped to hand the run over to its successor.
HANDED_OFF = 3


def _request_handoff(signum, frame) -> None:
    _HANDOFF.set()


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launch.coordinator RUN_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    from launch import access
    from shared.errors import UserError

    root = Path(argv[0]).resolve()
    try:
        access.check_run_dir(root)
    except UserError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 2
    coordinator = Coordinator(root)
    access.apply_umask(coordinator.cfg.launch.share_group)
    return coordinator.run()


if __name__ == "__main__":
    sys.exit(main())

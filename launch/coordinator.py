"""The coordinator: owns a run's state machine. CPU only; never imports torch or vLLM.

    python -m launch.coordinator RUN_DIR          # what launch.run starts (job or process)

It submits the role jobs through submitit, writes each step's prompts, watches jobs and
worker heartbeats, resubmits what failed (up to launch.max_retries per role), logs metrics,
and ends the run. All of its state is in RUN_DIR, so it can be killed and restarted at any
time (launch.run on the run directory does that).

Files it writes:

    coordinator/state.json      {"jobs": {role: {task: {"job_id", "attempt", "submitted"}}},
                                 "retries": {role: n}, "phase", "total_steps", "trained_step",
                                 "resumed_from"}
    coordinator/events.jsonl    append-only, one JSON object a line: {"time", "event", ...}
    coordinator/STOP            the run is over ({"reason": ...}): workers exit
    data/train.arrow            the tokenized training prompts (fixed at the first start)
    data/summary.json           rows used and rows skipped by reason
    steps/<t>/prompts/...       prompts shards (one row per sample), and EXPECTED for the
                                rollouts and scored stages of the step
    metrics.jsonl               one JSON object per step (train/*, timing/*)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pyarrow as pa

from launch import jobs as J
from shared import schemas
from shared.partition import ROLE_LABELS, Plan
from shared.queue import RunDir, StageQueue
from shared.worker import (active_steps, atomic_write_json, is_committed_dir, load_run_config,
                           read_json)

log = logging.getLogger("sluice.coordinator")
ROLES = ("generation", "teacher", "training")


class RunFailed(Exception):
    """The run cannot go on (a role past its retry budget, a placement violation)."""


class Coordinator:
    def __init__(self, run_dir):
        self.rd = RunDir(run_dir)
        self.root = self.rd.root
        self.cfg = load_run_config(self.rd)
        run = read_json(self.rd.path("run.json"))
        if run is None:
            raise FileNotFoundError(f"{self.root}/run.json missing: not a Sluice run directory")
        self.plan = Plan.from_dict(run["plan"])
        self.kind = run["executor"]
        self.state = read_json(self.rd.path("coordinator", "state.json")) or {
            "jobs": {}, "retries": {r: 0 for r in ROLES}, "phase": "starting"}
        self.jobs: Dict[str, Dict[int, object]] = {r: {} for r in ROLES}
        self.poll_s = self.cfg.queue.poll_s
        self._events = open(self.rd.path("coordinator", "events.jsonl"), "a")
        self._last_beats: Dict[str, float] = {}
        self._started = time.time()

    # ------------------------------------------------------------------ bookkeeping

    def event(self, name: str, **fields) -> None:
        rec = {"time": round(time.time(), 3), "event": name, **fields}
        self._events.write(json.dumps(rec, sort_keys=True) + "\n")
        self._events.flush()
        os.fsync(self._events.fileno())
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        log.info("[coordinator] %s %s", name, detail)

    def save_state(self) -> None:
        atomic_write_json(self.rd.path("coordinator", "state.json"), self.state)

    # ------------------------------------------------------------------ data and prompts

    def prepare_data(self) -> None:
        """Tokenize the training prompts once; later starts reuse data/train.arrow."""
        path = self.rd.path("data", "train.arrow")
        if path.exists():
            return
        from transformers import AutoTokenizer

        from shared.data import PromptBuilder, load_rows, split_validation
        from shared.models import find_model

        cfg = self.cfg
        tok_name = cfg.policy.tokenizer.name or cfg.policy.model_name
        tokenizer = AutoTokenizer.from_pretrained(str(find_model(tok_name)))
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
        table = pa.table({
            "problem": [r["problem"] for r in kept],
            "answer": pa.array([r["answer"] for r in kept], pa.string()),
            "trace": pa.array([r["trace"] for r in kept], pa.string()),
            "index": pa.array([r["index"] for r in kept], pa.int64()),
            "dataset": [r["dataset"] for r in kept],
            "prompt_ids": pa.array([r["prompt_ids"] for r in kept], pa.list_(pa.int32())),
        })
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        os.replace(tmp, path)
        if held_out:
            atomic_write_json(self.rd.path("data", "heldout.json"), held_out)
        atomic_write_json(self.rd.path("data", "summary.json"),
                          {"train_rows": len(kept), "skipped": skipped,
                           "held_out_for_validation": len(held_out)})
        self.event("data_prepared", rows=len(kept), skipped=skipped)

    def _train_table(self) -> pa.Table:
        if not hasattr(self, "_train"):
            with pa.memory_map(str(self.rd.path("data", "train.arrow"))) as f:
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
        for stage in ("rollouts", "scored"):
            sq = StageQueue(self.rd, step, stage)
            if sq.expected() is None:
                sq.expect(n)
        pending = q.pending()
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
        while self.rd.path("steps", f"{t + 1:06d}", "train.json").is_file():
            t += 1
        return t

    def last_checkpoint(self) -> int:
        ck = self.rd.path("checkpoints")
        if not ck.is_dir():
            return 0
        steps = [int(p.name) for p in ck.iterdir() if p.name.isdigit() and is_committed_dir(p)]
        return max(steps, default=0)

    def invalidate_after(self, ckpt: int) -> None:
        """Training restarts from checkpoint `ckpt`: steps after it are redone. Their results
        and the rollouts generated with weights that will be replaced are set aside (moved to
        quarantine/, not deleted)."""
        redone = []
        for t in active_steps(self.rd, "prompts"):
            if t <= ckpt:
                continue
            tj = self.rd.path("steps", f"{t:06d}", "train.json")
            if tj.exists():
                os.replace(tj, tj.with_name(f"train.json.superseded-{int(time.time())}"))
                redone.append(t)
            if t >= ckpt + 2:  # generated with weights of a step that is redone
                for stage in ("rollouts", "scored"):
                    q = StageQueue(self.rd, t, stage)
                    for k in list(q.committed()):
                        q.quarantine(k, f"redo: training resumed from checkpoint {ckpt}")
        if redone:
            self.event("steps_redone", from_checkpoint=ckpt, steps=redone)

    def total_steps(self) -> int:
        d = self.cfg.distillation
        return self.loader().total_steps(d.max_num_steps, d.max_num_epochs)

    # ------------------------------------------------------------------ jobs

    def _attach_saved_jobs(self) -> None:
        for role, tasks in self.state.get("jobs", {}).items():
            for task, info in tasks.items():
                job = J.reattach(self.kind, self.root, role, info["job_id"])
                if J.job_state(self.kind, job) in J.LIVE_STATES:
                    self.jobs[role][int(task)] = job
                    self.event("job_reattached", role=role, task=int(task), job_id=info["job_id"])

    def submit(self, role: str, tasks: List[int], retry: bool) -> None:
        if role == "training":
            ck = self.last_checkpoint()
            if self.trained_step() > ck:
                self.invalidate_after(ck)
        new = J.submit_tasks(self.kind, self.root, self.cfg, self.plan, role, tasks)
        saved = self.state["jobs"].setdefault(role, {})
        for t, job in new.items():
            self.jobs[role][t] = job
            attempt = saved.get(str(t), {}).get("attempt", 0) + (1 if retry else 0)
            saved[str(t)] = {"job_id": str(job.job_id), "attempt": attempt, "submitted": time.time()}
        self.save_state()
        self.event("jobs_resubmitted" if retry else "jobs_submitted", role=role, tasks=tasks,
                   job_ids=[str(new[t].job_id) for t in tasks])

    def ensure_jobs(self) -> None:
        for role in ROLES:
            missing = [t for t in range(self.plan.roles[role].num_tasks) if t not in self.jobs[role]]
            if missing:
                self.submit(role, missing, retry=False)

    def _break_claims(self, job_id: str) -> int:
        """Release the claims a dead job held, so its shards are redone now, not after the lease."""
        n = 0
        for t in active_steps(self.rd, "prompts"):
            for stage in ("rollouts", "scored"):
                n += len(StageQueue(self.rd, t, stage).break_claims(job_id))
        return n

    def watch_jobs(self) -> None:
        for role in ROLES:
            for task, job in list(self.jobs[role].items()):
                state = J.job_state(self.kind, job)
                if state in J.LIVE_STATES or state == "UNKNOWN":
                    continue
                if state == "COMPLETED" and (self.state.get("phase") == "finishing" or
                                             self.trained_step() >= self.state["total_steps"]):
                    del self.jobs[role][task]  # a worker that saw the run end
                    continue
                del self.jobs[role][task]
                broken = self._break_claims(str(job.job_id))
                tail = J.stderr_tail(job)
                self.event("job_failed", role=role, task=task, job_id=str(job.job_id), state=state,
                           claims_released=broken, log=str(job.paths.stderr), last_lines=tail)
                self.state["retries"][role] = self.state["retries"].get(role, 0) + 1
                if self.state["retries"][role] > self.cfg.launch.max_retries:
                    raise RunFailed(
                        f"the {role} role failed more than launch.max_retries="
                        f"{self.cfg.launch.max_retries} times; last: job {job.job_id} task {task} "
                        f"ended {state}. Log: {job.paths.stderr}\n--- last lines ---\n{tail}\n"
                        f"Fix the cause, then resume with: python -m launch.run "
                        f"conf={self.root / 'config.yaml'} launch.run_dir={self.root} "
                        f"(or raise launch.max_retries)")
                self.submit(role, [task], retry=True)

    def check_workers(self) -> None:
        """Placement (no node shared by isolated roles) and liveness (hung workers)."""
        records = {}
        for role in ROLES:
            for p in self.rd.path("workers", role).glob("*.json") if self.rd.path("workers", role).is_dir() else []:
                info = read_json(p)
                if info and info.get("status") not in ("exited", "failed"):
                    records.setdefault(role, []).append(info)
        if self.plan.isolated:
            nodes = {r: {i["node"] for i in recs} for r, recs in records.items()}
            for a in ROLES:
                for b in ROLES:
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
                job_id = str(info.get("job_id"))
                if now - hb > 2 * lease:
                    for task, job in list(self.jobs[role].items()):
                        if str(job.job_id) == job_id:
                            self.event("worker_hung", role=role, job_id=job_id,
                                       heartbeat_age_s=round(now - hb, 1))
                            J.cancel(self.kind, job)

    # ------------------------------------------------------------------ metrics

    def log_step(self, step: int) -> None:
        from launch.metrics import step_metrics

        row = step_metrics(self.rd, step, self.cfg)
        path = self.rd.path("metrics.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.state["logged_step"] = step
        parts = [f"loss={row.get('train/loss', float('nan')):.4f}",
                 f"gen_tokens/sample={row.get('train/mean_gen_tokens_per_sample', 0):.1f}",
                 f"step_time={row.get('timing/step', 0):.1f}s"]
        log.info("[coordinator] step %d/%d done: %s", step, self.state["total_steps"], " ".join(parts))

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        self.rd.path("coordinator").mkdir(parents=True, exist_ok=True)
        stop = self.rd.path("coordinator", "STOP")
        if stop.exists() and self.state.get("phase") == "finished":
            print(f"run {self.root} is already finished")
            return 0
        stop.unlink(missing_ok=True)
        labels = ", ".join(f"{ROLE_LABELS[r]}={p.num_nodes}x{p.gpus_per_node}GPUs"
                           for r, p in self.plan.roles.items())
        log.info(("Isolated clusters created: " if self.plan.isolated else "Clusters created: ") + labels)
        self.event("coordinator_started", pid=os.getpid(), executor=self.kind, plan=labels)
        try:
            self.prepare_data()
            total = self.total_steps()
            self.state.update(total_steps=total, phase="running")
            self.save_state()
            self._attach_saved_jobs()
            self.ensure_jobs()
            logged = self.state.get("logged_step", 0)
            while True:
                trained = self.trained_step()
                for t in range(logged + 1, trained + 1):
                    self.log_step(t)
                logged = max(logged, trained)
                self.state["trained_step"] = trained
                if trained >= total:
                    break
                ahead = 1 + self.cfg.distillation.max_staleness
                for t in range(trained + 1, min(total, trained + 1 + ahead) + 1):
                    self.write_prompts(t)
                self.watch_jobs()
                self.check_workers()
                self.save_state()
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

    def stop_all(self, timeout_s: float = 120) -> None:
        live = [j for tasks in self.jobs.values() for j in tasks.values()]
        J.wait_all(self.kind, live, timeout_s)

    def finish(self) -> int:
        self.state["phase"] = "finishing"
        self.save_state()
        atomic_write_json(self.rd.path("coordinator", "STOP"), {"reason": "finished"})
        self.stop_all()
        self.state["phase"] = "finished"
        self.save_state()
        from launch.metrics import summary

        text = summary(self.rd, time.time() - self._started)
        self.event("run_finished", steps=self.state["total_steps"])
        print(text)
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launch.coordinator RUN_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    return Coordinator(argv[0]).run()


if __name__ == "__main__":
    sys.exit(main())

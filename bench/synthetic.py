"""Synthetic role workers: the real queue protocol around sleeps (benchmarks and tests only).

    python -m launch.run conf=smoke synthetic.enabled=true synthetic.workers_per_task=16 ...
    python -m bench.synthetic RUN_DIR --role generation [--step N]   # what the executors start

With ``synthetic.enabled`` the executors start this module instead of the stages, one process
per planned task, which forks ``synthetic.workers_per_task`` workers (one for training). No
torch, no vLLM, no model: a worker starts in a fraction of a second and costs a few MB, so a
2-core box runs hundreds. What each role does is the real workers' protocol, mostly their
own code:

- generation: ``stages.generate.run_worker`` itself (weights versions within max_staleness,
  validation, claims with heartbeats, commits with timings, STOP, SIGTERM) with an engine
  that sleeps ``synthetic.generate_s`` per shard, ``synthetic.reload_s`` per weights version,
  and answers every prompt with ``synthetic.response_tokens`` made-up tokens;
- teacher: ``stages.teacher_queue.TeacherQueue.serve``, rank 0's loop of stages.score (claims,
  waits, reads, commits), around ``synthetic.score_s`` per shard, committing scored shards of
  the real schema (top-k of the run's k, made up);
- training: the trainer's order of work (stages.train): resume from the newest committed
  checkpoint, read scored shards in index order as they land (verified), ``synthetic.train_s``
  per shard, publish weights/<t> (``synthetic.export_s``), checkpoint every
  checkpointing.save_period steps and on a stop, write train.json (with the ``sample_ids``
  trained, in order, so a test can check every sample is trained exactly once).

Statuses and activity logs are the real ones (shared.worker), so launch.inspect's timeline
and GPU-hour report read a synthetic run like any other.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

from shared import schemas
from shared.config import SluiceConfig
from shared.files import atomic_write_json
from shared.queue import CorruptShardError, NotCommittedError, StageQueue
from shared.rundir import CHECKPOINTS, RunDir, commit_dir, committed_steps, temp_dir_for
from shared.waiting import Pacer
from shared.worker import StopRequested, Worker, load_run_config

log = logging.getLogger("sluice.synthetic")


def _nap(worker: Worker, seconds: float) -> None:
    """Sleep as a long call does: a graceful stop abandons it (StopRequested)."""
    if seconds > 0:
        with worker.interruptible():
            time.sleep(seconds)


# ------------------------------------------------------------------ generation


class SyntheticEngine:
    """Stands in for stages.generate.Generator: the same methods, sleeps instead of vLLM."""

    def __init__(self, cfg: SluiceConfig):
        self.s = cfg.synthetic
        self.version = 0
        time.sleep(self.s.load_s)

    def load_weights(self, path, version: int) -> None:
        time.sleep(self.s.reload_s)
        self.version = version

    def generate(self, prompt_rows, batch_size: Optional[int] = None) -> dict:
        n, tokens = len(prompt_rows), self.s.response_tokens
        time.sleep(self.s.generate_s)
        return {"response_ids": [[1 + (i % 50) for i in range(tokens)]] * n,
                "response_text": ["x" * tokens] * n, "finish_reason": ["stop"] * n,
                "gen_logprobs": [[-1.0] * tokens] * n, "policy_version": [self.version] * n}

    def close(self) -> None:
        pass

    def __enter__(self) -> "SyntheticEngine":
        return self

    def __exit__(self, *exc) -> None:
        pass


def run_generation(run_dir: str, step: Optional[int]) -> int:
    from stages.generate import run_worker

    return run_worker(run_dir, step=step, make_engine=SyntheticEngine)


# --------------------------------------------------------------------- teacher


def scored_table(rollouts, k: int, teacher_model: str):
    """A scored table of the real schema for a rollouts table: made-up top-k per token."""
    responses = rollouts.column("response_ids").to_pylist()
    columns = {name: rollouts.column(name) for name in rollouts.column_names}
    columns.update(
        teacher_topk_ids=[[list(range(k))] * len(r) for r in responses],
        teacher_topk_logprobs=[[[-float(j + 1) for j in range(k)]] * len(r) for r in responses],
        sample_mask=[1] * rollouts.num_rows, teacher_model=[teacher_model] * rollouts.num_rows,
        alignment_offset=[len(p) - 1 for p in rollouts.column("prompt_ids").to_pylist()])
    return schemas.build_table("scored", columns, topk_k=k)


def run_teacher(run_dir: str, step: Optional[int]) -> int:
    from stages.teacher_queue import TeacherQueue

    worker = Worker(run_dir, "teacher")
    worker.install_stop_handler()
    cfg = worker.cfg
    k = cfg.loss_fn.teacher_k(cfg.distillation.topk_logits_k)
    tq = None
    try:
        worker.beat("loading", f"teacher {cfg.teacher.model_name} (synthetic)")
        _nap(worker, cfg.synthetic.load_s)
        tq = TeacherQueue(run_dir, cfg, worker, step)

        def score(rollouts, step: int, where: str):
            _nap(worker, cfg.synthetic.score_s)
            return scored_table(rollouts, k, cfg.teacher.model_name), {"tokens": 0, "dropped_samples": 0}

        tq.serve(score)
    except StopRequested:
        pass
    except BaseException as e:
        worker.fail(e)
        raise
    worker.finish("done" if step is not None else "exited")
    return tq.committed if tq is not None else 0


# -------------------------------------------------------------------- training


class _Stopped(Exception):
    pass


class SyntheticTrainer:
    """The trainer's order of work (stages.train.run), one process, sleeps for compute."""

    def __init__(self, rd: RunDir, worker: Worker):
        self.rd, self.worker, self.cfg = rd, worker, worker.cfg
        self.pacer = Pacer(self.cfg.queue.poll_s, self.cfg.queue.fast_poll_s)
        self.step = self.checkpointed = 0

    def restore(self, before: Optional[int]) -> int:
        steps = [s for s in committed_steps(self.rd, CHECKPOINTS) if before is None or s < before]
        self.step = self.checkpointed = steps[-1] if steps else 0
        return self.step

    def _publish(self, final: Path, meta: dict) -> None:
        # A save is never abandoned (as the trainer's): a stop is seen once it is written,
        # and the step it ends is then checkpointed.
        time.sleep(self.cfg.synthetic.export_s)
        tmp = temp_dir_for(final)
        (tmp / "synthetic.txt").write_text(f"{meta}\n")
        commit_dir(tmp, final, {**meta, "format": "synthetic"})

    def checkpoint(self) -> None:
        self.worker.beat("saving", f"step {self.step}: checkpoint")
        self._publish(self.rd.checkpoint_dir(self.step), {"step": self.step})
        self.checkpointed = self.step

    def train_step(self, t: int) -> dict:
        q = StageQueue(self.rd, t, "scored", lease_s=self.cfg.queue.lease_s)
        sample_ids: List[str] = []
        wait_s = read_s = train_s = 0.0
        index = 0
        while True:
            expected, committed = q.expected(), q.committed(fast=True)
            if expected is not None and index >= expected:
                break
            if index in committed:
                t0 = time.monotonic()
                try:
                    table = q.read(index)
                except (CorruptShardError, NotCommittedError) as e:  # pending again: redone
                    log.warning("step %d: scored shard %d unreadable, waiting for its redo: %s", t, index, e)
                    continue
                read_s += time.monotonic() - t0
                self.worker.beat("training", f"step {t}: shard {index}")
                t0 = time.monotonic()
                _nap(self.worker, self.cfg.synthetic.train_s)
                train_s += time.monotonic() - t0
                sample_ids += table.column("sample_id").to_pylist()
                index += 1
                continue
            if self.worker.should_stop():
                raise _Stopped()
            self.worker.beat("waiting", f"step {t}: {index}/{expected or '?'} scored shards read")
            t0 = time.monotonic()
            self.pacer.sleep(self.pacer.due(q, [index], committed))
            wait_s += time.monotonic() - t0
        return {"step": t, "loss": 1.0 / t, "grad_norm": 1.0, "lr": 0.0, "samples": len(sample_ids),
                "tokens": len(sample_ids) * self.cfg.synthetic.response_tokens,
                "valid_tokens": len(sample_ids) * self.cfg.synthetic.response_tokens,
                "optimizer_steps": 1, "world_size": 1, "sample_ids": sample_ids,
                "timing": {"wait_s": wait_s, "read_s": read_s, "train_s": train_s}}

    def finish_step(self, result: dict) -> None:
        t = self.step = result["step"]
        t0 = time.monotonic()
        self.worker.beat("saving", f"step {t}: weights")
        self._publish(self.rd.weights_dir(t), {"step": t, "model_name": self.cfg.policy.model_name})
        ck = self.cfg.checkpointing
        if ck.enabled and (t % ck.save_period == 0 or t >= self.cfg.distillation.max_num_steps):
            self.checkpoint()
        result["timing"]["save_s"] = time.monotonic() - t0
        atomic_write_json(self.rd.train_record(t), result)


def run_training(run_dir: str, step: Optional[int]) -> int:
    rd = RunDir(run_dir)
    worker = Worker(rd, "training")
    worker.install_stop_handler()
    cfg = worker.cfg
    trainer = None
    try:
        worker.beat("loading", f"{cfg.policy.model_name} (synthetic)")
        _nap(worker, cfg.synthetic.load_s)
        trainer = SyntheticTrainer(rd, worker)
        start = trainer.restore(before=step)
        for t in [step] if step is not None else range(start + 1, cfg.distillation.max_num_steps + 1):
            try:
                result = trainer.train_step(t)
            except (_Stopped, StopRequested):
                if cfg.checkpointing.enabled and trainer.step > trainer.checkpointed:
                    trainer.checkpoint()  # the last completed step, as the real trainer does
                break
            trainer.finish_step(result)
    except StopRequested:
        pass
    except BaseException as e:
        worker.fail(e)
        raise
    worker.finish()
    return trainer.step if trainer is not None else 0


# ------------------------------------------------------------------- processes

ROLES = {"generation": run_generation, "teacher": run_teacher, "training": run_training}


def _fork_workers(n: int, role: str, run_dir: str, step: Optional[int]) -> int:
    """`n` workers as child processes (forked after the imports: cheap); SIGTERM and SIGUSR2
    are passed on to them. Exit status: the first failure's, else 0."""
    children = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ROLES[role](run_dir, step)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)

    def forward(signum, frame) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR2, forward)
    code = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        if code == 0 and status != 0:
            code = os.waitstatus_to_exitcode(status) or 1
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--role", required=True, choices=sorted(ROLES))
    p.add_argument("--step", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_run_config(args.run_dir)
    if not cfg.synthetic.enabled:
        p.error(f"{args.run_dir}: synthetic.enabled is false; real runs start the stages")
    copies = 1 if args.role == "training" else max(1, cfg.synthetic.workers_per_task)
    if copies == 1:
        ROLES[args.role](args.run_dir, args.step)
        return 0
    return _fork_workers(copies, args.role, args.run_dir, args.step)


if __name__ == "__main__":
    sys.exit(main())

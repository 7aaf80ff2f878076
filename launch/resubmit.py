"""Redo part of a run: invalidate what is named, make sure a worker will redo it.

    python -m launch.resubmit RUN_DIR --stage teacher --step 3             # redo step 3's scored shards
    python -m launch.resubmit RUN_DIR --stage teacher --step 3 --shard 1   # just one shard
    python -m launch.resubmit RUN_DIR --stage generation --step 3          # rollouts (and their scores)
    python -m launch.resubmit RUN_DIR --stage training --step 3            # retrain from step 3
    python -m launch.resubmit RUN_DIR --stage teacher                      # only restart the workers
    python -m launch.resubmit RUN_DIR --stage teacher --step 3 --wait      # and wait until it is redone

With --wait (and --step) the command returns once the step's shards are committed again, and
fails (exit 1, with the job's log) if the one-shot job it submitted ends before that, if the
run stops first, or after --timeout seconds.

Invalidated shards are moved to quarantine/ (never deleted) and become pending. If no worker
of the role is alive (e.g. the run is finished), a one-shot job of that role processes the
step and exits; a live run's workers pick the shards up by themselves. Training cannot be
redone in isolation: its steps are set aside and the training job restarts from the
checkpoint before them (the coordinator must be running, or resume the run with launch.run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Tuple

from launch.events import append_event
from launch.executors import base as J, make_executor
from shared.errors import UserError, exit_with
from shared.files import read_json
from shared.partition import Plan
from shared.pipeline import ROLE_NAMES, redone_by
from shared.queue import StageQueue
from shared.retention import committed_checkpoints, invalidate_after
from shared.rundir import (RunDir, check_shard_index, check_step, pick_weights, weights_window,
                           worker_records)
from shared.worker import FINAL_STATUSES, load_run_config


def live_workers(rd: RunDir, role: str, lease_s: float) -> List[dict]:
    if rd.stop_file.exists():
        return []
    now = time.time()
    return [info for _, info in worker_records(rd, role)
            if info.get("status") not in FINAL_STATUSES and now - info.get("heartbeat", 0) < lease_s]


class WaitFailed(Exception):
    """--wait: the redo cannot complete (its job died, the run stopped, or time ran out)."""


def resubmit(run_dir: str, stage: str, step: Optional[int], shard: Optional[int]) -> List[str]:
    """Invalidate and make sure it is redone; returns what was done, one line each."""
    return _resubmit(run_dir, stage, step, shard)[0]


def _resubmit(run_dir: str, stage: str, step: Optional[int], shard: Optional[int]) -> Tuple[List[str], object]:
    """As resubmit; also returns the one-shot job submitted (None: none was needed)."""
    rd = RunDir(run_dir)
    run = read_json(rd.run_file)
    if run is None:
        raise UserError(f"{run_dir}: not a Sluice run directory (no run.json).")
    cfg = load_run_config(rd)
    if stage == "training":
        return _retrain(rd, run, cfg, step), None
    said: List[str] = []
    if step is not None and stage == "generation":
        _check_weights_kept(rd, cfg, step)
    executor = make_executor(run["executor"], rd.root, cfg, Plan.from_dict(run["plan"]))
    live = live_workers(rd, stage, cfg.queue.lease_s)
    if not live:  # before anything is invalidated: a job must be possible
        problem = executor.submit_problem(J.one_shot_unit(executor.units(), stage))
        if problem:
            raise UserError(f"no live {stage} worker of {rd.root} to redo it, and {problem}")
    if step is not None:
        said += _invalidate_shards(rd, stage, step, shard)
    if live:
        said.append(f"a live {stage} worker will redo it")
        return said, None
    job = executor.submit(J.one_shot_unit(executor.units(), stage), step=step)
    said.append(f"no live {stage} worker: submitted job {job.job_id}"
                + (f" to redo step {step}" if step is not None else ""))
    return said, job


def _retrain(rd: RunDir, run: dict, cfg, step: Optional[int]) -> List[str]:
    """--stage training: set the checkpoints of `step` on aside, invalidate the steps from
    `step` on, and stop the training job so that the coordinator restarts it from there."""
    if step is None:
        raise UserError("--stage training needs --step N (the first step to retrain).")
    ckpts = committed_checkpoints(rd)
    if step > 1 and step - 1 not in ckpts:
        raise UserError(f"cannot retrain from step {step}: no checkpoint of step {step - 1} "
                        f"(checkpoints: {sorted(ckpts) or 'none'}). Fix: choose a step right "
                        "after a checkpoint.")
    said = _set_aside_checkpoints(rd, step) if ckpts else []
    redone, _ = invalidate_after(rd, step - 1)
    if redone:
        append_event(rd, "steps_redone", from_checkpoint=step - 1, steps=redone)
    said.append(f"steps >= {step} will be retrained from checkpoint {step - 1}")
    said += _stop_training_jobs(rd, run, cfg)
    if rd.stop_file.exists():
        said.append(f"the run is not running: resume it with python -m launch.run "
                    f"conf={run.get('recipe')} launch.run_dir={rd.root}")
    return said


def _set_aside_checkpoints(rd: RunDir, step: int) -> List[str]:
    """Rename the checkpoints of steps >= `step` to .superseded-* (kept, no longer committed)."""
    said = []
    for p in sorted(rd.checkpoints_root.glob("[0-9]*")):
        if int(p.name) >= step:
            os.replace(p, p.with_name(f".superseded-{p.name}-{int(time.time())}"))
            said.append(f"set aside checkpoint {p.name}")
    return said


def _stop_training_jobs(rd: RunDir, run: dict, cfg) -> List[str]:
    """Cancel the run's live training jobs (the coordinator resubmits them)."""
    executor = make_executor(run["executor"], rd.root, cfg, Plan.from_dict(run["plan"]))
    state = read_json(rd.state_file, {}) or {}
    said = []
    for key, info in state.get("jobs", {}).items():
        if "training" not in info.get("roles", []):
            continue
        job = executor.reattach(key, info["job_id"])
        if executor.state(job) in J.LIVE_STATES:
            executor.cancel(job)
            said.append(f"stopped training job {info['job_id']} ({key}); the coordinator "
                        "resubmits it")
    return said


def _invalidate_shards(rd: RunDir, stage: str, step: int, shard: Optional[int]) -> List[str]:
    """Quarantine `shard` (None: every committed shard) of each of `stage`'s output stages
    at `step`, so that they are pending again."""
    said = []
    for out_stage in redone_by(stage):
        q = StageQueue(rd, step, out_stage)
        if q.expected() is None:
            raise UserError(f"step {step} has no {out_stage} stage yet. Fix: check the step "
                            f"with python -m launch.inspect {rd.root}.")
        targets = [shard] if shard is not None else sorted(q.committed())
        for k in targets:
            if q.quarantine(k, f"launch.resubmit --stage {stage}") is not None:
                said.append(f"invalidated step {step} {out_stage} shard {k} (moved to quarantine/)")
    return said


def _check_weights_kept(rd: RunDir, cfg, step: int) -> None:
    """Generation of `step` needs the student's weights of one of the steps allowed by
    max_staleness; the coordinator deletes those a run no longer needs."""
    if pick_weights(rd, step, cfg.distillation.max_staleness) is None:
        lowest = weights_window(step, cfg.distillation.max_staleness).start
        raise UserError(
            f"cannot regenerate step {step}: it needs the student's weights of step "
            f"{lowest if lowest == step - 1 else f'{lowest}..{step - 1}'} (weights/), which the run "
            "no longer keeps (pruned once no longer needed; checkpointing.keep_weights_period "
            "keeps more). Fix: rescore it with --stage teacher, or retrain from a checkpoint "
            "with --stage training --step N.")


def wait_for(run_dir: str, stage: str, step: int, job, timeout_s: Optional[float],
             poll_s: float = 0.5) -> str:
    """Block until `step`'s output stages of `stage` are complete; returns a line to print.

    Raises WaitFailed if the one-shot `job` ends first (with its log's last lines), if the run
    stops while live workers were to do it, or after `timeout_s`."""
    rd = RunDir(run_dir)
    run = read_json(rd.run_file) or {}
    executor = make_executor(run.get("executor", "local"), rd.root, load_run_config(rd),
                             Plan.from_dict(run["plan"]))
    stages = redone_by(stage)
    started = time.monotonic()
    had_stop = rd.stop_file.exists()

    def complete() -> bool:
        return all(StageQueue(rd, step, s).is_complete() for s in stages)

    while not complete():
        if job is not None:
            try:
                state = executor.state(job)
            except J.SchedulerError:
                state = "UNKNOWN"
            if state not in J.LIVE_STATES and state != "UNKNOWN" and not complete():
                raise WaitFailed(
                    f"the one-shot {stage} job {job.job_id} ended {state} before step {step}'s "
                    f"{'/'.join(stages)} shards were committed. Log: {job.paths.stderr}\n"
                    f"--- last lines ---\n{J.stderr_tail(job)}")
        elif not had_stop and rd.stop_file.exists() and not complete():
            stop = read_json(rd.stop_file, {}) or {}
            raise WaitFailed(f"the run stopped ({stop.get('reason', '?')}) before step {step}'s "
                             f"{'/'.join(stages)} shards were redone. Resume it with python -m "
                             f"launch.run conf=... launch.run_dir={rd.root}")
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise WaitFailed(f"step {step}'s {'/'.join(stages)} shards not redone after "
                             f"{timeout_s:.0f}s (--timeout). Look with python -m launch.inspect {rd.root}")
        time.sleep(poll_s)
    return f"step {step} {'/'.join(stages)} complete"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.resubmit", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--stage", required=True, choices=list(ROLE_NAMES))
    p.add_argument("--step", type=int)
    p.add_argument("--shard", type=int)
    p.add_argument("--wait", action="store_true",
                   help="with --step: wait until the step is redone (exit 1 if its job dies first)")
    p.add_argument("--timeout", type=float, default=None,
                   help="with --wait: give up after this many seconds (default: as long as the job lives)")
    return p


def _step_and_shard(args: argparse.Namespace) -> Tuple[Optional[int], Optional[int]]:
    """The checked --step and --shard; ValueError or UserError if they or --wait do not fit."""
    step = None if args.step is None else check_step(args.step)
    shard = None if args.shard is None else check_shard_index(args.shard)
    if shard is not None and step is None:
        raise UserError("--shard needs --step. Fix: add --step N.")
    if args.wait and (step is None or args.stage == "training"):
        raise UserError("--wait needs --step N and --stage generation or teacher (training "
                        "is redone by the run's coordinator).")
    return step, shard


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        step, shard = _step_and_shard(args)
        said, job = _resubmit(args.run_dir, args.stage, step, shard)
        for line in said:
            print(line, flush=True)
        if args.wait:
            try:
                print(wait_for(args.run_dir, args.stage, step, job, args.timeout))
            except WaitFailed as e:
                print(f"launch.resubmit: {e}", file=sys.stderr)
                return 1
        return 0
    except ValueError as e:
        exit_with(UserError(f"{e}. Fix: steps and shards are non-negative integers."), "launch.resubmit")
    except UserError as e:
        exit_with(e, "launch.resubmit")


if __name__ == "__main__":
    sys.exit(main())

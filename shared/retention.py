"""What a run keeps of its weights and checkpoints, and what it sets aside to redo steps.

    weights_needed(committed, trained, checkpoints, max_staleness, validations, keep_period)
    prune_weights(rd, needed)            # the coordinator, as training progresses
    prune_checkpoints(rd, ck)            # the trainer, after each checkpoint (keep_top_k)
    invalidate_after(rd, ckpt)           # training restarts from checkpoint `ckpt`

A full copy of the student per step is 8 GB for Qwen3-4B in bf16 (4 TB over 500 steps), a
checkpoint with its optimizer state three times that: both are pruned as soon as nothing can
need them. A pruned directory leaves its committed name at once (renamed out of the digits'
namespace, `.pruned-<step>-<rand>`), so no reader lists a directory being deleted, then its
files are removed. Torch-free: the coordinator and the trainer both use it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import List, Optional, Tuple

from shared.config import CheckpointingConfig
from shared.pipeline import WORKER_STAGES
from shared.queue import StageQueue
from shared.rundir import (CHECKPOINTS, TRAIN_RECORD, WEIGHTS, RunDir, active_steps, committed_steps,
                           read_metrics, step_numbers, weights_window)


# ---------------------------------------------------------------------------------- weights


def weights_needed(committed: List[int], trained: int, checkpoints: List[int], max_staleness: int,
                   validations: List[int], keep_period: Optional[int]) -> set:
    """The versions of weights/<v> a run still needs, of the `committed` ones:

    - generation: the staleness window of the step after the newest version and of the step
      before that (a generation worker may still be loading a version for a step it took
      before the newest appeared), and the same below the trained step;
    - a resume: training restarts from the newest checkpoint, and generation then starts
      from that checkpoint's weights: the same windows below the newest checkpoint;
    - validation: versions scheduled and not yet collected (`validations`);
    - the user's retention: the steps of kept checkpoints, every `keep_period`-th step.
    """
    if not committed:
        return set()
    needed = set()
    for top in (max(committed), trained, max(checkpoints, default=0)):
        for step in (top, top + 1):
            needed.update(weights_window(step, max_staleness))
    needed.update(validations)
    needed.update(checkpoints)
    if keep_period:
        needed.update(v for v in committed if v % keep_period == 0)
    return needed & set(committed)


def prune_weights(rd: RunDir, needed: set) -> List[int]:
    """Delete the committed weights/<v> not in `needed`; returns the versions deleted."""
    dropped = [v for v in committed_steps(rd, WEIGHTS) if v not in needed]
    for v in dropped:
        discard(rd.weights_dir(v))
    return dropped


# ------------------------------------------------------------------------------ checkpoints


def committed_checkpoints(rd: RunDir) -> List[int]:
    return committed_steps(rd, CHECKPOINTS)


def checkpoint_scores(rd: RunDir, metric_name: str) -> dict:
    """step -> value of checkpointing.metric_name ('val:accuracy' -> validation/accuracy,
    'train:loss' -> train/loss) from RUN_DIR/metrics.jsonl, where the run has one."""
    prefix, _, name = metric_name.partition(":")
    key = {"val": "validation", "train": "train"}.get(prefix, prefix) + "/" + name
    return {int(row["step"]): float(row[key]) for row in read_metrics(rd) if key in row}


def checkpoints_to_drop(steps: list, scores: dict, keep: int, higher_is_better: bool) -> list:
    """keep_top_k: the newest checkpoint always stays (it is what a resume needs); of the
    others, those with a score rank by it, unscored ones after them by recency."""
    if len(steps) <= max(keep, 1):
        return []
    newest, rest = steps[-1], steps[:-1]
    sign = -1.0 if higher_is_better else 1.0
    ranked = sorted(rest, key=lambda s: (s not in scores, sign * scores.get(s, 0.0), -s))
    kept = set(ranked[:max(keep, 1) - 1]) | {newest}
    return [s for s in steps if s not in kept]


def prune_checkpoints(rd: RunDir, ck: CheckpointingConfig) -> List[int]:
    """checkpointing.keep_top_k (null keeps all): delete the checkpoints it does not keep;
    returns their steps."""
    if ck.keep_top_k is None:
        return []
    dropped = checkpoints_to_drop(committed_checkpoints(rd), checkpoint_scores(rd, ck.metric_name),
                                  ck.keep_top_k, ck.higher_is_better)
    for step in dropped:
        discard(rd.checkpoint_dir(step))
    return dropped


def discard(path: Path) -> None:
    """Delete a committed directory: out of listings at once (a rename), then its files."""
    doomed = path.with_name(f".pruned-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------------- redoing


def invalidate_after(rd: RunDir, ckpt: int) -> Tuple[List[int], List[int]]:
    """Training restarts from checkpoint `ckpt`: steps after it are redone. Their results and
    the rollouts generated with weights that will be replaced are set aside (moved to
    quarantine/, or renamed .superseded-*: never deleted), and so are the validation answers
    and results of weights versions after `ckpt` (requested again when their step is trained
    again; rows already in metrics.jsonl stay, a later row for the same step supersedes them).
    Returns (the steps whose training result was set aside, the validation versions redone)."""
    redone = []
    stamp = int(time.time())
    for t in active_steps(rd, "prompts"):
        if t <= ckpt:
            continue
        tj = rd.train_record(t)
        if tj.exists():
            os.replace(tj, tj.with_name(f"{TRAIN_RECORD}.superseded-{stamp}"))
            redone.append(t)
        if t >= ckpt + 2:  # generated with weights of a step that is redone
            for stage in WORKER_STAGES:
                q = StageQueue(rd, t, stage)
                for k in list(q.committed()):
                    q.quarantine(k, f"redo: training resumed from checkpoint {ckpt}")
    versions = []
    vrd = rd.validation
    for v in step_numbers(vrd):
        if v <= ckpt:
            continue
        q = StageQueue(vrd, v, "rollouts")
        for k in list(q.committed()):
            q.quarantine(k, f"redo: training resumed from checkpoint {ckpt}")
        result = rd.validation_result(v)
        if result.exists():
            os.replace(result, result.with_name(f"{result.name}.superseded-{stamp}"))
        versions.append(v)
    return redone, versions


"""shared.retention on a run directory: what pruning deletes (and how), what a restart from a
checkpoint sets aside. The rules themselves: tests/test_weights_retention.py (weights_needed)
and tests/test_checkpoint.py (checkpoints_to_drop)."""

from __future__ import annotations

import json

from shared import retention
from shared.config import CheckpointingConfig
from shared.queue import StageQueue
from shared.retention import (committed_checkpoints, invalidate_after, prune_checkpoints,
                              prune_weights)
from shared.rundir import (RunDir, append_metrics, commit_dir, committed_steps, temp_dir_for,
                           trained_steps)
from tests.test_queue import table


def commit(rd: RunDir, final) -> None:
    tmp = temp_dir_for(final)
    (tmp / "model.safetensors").write_bytes(b"w")
    commit_dir(tmp, final, {})


def test_pruned_weights_leave_the_listing_before_their_files(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    for v in range(1, 6):
        commit(rd, rd.weights_dir(v))
    seen = []
    rmtree = retention.shutil.rmtree

    def watching_rmtree(path, **kwargs):  # what a reader lists while the files go
        seen.append(committed_steps(rd, "weights"))
        rmtree(path, **kwargs)

    monkeypatch.setattr(retention.shutil, "rmtree", watching_rmtree)
    assert prune_weights(rd, {2, 4, 5}) == [1, 3]
    assert committed_steps(rd, "weights") == [2, 4, 5]
    assert seen == [[2, 3, 4, 5], [2, 4, 5]]  # each version left the listing before its files
    assert sorted(p.name for p in rd.weights_root.iterdir()) == ["000002", "000004", "000005"]


def test_prune_checkpoints_keeps_the_newest_and_the_best(tmp_path):
    rd = RunDir(tmp_path)
    for step in (2, 4, 6, 8):
        commit(rd, rd.checkpoint_dir(step))
    for step, acc in ((2, 0.5), (4, 0.9), (6, 0.1)):
        append_metrics(rd, {"step": step, "validation/accuracy": acc})
    keep_all = CheckpointingConfig(keep_top_k=None)
    assert prune_checkpoints(rd, keep_all) == [] and committed_checkpoints(rd) == [2, 4, 6, 8]
    ck = CheckpointingConfig(keep_top_k=2, metric_name="val:accuracy", higher_is_better=True)
    assert prune_checkpoints(rd, ck) == [2, 6]
    assert committed_checkpoints(rd) == [4, 8]
    assert sorted(p.name for p in rd.checkpoints_root.iterdir()) == ["000004", "000008"]


def test_invalidate_after_sets_aside_what_a_restart_redoes(tmp_path):
    """Training restarts from checkpoint 1: the results of steps 2 and 3 are set aside;
    steps 3 and 4 were generated with weights that are redone (step 2's, with weights 1, stay);
    validations of versions 2 and 3 are redone. Nothing is deleted."""
    rd = RunDir(tmp_path)
    for step in range(1, 5):
        StageQueue(rd, step, "prompts").expect(1)
        StageQueue(rd, step, "prompts").commit(0, table("prompts", 0))
        StageQueue(rd, step, "rollouts").expect(1)
        StageQueue(rd, step, "rollouts").commit(0, table("rollouts", 0))
        if step <= 3:
            rd.train_record(step).write_text(json.dumps({"step": step}))
    vrd = rd.validation
    for v in range(1, 4):
        q = StageQueue(vrd, v, "rollouts")
        q.expect(1)
        q.commit(0, table("rollouts", 0))
        rd.validation_result(v).write_text(json.dumps({"version": v}))

    assert invalidate_after(rd, 1) == ([2, 3], [2, 3])
    assert trained_steps(rd) == [1]
    assert [len(list(rd.step_dir(t).glob("train.json.superseded-*"))) for t in (1, 2, 3)] == [0, 1, 1]
    assert [StageQueue(rd, t, "rollouts").pending() for t in range(1, 5)] == [[], [], [0], [0]]
    assert [len(list((rd.stage_dir(t, "rollouts") / "quarantine").glob("*.reason.json")))
            for t in range(1, 5)] == [0, 0, 1, 1]
    assert [StageQueue(vrd, v, "rollouts").pending() for v in (1, 2, 3)] == [[], [0], [0]]
    assert [rd.validation_result(v).exists() for v in (1, 2, 3)] == [True, False, False]
    assert all(len(list(vrd.step_dir(v).glob("result.json.superseded-*"))) == 1 for v in (2, 3))
    assert invalidate_after(rd, 1) == ([], [2, 3])  # again: nothing more to set aside

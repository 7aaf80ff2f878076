"""shared/rundir.py (the run directory's layout and readers) and shared/pipeline.py (the
table of stages and roles)."""

from __future__ import annotations

import json
import shutil

import pytest

from shared import pipeline
from shared.rundir import (TOP_ENTRIES, RunDir, append_metrics, check_shard_index, check_step,
                           commit_dir, committed_steps, last_step_on, latest_weights, pick_weights,
                           read_events, read_metrics, step_numbers, temp_dir_for, trained_steps,
                           weights_window, worker_records)


def test_layout_names(tmp_path):
    """The names users, docs and older runs know (README: The run directory)."""
    rd = RunDir(tmp_path)
    r = rd.root
    assert rd.config_file == r / "config.yaml" and rd.run_file == r / "run.json"
    assert rd.metrics_file == r / "metrics.jsonl"
    assert (rd.state_file, rd.events_file, rd.lock_file, rd.stop_file) == (
        r / "coordinator" / "state.json", r / "coordinator" / "events.jsonl",
        r / "coordinator" / "lock.json", r / "coordinator" / "STOP")
    assert rd.step_dir(7) == r / "steps" / "000007"
    assert rd.train_record(7) == r / "steps" / "000007" / "train.json"
    assert rd.shard_path(7, "scored", 3) == r / "steps" / "000007" / "scored" / "shard-00003.arrow"
    assert rd.weights_dir(12) == r / "weights" / "000012"
    assert rd.checkpoint_dir(12) == r / "checkpoints" / "000012"
    assert rd.final_dir == r / "final"
    assert rd.worker_record("teacher", "42_1", "1", 99) == r / "workers" / "teacher" / "42_1_1_99.json"
    assert rd.job_record("42_1") == r / "jobs" / "42_1.json"
    assert rd.log_dir("teacher-n0") == r / "logs" / "teacher-n0"
    assert rd.validation.step_dir(3) == r / "validation" / "steps" / "000003"
    assert len(set(TOP_ENTRIES)) == len(TOP_ENTRIES) == 14


def test_names_are_checked():
    with pytest.raises(ValueError, match=r"step=-1 must be an int in \[0, 999999\]"):
        check_step(-1)
    with pytest.raises(ValueError, match=r"step=True must be an int"):
        check_step(True)
    with pytest.raises(ValueError, match=r"shard index 100000 must be an int in \[0, 100000\)"):
        check_shard_index(100_000)
    with pytest.raises(ValueError, match="is not a shard stage; valid stages: prompts, rollouts, scored"):
        RunDir("/tmp/x").stage_dir(1, "weights")


def test_jsonl_readers_skip_a_line_cut_by_a_kill(tmp_path):
    rd = RunDir(tmp_path)
    assert read_metrics(rd) == [] and read_events(rd) == []
    append_metrics(rd, {"step": 1, "train/loss": 0.5})
    with open(rd.metrics_file, "a") as f:
        f.write('{"step": 2, "train/lo')  # the writer was killed mid-line
    assert read_metrics(rd) == [{"step": 1, "train/loss": 0.5}]
    rd.coordinator_dir.mkdir()
    rd.events_file.write_text(json.dumps({"event": "a"}) + "\n" + "{\n" + json.dumps({"event": "b"}) + "\n")
    assert [e["event"] for e in read_events(rd)] == ["a", "b"]


def test_committed_directories(tmp_path):
    rd = RunDir(tmp_path)
    assert committed_steps(rd, "weights") == [] and latest_weights(rd) == (-1, None)
    for step in (1, 3, 5):
        tmp = temp_dir_for(rd.weights_dir(step))
        (tmp / "model.safetensors").write_bytes(b"v1")
        commit_dir(tmp, rd.weights_dir(step), {"step": step})
    rd.weights_dir(7).mkdir()  # being written: no COMMITTED.json
    assert committed_steps(rd, "weights") == [1, 3, 5]
    assert latest_weights(rd) == (5, rd.weights_dir(5))
    assert latest_weights(rd, at_most=4) == (3, rd.weights_dir(3))
    # A recommit replaces the directory whole; no temp or old directory is left behind.
    tmp = temp_dir_for(rd.weights_dir(3))
    (tmp / "model.safetensors").write_bytes(b"v2")
    commit_dir(tmp, rd.weights_dir(3), {"step": 3})
    assert (rd.weights_dir(3) / "model.safetensors").read_bytes() == b"v2"
    assert sorted(p.name for p in rd.weights_root.iterdir()) == ["000001", "000003", "000005", "000007"]


def test_step_listings_and_worker_records(tmp_path):
    rd = RunDir(tmp_path)
    assert step_numbers(rd) == [] and worker_records(rd) == []
    for t in (2, 1, 3):
        rd.step_dir(t).mkdir(parents=True)
    rd.train_record(2).write_text("{}")
    (rd.root / "steps" / "notes").mkdir()
    assert step_numbers(rd) == [1, 2, 3] and trained_steps(rd) == [2]
    rd.workers_dir("teacher").mkdir(parents=True)
    rd.worker_record("teacher", "9", "0", 1).write_text(json.dumps({"role": "teacher"}))
    rd.worker_record("teacher", "9", "1", 2).write_text("{\"role\": ")  # being replaced
    assert [info for _, info in worker_records(rd, "teacher")] == [{"role": "teacher"}]
    assert [info for _, info in worker_records(rd)] == [{"role": "teacher"}]


def test_pipeline_table():
    assert pipeline.STAGES == ("prompts", "rollouts", "scored")
    assert pipeline.PRODUCER == {"prompts": "coordinator", "rollouts": "generation", "scored": "teacher"}
    assert pipeline.ROLE_NAMES == ("generation", "teacher", "training")
    assert {r: pipeline.ROLE[r].module for r in pipeline.ROLE_NAMES} == {
        "generation": "stages.generate", "teacher": "stages.score", "training": "stages.train"}
    assert pipeline.redone_by("generation") == ["rollouts", "scored"]
    assert pipeline.redone_by("teacher") == ["scored"] and pipeline.redone_by("training") == []
    # Each role reads what the one before it writes.
    for before, after in zip(pipeline.PIPELINE, pipeline.PIPELINE[1:]):
        assert after.consumes == before.produces


def test_pick_weights(tmp_path):
    rd = RunDir(tmp_path)
    assert pick_weights(rd, 1, 0) == (0, None)
    assert pick_weights(rd, 2, 0) is None  # waits for weights/000001
    assert pick_weights(rd, 2, 1) == (0, None)
    final = rd.weights_dir(1)
    final.mkdir(parents=True)  # not committed (no COMMITTED.json): invisible
    assert pick_weights(rd, 2, 0) is None
    shutil.rmtree(final)
    tmp = temp_dir_for(rd.weights_dir(1))
    (tmp / "model.safetensors").write_bytes(b"weights")
    commit_dir(tmp, rd.weights_dir(1), {"step": 1})
    assert pick_weights(rd, 2, 0) == (1, rd.weights_dir(1))
    assert pick_weights(rd, 3, 1) == (1, rd.weights_dir(1))
    assert pick_weights(rd, 3, 0) is None
    assert pick_weights(rd, 1, 0) == (0, None)  # never newer than step - 1



@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_weights_window_and_its_inverse(staleness):
    """Generation of step t may use weights t-1-max_staleness .. t-1 (never below the base
    model, version 0); last_step_on(v) is the last step whose window holds v."""
    assert list(weights_window(1, staleness)) == [0]
    assert list(weights_window(10, staleness)) == list(range(9 - staleness, 10))
    for v in range(0, 12):
        on = [t for t in range(1, 30) if v in weights_window(t, staleness)]
        assert on == list(range(v + 1, last_step_on(v, staleness) + 1))

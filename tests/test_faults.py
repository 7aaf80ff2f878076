"""Faults: a teacher killed in the middle of a step (Slurm: scancel of its job, SIGKILL of
its stage process), a coordinator killed mid-run and restarted, and one killed between
submitting a job and recording it (local executor).

Each run is the smoke recipe (3 steps). The teacher is killed as soon as a scored shard of
step 1 or 2 is committed while others of that step are not (4 shards a step:
queue.prompts_per_shard=2), preferably while it holds a claim; never after a fixed sleep.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from tests.test_e2e import (STEPS, assert_scored_exactly_once, assert_summary, check_rc, events,
                            launch, run_diagnostics, scored_records, stop_run, wait_until,
                            worker_records)

# Every run here starts a vLLM engine (generation) and torchrun (training: 2 ranks in the
# smoke plan): `make test-fast` skips them.
pytestmark = [pytest.mark.vllm, pytest.mark.dist]

# Small leases so that a stale claim would break quickly (the coordinator breaks a dead
# job's claims at once anyway); 4 scored shards per step, so a kill lands inside a step.
FAULT_OVERRIDES = ("queue.prompts_per_shard=2", "queue.lease_s=20", "queue.heartbeat_s=2")


def _pid_alive(pid: int) -> bool:
    from launch.processes import pid_alive

    return pid_alive(pid)


def _mid_step(run_dir: Path):
    """(step, committed, claimed) once step 1 or 2 has some but not all of its scored shards
    committed, and the teacher holds a claim (or two shards are done: kill anyway)."""
    from shared.queue import StageQueue
    from shared.rundir import RunDir

    rd = RunDir(run_dir)
    for t in (1, 2):
        q = StageQueue(rd, t, "scored")
        n = q.expected()
        if n is None:
            return None
        done = q.committed()
        if len(done) == n:
            continue
        claimed = [k for k in range(n) if k not in done and q.claim_info(k)]
        if done and (claimed or len(done) >= 2):
            return t, sorted(done), claimed
        return None
    return None


def _live_teacher(run_dir: Path):
    recs = [r for r in worker_records(run_dir, "teacher") if r.get("status") not in ("exited", "failed", "lost")]
    return recs[0] if len(recs) == 1 else None


def _run_with_teacher_fault(run_dir: Path, kill) -> dict:
    """Start the smoke-slurm run, call kill(worker record) mid-step, wait for the run's end."""
    result = {}

    def run():
        try:
            result["res"] = launch(run_dir, "smoke-slurm", *FAULT_OVERRIDES, timeout_s=900)
        except BaseException as e:  # pytest.fail on timeout: re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        where = wait_until(lambda: _mid_step(run_dir) or (not thread.is_alive() and "ended"), 600,
                           "a scored shard of step 1 or 2 committed with others pending", run_dir,
                           poll_s=0.05)
        assert where != "ended", f"the run ended before the fault\n{run_diagnostics(run_dir)}"
        victim = _live_teacher(run_dir)
        assert victim is not None, worker_records(run_dir, "teacher")
        kill(victim)
        result.update(victim=victim, where=where)
        thread.join(timeout=960)
        assert not thread.is_alive(), "launch.run did not return"
        if "error" in result:
            raise result["error"]
    except BaseException:
        stop_run(run_dir)
        thread.join(timeout=60)
        raise
    check_rc(result["res"], run_dir)
    return result


def _assert_teacher_recovered(run_dir: Path, result: dict, state: str) -> None:
    victim, res = result["victim"], result["res"]
    assert_summary(res.stdout, run_dir)
    assert_scored_exactly_once(run_dir)
    ev = events(run_dir)
    failed = [e for e in ev if e["event"] == "job_failed"]
    assert [(e["roles"], e["job_id"], e["state"]) for e in failed] == [(["teacher"], victim["job_id"], state)], failed
    resub = [e for e in ev if e["event"] == "job_resubmitted"]
    assert [e["roles"] for e in resub] == [["teacher"]], resub
    new_job = resub[0]["job_id"]
    # The shards were committed by the killed job and by its replacement, each exactly once.
    by = {rec["committed_by"]["job_id"] for recs in scored_records(run_dir).values() for rec in recs.values()}
    assert victim["job_id"] in by and new_job in by, (by, victim["job_id"], new_job)
    assert ev[-1]["event"] == "run_finished"
    recs = {r["job_id"]: r for r in worker_records(run_dir, "teacher")}
    # scancel's SIGTERM lets the worker stop cleanly and say so; a SIGKILLed one is marked lost.
    assert recs[victim["job_id"]]["status"] == ("stopped" if state == "CANCELLED" else "lost"), \
        recs[victim["job_id"]]
    assert recs[new_job]["node"] == victim["node"]  # the only node left free by isolation


@pytest.mark.slurm
def test_teacher_job_scancelled_mid_step(slurm_cluster, tmp_path):
    run_dir = tmp_path / "scancel"
    result = _run_with_teacher_fault(
        run_dir, lambda victim: subprocess.run(["scancel", victim["job_id"]], check=True))
    _assert_teacher_recovered(run_dir, result, "CANCELLED")


@pytest.mark.slurm
def test_teacher_process_sigkilled_mid_step(slurm_cluster, tmp_path):
    run_dir = tmp_path / "sigkill"
    result = _run_with_teacher_fault(run_dir, lambda victim: os.kill(victim["pid"], signal.SIGKILL))
    _assert_teacher_recovered(run_dir, result, "FAILED")
    failed = next(e for e in events(run_dir) if e["event"] == "job_failed")
    assert "killed by signal 9" in failed["last_lines"], failed["last_lines"]


def test_coordinator_killed_and_restarted(tmp_path):
    """Local executor: SIGKILL the detached coordinator once step 1 is trained, restart it with
    launch.run on the same directory. Its workers kept running; the new coordinator re-attaches
    them (by pid) instead of starting duplicates, and the run ends with every sample once."""
    run_dir = tmp_path / "restart"
    try:
        first = launch(run_dir, "smoke", detach=True, timeout_s=300)
        check_rc(first, run_dir)
        pid_file = run_dir / "logs" / "coordinator" / "coordinator.pid.json"
        pid = json.loads(pid_file.read_text())["pid"]
        assert f"Coordinator: local process {pid}" in first.stdout
        train1 = run_dir / "steps" / "000001" / "train.json"
        wait_until(lambda: train1.exists() or not _pid_alive(pid), 600, "step 1 trained", run_dir)
        assert _pid_alive(pid), f"the coordinator died by itself\n{run_diagnostics(run_dir)}"
        # While it runs, a second coordinator on the same run refuses to start.
        dup = launch(run_dir, "smoke", detach=False, timeout_s=120)
        assert dup.returncode == 2 and f"pid {pid}" in dup.stderr and "already running" in dup.stderr, \
            dup.stdout + dup.stderr
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _pid_alive(pid), 30, "the killed coordinator to go")
        assert not (run_dir / "coordinator" / "STOP").exists()
        state = json.loads((run_dir / "coordinator" / "state.json").read_text())
        orphans = {info["roles"][0]: info["job_id"] for info in state["jobs"].values()}
        assert sorted(state["jobs"]) == ["generation-n0", "teacher-n0", "training-n0"], state["jobs"]
        assert all(_pid_alive(int(j)) for j in orphans.values()), orphans  # the workers live on

        second = launch(run_dir, "smoke", detach=False, timeout_s=600)
        check_rc(second, run_dir)
        assert "Resuming" in second.stdout
        assert_summary(second.stdout, run_dir)
        assert_scored_exactly_once(run_dir)
        ev = events(run_dir)
        assert [e["event"] for e in ev].count("coordinator_started") == 2
        reattached = {e["roles"][0]: e["job_id"] for e in ev if e["event"] == "job_reattached"}
        assert reattached == orphans, (reattached, orphans)
        assert not [e for e in ev if e["event"] in ("job_failed", "job_resubmitted", "steps_redone")], ev
        # No second worker of any role was started.
        assert [e["event"] for e in ev].count("job_submitted") == 3
        for role in ("generation", "teacher", "training"):
            assert {r["job_id"] for r in worker_records(run_dir, role)} == {orphans[role]}, role
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, STEPS + 1))
        assert [r["step"] for r in rows if "validation/accuracy" in r] == [STEPS]
        state = json.loads((run_dir / "coordinator" / "state.json").read_text())
        assert state["phase"] == "finished" and set(state["retries"].values()) == {0}, state["retries"]
        for r in (w for role in orphans for w in worker_records(run_dir, role)):
            wait_until(lambda: not _pid_alive(r["pid"]), 30, f"{r['role']} worker pid {r['pid']} to exit")
    finally:
        pid_file = run_dir / "logs" / "coordinator" / "coordinator.pid.json"
        if pid_file.exists():
            pid = json.loads(pid_file.read_text())["pid"]
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        stop_run(run_dir)


def test_coordinator_killed_between_submit_and_state_save(tmp_path):
    """SIGKILL the coordinator right after it submitted the teacher job and before state.json
    records it (fault point). The job lives on unrecorded; the restarted coordinator finds it
    by its run's job name, cancels it and submits its own, so no second teacher works beside
    the first, and the run ends with every sample once."""
    from launch.executors.local import LocalExecutor
    from shared.partition import Plan
    from shared.worker import load_run_config

    run_dir = tmp_path / "orphan"
    try:
        first = launch(run_dir, "smoke", detach=True, timeout_s=300,
                       env={"SLUICE_FAULTS": "coordinator_submitted_teacher:0"})
        check_rc(first, run_dir)
        pid = json.loads((run_dir / "logs" / "coordinator" / "coordinator.pid.json").read_text())["pid"]
        wait_until(lambda: not _pid_alive(pid), 300, "the coordinator to kill itself after submitting", run_dir)
        state = json.loads((run_dir / "coordinator" / "state.json").read_text())
        assert set(state["jobs"]) == {"generation-n0"}, state["jobs"]  # the teacher job is unrecorded
        run = json.loads((run_dir / "run.json").read_text())
        executor = LocalExecutor(run_dir, load_run_config(run_dir), Plan.from_dict(run["plan"]))
        live = executor.live_jobs()
        orphans = [j for j, key in live.items() if key == "teacher-n0"]
        assert len(orphans) == 1 and _pid_alive(int(orphans[0])), live
        assert sorted(live.values()) == ["generation-n0", "teacher-n0"], live
        assert [j for j, key in live.items() if key == "generation-n0"] == [state["jobs"]["generation-n0"]["job_id"]]

        second = launch(run_dir, "smoke", detach=False, timeout_s=600)
        check_rc(second, run_dir)
        assert_summary(second.stdout, run_dir)
        assert_scored_exactly_once(run_dir)
        ev = events(run_dir)
        cancelled = [(e["job"], e["job_id"]) for e in ev if e["event"] == "orphan_job_cancelled"]
        assert cancelled == [("teacher-n0", orphans[0])], cancelled
        assert not _pid_alive(int(orphans[0]))
        reattached = [(e["job"], e["job_id"]) for e in ev if e["event"] == "job_reattached"]
        assert reattached == [("generation-n0", state["jobs"]["generation-n0"]["job_id"])], reattached
        # Every scored shard was committed by the teacher the second coordinator submitted.
        final = json.loads((run_dir / "coordinator" / "state.json").read_text())
        teacher = final["jobs"]["teacher-n0"]["job_id"]
        assert teacher != orphans[0]
        by = {rec["committed_by"]["job_id"] for recs in scored_records(run_dir).values() for rec in recs.values()}
        assert by <= {teacher, orphans[0]} and teacher in by, by
        for r in worker_records(run_dir, "teacher"):
            if r["job_id"] == orphans[0]:  # it exited on SIGTERM, or was marked lost
                assert r["status"] in ("exited", "lost"), r
        assert final["retries"] == {"generation-n0": 0, "teacher-n0": 0, "training-n0": 0}, final["retries"]
    finally:
        stop_run(run_dir)


def test_worker_exception_is_reported_once_in_one_form(tmp_path):
    """A worker that raises (an injected RuntimeError in the teacher's first shard of step 1)
    records its failure the way every role does (shared.worker.Worker.fail): the exception,
    where it was raised and where its traceback is. The coordinator carries that report into
    its job_failed event, resubmits the teacher, and the run ends with every sample once."""
    run_dir = tmp_path / "raise"
    res = launch(run_dir, "smoke", *FAULT_OVERRIDES, timeout_s=600,
                 env={"SLUICE_FAULTS": "score_shard:1:raise", "SLUICE_FAULTS_DIR": str(tmp_path)})
    check_rc(res, run_dir)
    assert_scored_exactly_once(run_dir)
    failed = [e for e in events(run_dir) if e["event"] == "job_failed"]
    assert [e["roles"] for e in failed] == [["teacher"]], failed
    worker = next(r for r in worker_records(run_dir, "teacher") if r["status"] == "failed")
    assert worker["job_id"] == failed[0]["job_id"]
    from shared import worker as worker_module

    at = re.fullmatch(r"RuntimeError: injected fault score_shard:1 \(at (.+):(\d+) in fault_point\); "
                      r"full traceback in (.+)/", worker["detail"])
    assert at, worker["detail"]
    assert at.group(1) == worker_module.__file__ and at.group(3) == str(run_dir.resolve() / "logs" / "teacher-n0")
    assert failed[0]["worker_said"] == [f"teacher task {worker['task_id']} on {worker['node']}: "
                                        f"{worker['detail']}"], failed[0]

"""Runs that outlive time limits, preemption and requeues; workers that stop cleanly.

    python -m pytest tests/test_time_limits.py -q       # ~12 min on 2 CPU cores

- local executor: every role's worker, sent Slurm's pre-timeout signal (USR2 to every
  process of its job, as Slurm does) or SIGTERM (likewise), stops within 60 s, releasing
  its claims, and the run goes on without a failure counted; a trainer busy in one optimizer
  batch for longer than 2 x queue.lease_s is not taken for hung.
- local Slurm cluster: a two-node trainer stops on the pre-timeout signal on both nodes; a
  run whose role jobs have 2-minute time limits crosses at least three per role, has each
  role's job and the coordinator's job requeued (scontrol requeue), hands its coordinator
  over at the coordinator's own time limit, and finishes with launch.max_retries=0, every
  sample scored exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_e2e import (REPO, check_rc, events, launch, run_diagnostics, stop_run, wait_until,
                            worker_records)

pytestmark = [pytest.mark.vllm, pytest.mark.dist]


# ---------------------------------------------------------------------------- helpers


def _alive(pid: int) -> bool:
    from launch.processes import pid_alive

    return pid_alive(pid)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[1])


def _task_of(pid: int) -> int:
    """The submitit task process (UnitTask) a worker process runs under."""
    p = pid
    while p > 1:
        if "submitit.core._submit" in _cmdline(p):
            return p
        p = _ppid(p)
    raise AssertionError(f"pid {pid} runs under no submitit task")


def _tree(pid: int) -> list:
    from launch.processes import process_tree

    return process_tree(pid)


def claims_of(run_dir: Path, job_id: str) -> list:
    out = []
    for path in run_dir.glob("steps/*/*/*.claim"):
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if str(info.get("job_id")) == str(job_id):
            out.append(str(path))
    return out


def assert_every_step_once(run_dir: Path, steps: int, samples: int) -> None:
    """Every step trained once; its scored rows are exactly its samples, each once."""
    from shared.queue import StageQueue
    from shared.rundir import RunDir

    rd = RunDir(run_dir)
    for t in range(1, steps + 1):
        assert (run_dir / "steps" / f"{t:06d}" / "train.json").exists(), t
        q = StageQueue(rd, t, "scored")
        assert q.is_complete(), t
        ids = [i for k in sorted(q.committed()) for i in q.read(k).column("sample_id").to_pylist()]
        assert len(ids) == len(set(ids)) == samples, (t, len(ids), len(set(ids)))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, steps + 1))


# ---------------------------------------------------------------------------- local executor

STOP_STEPS = 12
STOP_OVERRIDES = (f"distillation.max_num_steps={STOP_STEPS}", "distillation.val_at_end=false",
                  "queue.lease_s=20", "queue.heartbeat_s=2", "checkpointing.save_period=100")


def test_every_role_stops_cleanly_and_a_busy_trainer_is_not_hung(tiny_models, tmp_path):
    """Six stops, one per role and signal, each while the worker is mid-work (made long with
    a one-time sleep fault where the role's own work is too short to catch): the generation
    worker mid-generate holding its claim, the teacher mid-forward holding its claim, the
    trainer mid-step. Plus: the trainer sleeps 50 s in one optimizer batch (2 x lease = 40 s)
    and is not cancelled."""
    run_dir = tmp_path / "stops"
    faults = ",".join(["generate_shard:2:sleep=120", "score_shard:4:sleep=120",
                       "optimizer_batch:6:sleep=20", "generate_shard:8:sleep=120",
                       "score_shard:9:sleep=120", "optimizer_batch:3:sleep=50",
                       "optimizer_batch:11:sleep=5"])
    (tmp_path / "faults").mkdir()
    env = {"SLUICE_FAULTS": faults, "SLUICE_FAULTS_DIR": str(tmp_path / "faults")}
    result = {}

    def run():
        try:
            result["res"] = launch(run_dir, "smoke", *STOP_OVERRIDES, timeout_s=1200, env=env)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    plan = [("generation", "generating", 2, signal.SIGUSR2), ("teacher", "scoring", 4, signal.SIGUSR2),
            ("training", "training", 6, signal.SIGUSR2), ("generation", "generating", 8, signal.SIGTERM),
            ("teacher", "scoring", 9, signal.SIGTERM), ("training", "training", 11, signal.SIGTERM)]
    stops = []
    try:
        for role, status, step, sig in plan:
            def mid_work():
                for r in worker_records(run_dir, role):
                    if r.get("status") == status and f"step {step}" in r.get("detail", "") and _alive(r["pid"]):
                        return r
                return None
            victim = wait_until(lambda: mid_work() or (not thread.is_alive() and "ended"), 600,
                                f"{role} worker at work on step {step}", run_dir, poll_s=0.1)
            assert victim != "ended", f"the run ended first\n{run_diagnostics(run_dir)}"
            held = claims_of(run_dir, victim["job_id"])
            if role != "training":
                assert held, f"the {role} worker holds no claim mid-work"
            task = _task_of(victim["pid"])
            started = time.monotonic()
            for pid in _tree(task):  # as Slurm does: every process of the job step
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            wait_until(lambda: not _alive(victim["pid"]), 60, f"{role} worker {victim['pid']} to stop "
                       f"on {sig.name}", run_dir, poll_s=0.1)
            took = time.monotonic() - started
            rec = next(r for r in worker_records(run_dir, role) if r["pid"] == victim["pid"])
            stops.append((role, sig.name, round(took, 1), rec["status"]))
            assert rec["status"] == "stopped", rec
            assert claims_of(run_dir, victim["job_id"]) == [], (role, sig.name)
            end = json.loads((run_dir / "jobs" / f"{victim['job_id']}.json").read_text())
            assert end["reason"] == ("time_limit" if sig == signal.SIGUSR2 else "sigterm"), end
        thread.join(timeout=900)
        assert not thread.is_alive(), "launch.run did not return"
        if "error" in result:
            raise result["error"]
    except BaseException:
        stop_run(run_dir)
        thread.join(timeout=60)
        raise
    check_rc(result["res"], run_dir)
    print("stops (role, signal, seconds, status):", stops)
    assert all(took < 60 for _, _, took, _ in stops), stops
    assert_every_step_once(run_dir, STOP_STEPS, 16)
    ev = events(run_dir)
    names = [e["event"] for e in ev]
    assert "job_failed" not in names and "worker_hung" not in names, [e for e in ev if e["event"] in
                                                                       ("job_failed", "worker_hung")]
    ends = sorted((e["event"], e["roles"][0]) for e in ev if e["event"] in ("job_time_limit", "job_preempted"))
    assert ends == sorted([("job_time_limit", "generation"), ("job_time_limit", "teacher"),
                           ("job_time_limit", "training"), ("job_preempted", "generation"),
                           ("job_preempted", "teacher"), ("job_preempted", "training")]), ends
    state = json.loads((run_dir / "coordinator" / "state.json").read_text())
    assert set(state["retries"].values()) == {0}, state["retries"]
    # The trainer stopped mid-step with that step's shards all committed: it finished the
    # step and checkpointed it, so no step was redone (steps_redone) at either stop.
    assert "steps_redone" not in names
    # The stopped workers' replacements were back within a minute each.
    back = [e for e in ev if e["event"] == "job_back"]
    assert len(back) == 6 and all(e["down_s"] < 60 for e in back), back


# ---------------------------------------------------------------------------- local Slurm cluster


def _sacct(job_id: str) -> dict:
    fields = ["JobID", "State", "NodeList", "Start", "End"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", ",".join(fields), "-j", str(job_id)],
                         capture_output=True, text=True, check=True).stdout
    rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]
    return rows[-1] if rows else {}


@pytest.mark.slurm
def test_two_node_trainer_stops_on_the_pre_timeout_signal(slurm_cluster, tiny_models, tmp_path):
    """The pre-timeout signal (USR2 to every process of the job's step, on both nodes): both
    nodes' torchruns and ranks stop (the rank on the second node included), within 60 s, the
    trainer checkpoints its last step, and the job ends COMPLETED with the stop recorded."""
    from bench.bench_train import make_run_dir, write_scored_step
    from launch.executors.base import LIVE_STATES
    from launch.executors.slurm import SlurmExecutor
    from shared.partition import plan as make_plan
    from shared.worker import load_run_config
    from tests.test_train import DROPPED, K, ROWS, SHARDS, VOCAB

    overrides = ["policy.train_global_batch_size=8", "checkpointing.save_period=100",
                 "distillation.max_num_steps=5",
                 "distillation.resource_isolation.enabled=true", "cluster.num_nodes=4",
                 "cluster.gpus_per_node=1", "cluster.cpus_per_gpu=1",
                 "distillation.resource_isolation.roles.training.num_nodes=2",
                 "distillation.resource_isolation.roles.training.gpus_per_node=1",
                 "distillation.resource_isolation.roles.generation.gpus_per_node=1",
                 "distillation.resource_isolation.roles.teacher.gpus_per_node=1"]
    rd = make_run_dir(tmp_path / "run", overrides)
    write_scored_step(rd, 1, SHARDS, ROWS, vocab=VOCAB, k=K, dropped_rows=DROPPED)
    cfg = load_run_config(rd)
    ex = SlurmExecutor(rd.root, cfg, make_plan(cfg))
    unit = next(u for u in ex.units() if u.roles == ("training",))
    job = ex.submit(unit)
    try:
        # Step 1 trained, the trainer waits for step 2's shards (on both nodes, in collectives).
        wait_until(lambda: (rd.root / "steps" / "000001" / "train.json").exists(), 300,
                   "step 1 trained on two nodes")
        assert not (rd.root / "checkpoints" / "000001").exists()  # save_period=100
        sent = time.monotonic()
        subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
        while ex.state(job) in LIVE_STATES or ex.state(job) == "UNKNOWN":
            assert time.monotonic() - sent < 60, f"job {job.job_id} still {ex.state(job)} 60 s after USR2"
            time.sleep(0.5)
        row = _sacct(job.job_id)
        nodes = subprocess.run(["scontrol", "show", "hostnames", row["NodeList"]], capture_output=True,
                               text=True, check=True).stdout.split()
        assert row["State"] == "COMPLETED" and len(nodes) == 2, row
        logs = "\n".join(p.read_text(errors="replace") for p in Path(job.paths.folder).glob("*_log.*"))
        # Both tasks (node 0 and node 1) passed the stop to their ranks and ended normally.
        assert logs.count("worker stopped on time_limit") == 2, logs[-4000:]
        assert "Signals.SIGUSR2" not in logs and "exit -12" not in logs, logs[-4000:]
        end = json.loads((rd.root / "jobs" / f"{job.job_id}.json").read_text())
        assert end["reason"] == "time_limit" and end["job"] == "training-n0"
        # The stop saved the last completed step, so a resubmitted trainer goes on from it.
        assert (rd.root / "checkpoints" / "000001" / "COMMITTED.json").exists()
        rec = [r for r in worker_records(rd.root, "training") if r["job_id"] == str(job.job_id)]
        assert [r["status"] for r in rec] == ["stopped"], rec
    finally:
        subprocess.run(["scancel", str(job.job_id)])


LIMIT_STEPS = 120


@pytest.mark.slurm
def test_run_outlives_time_limits_requeues_and_its_coordinators_limit(slurm_cluster, tmp_path):
    run_dir = tmp_path / "long"
    overrides = ["cluster.time_limit=00:02:00", "cluster.signal_delay_s=45",
                 "cluster.coordinator.time_limit=00:03:00", "launch.max_retries=0",
                 f"distillation.max_num_steps={LIMIT_STEPS}", "distillation.val_at_end=false"]
    res = launch(run_dir, "smoke-slurm", *overrides, detach=True, timeout_s=300)
    check_rc(res, run_dir)
    first_coordinator = res.stdout.split("Coordinator: Slurm job ")[1].split()[0]

    def trained(t: int) -> bool:
        return (run_dir / "steps" / f"{t:06d}" / "train.json").exists()

    def current_job(key: str) -> str:
        return json.loads((run_dir / "coordinator" / "state.json").read_text())["jobs"][key]["job_id"]

    try:
        wait_until(lambda: trained(15), 600, "step 15 trained", run_dir)
        # Preemption of every role and of the coordinator (Slurm requeues each job under its
        # id), mid-step; at once, so that Slurm's two-minute requeue delays overlap.
        requeued = {key: current_job(key) for key in ("generation-n1", "teacher-n2", "training-n0")}
        lock = json.loads((run_dir / "coordinator" / "lock.json").read_text())
        for job_id in [*requeued.values(), str(lock["slurm_job_id"])]:
            subprocess.run(["scontrol", "requeue", job_id], check=True)
        wait_until(lambda: json.loads((run_dir / "coordinator" / "state.json").read_text()).get("phase")
                   == "finished", 1500, "the run to finish", run_dir, poll_s=2)
    except BaseException:
        stop_run(run_dir)
        for job in subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True,
                                  text=True).stdout.splitlines():
            if "coordinator" in job:
                subprocess.run(["scancel", job.split()[0]])
        raise
    assert_every_step_once(run_dir, LIMIT_STEPS, 16)
    ev = events(run_dir)
    names = [e["event"] for e in ev]
    assert "job_failed" not in names and "worker_hung" not in names and "run_failed" not in names, \
        [e for e in ev if e["event"] in ("job_failed", "worker_hung", "run_failed")]
    # The trainer checkpointed ahead of each stop: a stopped step cost only itself.
    assert "steps_redone" not in names, [e for e in ev if e["event"] == "steps_redone"]
    state = json.loads((run_dir / "coordinator" / "state.json").read_text())
    assert state["retries"] == {"generation-n1": 0, "teacher-n2": 0, "training-n0": 0}
    for key in ("generation-n1", "teacher-n2", "training-n0"):
        limits = [e for e in ev if e["event"] == "job_time_limit" and e["job"] == key]
        # >= 2 (6 when this run trained 150 steps): CI time is budgeted, and the allocation
        # executor's tests share it; 120 steps give 3-4 limits per role on a 2-core box.
        assert len(limits) >= 2, (key, len(limits))
        assert [e["job_id"] for e in ev if e["event"] == "job_requeued" and e["job"] == key] == \
            [requeued[key]], key
    # The coordinator: handed over at its own limit at least once, and came back from a requeue.
    handoffs = [e for e in ev if e["event"] == "coordinator_handoff"]
    assert handoffs and handoffs[0]["from_job"] == first_coordinator, handoffs
    assert names.count("coordinator_started") >= len(handoffs) + 2
    text = subprocess.run([sys.executable, "-m", "launch.inspect", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    assert "restarts by the scheduler (never failures)" in text and "requeued 1" in text, text

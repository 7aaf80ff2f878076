"""Where the GPU-hours go: lanes from worker activity logs, per-role busy and idle time,
GPU-hours from the workers and from sacct, the timeline PNG and launch.inspect's use of them.
A run directory written by hand with known times; sacct is fixture text or a fake on PATH.

    python -m pytest tests/test_timeline.py -q
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from launch.timeline import (category, draw, format_report, lanes, parse_sacct, role_report,
                             run_jobs, run_report, sacct_jobs, SacctError, segments)
from shared.files import atomic_write_json
from shared.partition import Plan, RolePlan, job_units
from shared.rundir import RunDir
from shared.worker import activity_path

T0 = 1_700_000_000.0
PNG = b"\x89PNG\r\n\x1a\n"

# Two nodes: the trainer on node 0 (2 GPUs); two engines (1 GPU each) and a teacher replica
# (1 GPU) share node 1, so under Slurm they are one job.
PLAN = Plan(isolated=False, num_nodes=2, gpus_per_node=4, roles={
    "training": RolePlan("training", 1, 2, 1, 2, nodes=[0], gpu_ids=[[0, 1]]),
    "generation": RolePlan("generation", 1, 2, 2, 1, nodes=[1], gpu_ids=[[0, 1]]),
    "teacher": RolePlan("teacher", 1, 1, 1, 1, nodes=[1], gpu_ids=[[2]]),
})

# (role, job, task, gpus, record status, heartbeat offset, [(offset, status, detail)], tail)
WORKERS = [
    # 100 s: loading 10, waiting 10, busy 30, committing 5, reloading 5, busy 40.
    ("generation", "101", "0", "0", "exited", 100, [
        (0, "starting", "vLLM engine on /m"), (10, "waiting", "no prompts"), (20, "generating", "step 1"),
        (50, "committing", "step 1"), (55, "loading", "weights version 1"), (60, "generating", "step 2"),
        (100, "exited", "")], ""),
    # Killed (marked lost by the coordinator): no final line, a half-written last line; ends
    # at its heartbeat (70 s): loading 10, busy 30, waiting 30.
    ("generation", "101", "1", "1", "lost", 70, [
        (0, "starting", "vLLM engine on /m"), (10, "generating", "step 1"), (40, "waiting", "")],
     '{"t": 1700000050.0, "sta'),
    # 85 s: loading 20, waiting 5, busy 50, other 10 (an unknown status).
    ("teacher", "101", "2", "2", "done", 90, [
        (5, "loading", "teacher T"), (25, "waiting", ""), (30, "scoring", "step 1"),
        (80, "frobnicating", ""), (90, "done", "")], ""),
    # 110 s on 2 GPUs: loading 20, waiting 20, busy 30, saving 10, busy 15, saving 15.
    ("training", "100", "0", "0,1", "exited", 111, [
        (0, "loading", "student"), (20, "waiting", "step 1"), (40, "training", "step 1"),
        (70, "saving", "step 1: weights"), (80, "training", "step 2"), (95, "saving", "step 2: weights"),
        (110, "exited", ""), (111, "waiting", "after the end: ignored")], ""),
]

EVENTS = [
    {"event": "job_submitted", "job": "training-n0", "roles": ["training"], "job_id": "100"},
    {"event": "job_submitted", "job": "generation+teacher-n1", "roles": ["generation", "teacher"],
     "job_id": "101"},
    {"event": "job_resubmitted", "job": "generation+teacher-n1", "roles": ["generation", "teacher"],
     "job_id": "103"},
]

# Job 100 was requeued once (two runs), 101 ran, 103 is still pending.
SACCT_GRES = """\
100|30|2024-05-01T09:58:00|2024-05-01T09:58:01|2024-05-01T09:58:31|REQUEUED|billing=2,cpu=2,gres/gpu=2,mem=8G,node=1
100|120|2024-05-01T10:00:00|2024-05-01T10:00:04|2024-05-01T10:02:04|COMPLETED|billing=2,cpu=2,gres/gpu=2,mem=8G,node=1
101|90|2024-05-01T10:00:00|2024-05-01T10:00:10|2024-05-01T10:01:40|CANCELLED by 1000|billing=4,cpu=4,gres/gpu:h100=4,gres/gpu=4,mem=16G,node=1
103|0|2024-05-01T10:03:00|Unknown|Unknown|PENDING|
"""
SACCT_NO_GRES = "\n".join(
    line.replace(",gres/gpu:h100=4", "").replace(",gres/gpu=4", "").replace(",gres/gpu=2", "")
    for line in SACCT_GRES.splitlines()) + "\n"


def make_run(tmp_path, executor: str = "local") -> RunDir:
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    atomic_write_json(rd.run_file, {"executor": executor, "plan": PLAN.to_dict()})
    for role, job, task, gpus, status, beat, lines, tail in WORKERS:
        rec = rd.worker_record(role, job, task, 4000 + int(task))
        rec.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rec, {"role": role, "job_id": job, "task_id": task, "host": "h",
                                "node": f"node{PLAN.roles[role].nodes[0]}", "pid": 4000 + int(task),
                                "gpus": gpus, "started": T0 + lines[0][0], "incarnation": 0,
                                "heartbeat": T0 + beat, "status": status, "detail": ""})
        activity_path(rec).write_text("".join(
            json.dumps({"t": T0 + t, "status": s, "detail": d}) + "\n" for t, s, d in lines) + tail)
    for step, end in ((1, 75), (2, 100)):
        rec = rd.train_record(step)
        rec.parent.mkdir(parents=True)
        rec.write_text(json.dumps({"step": step, "loss": 1.0}))
        os.utime(rec, (T0 + end, T0 + end))
    rd.coordinator_dir.mkdir()
    rd.events_file.write_text("".join(json.dumps({"time": T0, **e}) + "\n" for e in EVENTS))
    return rd


def test_categories_come_from_one_table():
    assert category("generation", "loading", "weights version 3") == "reloading"
    assert category("generation", "loading", "vLLM engine on /m") == "loading"
    assert category("teacher", "loading", "weights version 3") == "loading"
    assert category("training", "saving", "step 2: checkpoint") == "saving"
    assert category("teacher", "frobnicating") == "other"


def test_lanes_from_activity_logs(tmp_path):
    rd = make_run(tmp_path)
    got = lanes(rd)
    assert [(ln.label, ln.job_id, ln.gpus) for ln in got] == [
        ("generation task 0 @node1", "101", 1), ("generation task 1 @node1", "101", 1),
        ("teacher task 2 @node1", "101", 1), ("training task 0 @node0", "100", 2)]
    gen0, gen1, _, train = got
    assert [(a - T0, b - T0, c) for a, b, _, c in gen0.segments] == [
        (0, 10, "loading"), (10, 20, "waiting"), (20, 50, "busy"), (50, 55, "committing"),
        (55, 60, "reloading"), (60, 100, "busy")]
    # Killed: the damaged last line is skipped and the last segment ends at the heartbeat.
    assert [(a - T0, b - T0, c) for a, b, _, c in gen1.segments] == [
        (0, 10, "loading"), (10, 40, "busy"), (40, 70, "waiting")]
    # The lane ends at its final status; a line after it is ignored.
    assert train.end - T0 == 110


def test_a_status_ends_when_the_worker_left_it_and_the_record_write_is_bookkeeping():
    rows = [{"t": 10.0, "left": 10.0, "status": "waiting", "detail": ""},
            {"t": 12.5, "left": 12.0, "status": "scoring", "detail": ""},
            {"t": 20.25, "left": 20.0, "status": "committing", "detail": ""},
            {"t": 21.0, "left": 21.0, "status": "exited", "detail": ""}]
    assert segments("teacher", rows, {"heartbeat": 21.0}) == [
        (10.0, 12.0, "waiting", "waiting"), (12.0, 12.5, "bookkeeping", "bookkeeping"),
        (12.5, 20.0, "scoring", "busy"), (20.0, 20.25, "bookkeeping", "bookkeeping"),
        (20.25, 21.0, "committing", "committing")]


def test_role_report_from_workers(tmp_path):
    rep = role_report(make_run(tmp_path))
    assert list(rep) == ["generation", "teacher", "training"]
    gen = rep["generation"]
    assert (gen["workers"], gen["gpus"], gen["span_s"], gen["busy_s"]) == (2, 2, 170, 100)
    assert gen["busy_fraction"] == round(100 / 170, 4)
    assert gen["idle_s"] == {"waiting": 40, "loading": 20, "reloading": 5, "saving": 0,
                             "committing": 5, "bookkeeping": 0, "other": 0}
    assert gen["gpu_hours"] == round(170 / 3600, 6) and gen["gpu_hours_source"] == "workers"
    assert "queue_wait_s" not in gen
    teacher, train = rep["teacher"], rep["training"]
    assert (teacher["busy_s"], teacher["idle_s"]["other"], teacher["gpu_hours"]) == (50, 10, round(85 / 3600, 6))
    assert (train["span_s"], train["busy_s"], train["idle_s"]["saving"]) == (110, 45, 25)
    assert train["gpu_hours"] == round(110 * 2 / 3600, 6)
    assert format_report(rep).splitlines()[:2] == [
        "Where the GPU-hours go:",
        "  generation: 2 workers, 2 GPUs, 0.047 GPU-h (workers), busy 58.8%; idle: waiting 23.5%, "
        "loading 11.8%, reloading 2.9%, committing 2.9%"]


def test_parse_sacct():
    jobs = parse_sacct(SACCT_GRES)
    assert jobs["100"]["elapsed_s"] == 150 and jobs["100"]["runs"] == 2  # both runs count
    assert jobs["100"]["queue_wait_s"] == 5 and jobs["100"]["state"] == "COMPLETED"
    assert jobs["100"]["alloc_gpus"] == 2
    assert jobs["101"]["alloc_gpus"] == 4 and jobs["101"]["state"] == "CANCELLED"
    assert jobs["101"]["end"] - jobs["101"]["start"] == 90
    assert jobs["103"]["start"] is None and jobs["103"]["alloc_gpus"] is None
    assert parse_sacct(SACCT_NO_GRES)["101"]["alloc_gpus"] is None


def test_gpu_hours_from_sacct(tmp_path):
    rd = make_run(tmp_path, executor="slurm")
    assert {u.key for u in job_units(PLAN, merge_shared_nodes=True)} == {"training-n0", "generation+teacher-n1"}
    assert sorted(run_jobs(rd)) == ["100", "101", "103"]
    # With gres: job 101's 4 GPUs split 2:1 between generation and teacher, as the plan does.
    rep = role_report(rd, sacct=parse_sacct(SACCT_GRES))
    assert rep["training"]["gpu_hours"] == round(150 * 2 / 3600, 6)
    assert rep["generation"]["gpu_hours"] == round(90 * 4 * 2 / 3 / 3600, 6)
    assert rep["teacher"]["gpu_hours"] == round(90 * 4 * 1 / 3 / 3600, 6)
    assert {r: (v["gpu_hours_source"], v["queue_wait_s"], v["pending_jobs"]) for r, v in rep.items()} == {
        "generation": ("sacct", 10, 1), "teacher": ("sacct", 10, 1), "training": ("sacct", 5, 0)}
    assert rep["generation"]["busy_fraction"] == round(100 / 170, 4)  # still the workers' own
    assert format_report(rep).splitlines()[1].endswith("queue wait 10.0 s (1 pending)")
    # Without GPU gres (the local test cluster): the GPUs the plan gives the job's workers.
    rep = role_report(rd, sacct=parse_sacct(SACCT_NO_GRES))
    assert [rep[r]["gpu_hours"] for r in ("generation", "teacher", "training")] == [
        round(90 * 2 / 3600, 6), round(90 * 1 / 3600, 6), round(150 * 2 / 3600, 6)]
    # A job sacct does not know: that role falls back to its workers, and says why.
    partial = {k: v for k, v in parse_sacct(SACCT_GRES).items() if k != "103"}
    rep = role_report(rd, sacct=partial)
    assert rep["generation"]["gpu_hours_source"] == "workers (sacct has no record of job 103)"
    assert rep["generation"]["gpu_hours"] == round(170 / 3600, 6)
    assert rep["training"]["gpu_hours_source"] == "sacct"


def _fake_sacct(tmp_path, monkeypatch, body: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sacct"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'sacct.args'}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_run_report_calls_sacct_once_under_slurm(tmp_path, monkeypatch):
    (tmp_path / "fixture").write_text(SACCT_GRES)
    _fake_sacct(tmp_path, monkeypatch, f"cat {tmp_path / 'fixture'}")
    rep = run_report(make_run(tmp_path, executor="slurm"))
    assert (tmp_path / "sacct.args").read_text().splitlines() == [
        "-j 100,101,103 -X -P -n -D --format=JobID,ElapsedRaw,Submit,Start,End,State,AllocTRES"]
    assert rep["training"]["gpu_hours_source"] == "sacct"


def test_sacct_failure_falls_back_to_workers(tmp_path, monkeypatch):
    _fake_sacct(tmp_path, monkeypatch, "echo 'slurmdbd: connection refused' >&2; exit 1")
    with pytest.raises(SacctError, match="connection refused"):
        sacct_jobs(["100"])
    rep = run_report(make_run(tmp_path, executor="slurm"))
    assert rep["training"]["gpu_hours_source"] == "workers (sacct failed: slurmdbd: connection refused)"
    assert rep["training"]["gpu_hours"] == round(110 * 2 / 3600, 6)


def test_draw_png(tmp_path):
    rd = make_run(tmp_path)
    out = tmp_path / "plots" / "timeline.png"
    fig = draw(rd, out)
    assert out.read_bytes()[:8] == PNG
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [ln.label for ln in lanes(rd)]
    assert sorted(t.get_text() for t in ax.texts) == ["1", "2"]  # step ends
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "busy", "waiting", "loading", "reloading", "saving", "committing", "other"]
    assert "generation 59%" in fig.get_suptitle()


def test_inspect_timeline_and_json(tmp_path, capsys):
    from launch.inspect import main

    rd = make_run(tmp_path)
    out = tmp_path / "cli.png"
    assert main([str(rd.root), "--timeline", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and f"wrote {out}" in capsys.readouterr().out
    assert main([str(rd.root), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["gpu_hours"]["generation"]["busy_s"] == 100
    assert st["gpu_hours"]["training"]["gpu_hours_source"] == "workers"
    assert main([str(rd.root)]) == 0
    text = capsys.readouterr().out
    assert "Where the GPU-hours go:\n  generation: 2 workers, 2 GPUs, 0.047 GPU-h (workers), busy 58.8%" in text

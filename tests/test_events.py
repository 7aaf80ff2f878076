"""launch.events (the one writer of coordinator/events.jsonl) and launch.lock (one coordinator
per run directory), with real processes where a process's death is what matters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.events import EventLog, append_event
from launch.lock import AlreadyRunning, RunLock, describe_lock, live_coordinator
from shared.rundir import RunDir, read_events

REPO = Path(__file__).resolve().parents[1]


def test_events_are_lines_of_sorted_json(tmp_path):
    rd = RunDir(tmp_path)
    with EventLog(rd) as events:  # creates coordinator/
        events.event("job_submitted", job="training-n0", job_id="12", roles=["training"])
    append_event(rd, "coordinator_handoff", from_job="12", to_job="13")
    lines = rd.events_file.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["job_submitted", "coordinator_handoff"]
    first = json.loads(lines[0])
    assert list(first) == sorted(first) and abs(first["time"] - time.time()) < 60
    assert first["job"] == "training-n0" and first["roles"] == ["training"]


@pytest.mark.parametrize("writer", ["event_log", "append_event"])
def test_a_line_cut_by_a_killed_writer_is_ended_by_the_next_one(tmp_path, writer):
    """Both ways of writing go through the same repair: the next event is a line of its own,
    and readers skip the damaged one."""
    rd = RunDir(tmp_path)
    append_event(rd, "a")
    with open(rd.events_file, "a") as f:
        f.write('{"event": "b", "ti')  # the writer was killed mid-line
    if writer == "event_log":
        with EventLog(rd) as events:
            events.event("c", step=3)
    else:
        append_event(rd, "c", step=3)
    lines = rd.events_file.read_text().splitlines()
    assert lines[1] == '{"event": "b", "ti'
    assert json.loads(lines[2])["event"] == "c"
    assert [e["event"] for e in read_events(rd)] == ["a", "c"]


HOLD = """
import sys, time
from launch.lock import RunLock
from shared.rundir import RunDir
RunLock(RunDir(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_one_coordinator_per_run_directory(tmp_path):
    """A live holder (another process) keeps the lock; once it is killed, its lock is stale at
    once on its own host and the next coordinator takes it over."""
    rd = RunDir(tmp_path)
    rd.coordinator_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        held = live_coordinator(tmp_path)
        assert held is not None and held["pid"] == holder.pid
        assert describe_lock(held).startswith(f"pid {holder.pid} on ")
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid}"):
            RunLock(rd).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert live_coordinator(tmp_path) is None
    lock = RunLock(rd)
    lock.acquire()
    mine = json.loads(rd.lock_file.read_text())
    assert mine["pid"] == os.getpid() and mine["token"] != held["token"]
    assert not list(rd.coordinator_dir.glob("lock.stale-*.json"))  # the old one set aside, removed
    lock.release()
    assert not rd.lock_file.exists()

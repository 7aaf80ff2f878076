"""RUN_DIR/coordinator/events.jsonl: what happened to a run, one JSON object a line.

    from launch.events import EventLog, append_event
    with EventLog(rd) as events:                       # the coordinator, for its whole life
        events.event("job_submitted", job="training-n0", job_id="123")
    append_event(rd, "coordinator_handoff", from_job="123", to_job="124")   # one line, once

Each line is {"time": <unix s, 3 decimals>, "event": <name>, ...fields}, keys sorted. The file
is append-only and every writer goes through EventLog: each line is flushed and fsync'd before
the writer goes on (an event is a record of something done: it must outlast a node crash),
and a writer that opens the file after a killed one ends the half-written last line first, so
its own lines stand alone (readers, shared.rundir.read_events, skip the damaged one). Writers:
the coordinator, the process that hosts it handing the run over (launch.host), and
launch.resubmit.
"""

from __future__ import annotations

import json
import logging
import os
import time

from shared.rundir import RunDir

log = logging.getLogger("sluice.coordinator")


class RunFailed(Exception):
    """The run cannot go on (a role past its retry budget, a placement violation, no usable
    data): the coordinator records it (run_failed), writes STOP and exits 1."""


class EventLog:
    """The events file, open for appending."""

    def __init__(self, rd: RunDir):
        path = rd.events_file
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+b")
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() > 0:
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":
                # A writer killed mid-line left half a line: end it, so the next event is a
                # line of its own.
                self._file.write(b"\n")

    def event(self, name: str, **fields) -> None:
        rec = {"time": round(time.time(), 3), "event": name, **fields}
        self._file.write((json.dumps(rec, sort_keys=True, default=str) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        log.info("[coordinator] %s %s", name, " ".join(f"{k}={v}" for k, v in fields.items()))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_event(rd: RunDir, name: str, **fields) -> None:
    """One event from a process that writes no other (a coordinator job handing over)."""
    with EventLog(rd) as events:
        events.event(name, **fields)

"""Busy time from the workers' activity logs (launch.timeline) against the workers' own
timings of their work (commit records, train.json): the check the timeline tests share."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from launch.timeline import role_report
from shared.queue import StageQueue
from shared.rundir import RunDir, active_steps


def own_busy_seconds(rd: RunDir, steps) -> dict:
    """What the workers themselves timed: generation gen_s and teacher score_s (commit
    records), training read_s + train_s (train.json)."""
    own = Counter()
    for v in active_steps(rd.validation, "rollouts"):  # validation answers are generation's work
        own["generation"] += sum(r["extra"]["gen_s"] for r in StageQueue(rd.validation, v, "rollouts").committed().values())
    for t in steps:
        own["generation"] += sum(r["extra"]["gen_s"] for r in StageQueue(rd, t, "rollouts").committed().values())
        own["teacher"] += sum(r["extra"]["score_s"] for r in StageQueue(rd, t, "scored").committed().values())
        timing = json.loads(rd.train_record(t).read_text())["timing"]
        own["training"] += timing["read_s"] + timing["train_s"]
    return own


def assert_busy_agrees(rd: RunDir, steps, roles=("generation", "teacher", "training"), within=0.05):
    report, own = role_report(rd), own_busy_seconds(rd, steps)
    for role in roles:
        got = report[role]["busy_s"]
        assert abs(got - own[role]) <= within * own[role], (role, got, own[role])
        assert report[role]["busy_fraction"] == pytest.approx(got / report[role]["span_s"], abs=1e-3)
    return report

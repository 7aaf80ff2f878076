"""shared.waiting.Pacer: how long a waiting worker sleeps between looks, and when its input is due."""

from __future__ import annotations

import pytest

from shared import schemas
from shared.queue import StageQueue
from shared.waiting import Pacer


def test_pause_sleeps_poll_s_while_nothing_is_due_then_tightens_around_the_landing():
    p = Pacer(poll_s=0.5, fast_s=0.02)
    assert p.pause(None, now=100.0) == 0.5
    assert p.pause(100.2, now=100.0) == pytest.approx(0.2)  # sleep until the landing
    assert p.pause(103.0, now=100.0) == 0.5  # far off: never longer than poll_s
    assert p.pause(100.001, now=100.0) == 0.02  # never shorter than fast_s
    assert p.pause(100.0, now=100.01) == 0.02  # just overdue: fast
    assert p.pause(100.0, now=101.6) == pytest.approx(0.2)  # overdue 1.6 s: an eighth of it
    assert p.pause(100.0, now=110.0) == 0.5


def test_a_waiter_that_keeps_losing_races_backs_off_and_a_win_resets_it():
    p = Pacer(poll_s=0.5, fast_s=0.02)
    for _ in range(3):
        p.lost()
    assert p.pause(100.05, now=100.0) == pytest.approx(0.16)  # 0.02 x 2^3
    for _ in range(10):
        p.lost()
    assert p.pause(100.0, now=100.0) == 0.5
    p.won()
    assert p.pause(100.0, now=100.0) == 0.02


def test_due_is_the_awaited_claim_plus_the_producers_shortest_recent_shard(tmp_path):
    q = StageQueue(tmp_path, 1, "prompts")
    q.expect(3)
    row = {"sample_id": "s", "step": 1, "problem": "p", "answer": "a", "prompt_ids": [1], "dataset": "d",
           "index": 0}
    p = Pacer(poll_s=0.5, fast_s=0.02)
    assert p.due(q, [0, 1, 2], {}) is None  # nothing seen committed: no estimate
    for k, took in ((0, 0.8), (1, 0.3)):
        claim = q.claim(k)
        claim._info["claimed_at"] -= took  # as if the work had started `took` ago
        q.commit(k, schemas.build_table("prompts", [row]), claim=claim)
        claim.release()
    records = q.committed()
    assert p.due(q, [2], records) is None  # shard 2 is not claimed: nobody works on it
    claim = q.claim(2)
    due = p.due(q, [2], records)
    assert due == pytest.approx(claim._info["claimed_at"] + 0.3, abs=0.05)  # the shortest of 0.8 and 0.3
    claim.release()

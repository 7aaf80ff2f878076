"""How a worker waiting for its input paces its looks at the run directory.

    pacer = Pacer(cfg.queue.poll_s, cfg.queue.fast_poll_s)
    while not ready():
        pacer.sleep(pacer.due(upstream_queue, waiting_for, upstream_view))

A look costs a stat while nothing changed (shared.queue's followers), but on a shared
filesystem every look still reaches the metadata server, so looking often everywhere is not
free. Hand-offs are predictable, though: the shard a worker waits for is claimed by a
producer (its claim says since when), and the producer's earlier shards say how long a shard
takes (committed_at - claimed_at in their commit records; the shortest of the recent ones,
to wake early rather than late). So a waiter sleeps `poll_s` while nothing it waits for is
in progress, sleeps until the estimated landing while it is,
and from then looks often: every `fast_s` at first, then at intervals of an eighth of the
time it is overdue, capped at `poll_s`. An estimate that is right costs one or two looks and
a hand-off latency of about `fast_s`; one that is wrong costs a logarithmic number of looks
and at most an eighth more than the producer took beyond it. Where many waiters compete for
the same shards (hundreds of teachers), a waiter whose look found landed work already claimed
by others doubles its shortest pause each time (``lost``), so the herd settles at `poll_s`
while the workers that keep getting work keep looking fast.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Deque, Dict, Iterable, Optional

# Claims read per look to estimate a landing (the first shards waited for are enough).
MAX_CLAIMS_READ = 8
# Durations remembered per kind of hand-off (their minimum is the estimate).
HISTORY = 16


class Pacer:
    """Sleeps between a waiting worker's looks; learns how long its producers take."""

    def __init__(self, poll_s: float, fast_s: float):
        self.poll_s = float(poll_s)
        self.fast_s = min(float(fast_s), self.poll_s)
        self._durations: Dict[str, Deque[float]] = {}
        self._seen: Dict[str, set] = {}
        self.losses = 0  # looks in a row that found work only other workers' claims took

    # -- competition
    def lost(self) -> None:
        """This look found work, but other workers claimed all of it: many waiters compete
        for what lands, so this one backs off (fast_s x 2^losses) instead of joining every
        race at fast_s; the workers that keep winning keep looking fast."""
        self.losses = min(self.losses + 1, 16)

    def won(self) -> None:
        self.losses = 0

    # -- what the waiter learns
    def learn(self, kind: str, seconds: float, key=None) -> None:
        """Remember that a hand-off of `kind` took `seconds` (`key`: learn each event once)."""
        if key is not None:
            seen = self._seen.setdefault(kind, set())
            if key in seen:
                return
            seen.add(key)
            if len(seen) > 8 * HISTORY:
                seen.clear()
        if seconds >= 0:
            self._durations.setdefault(kind, deque(maxlen=HISTORY)).append(seconds)

    def typical(self, kind: str) -> Optional[float]:
        """The shortest recent duration: waking early costs a few looks (the overdue backoff),
        waking late costs latency, up to the estimate's error."""
        durations = self._durations.get(kind)
        return min(durations) if durations else None

    def learn_records(self, stage: str, records: Dict[int, dict], step: int) -> None:
        """The producer's time per shard from commit records: committed_at - claimed_at. Only
        the highest-indexed HISTORY records (the latest, as shards are claimed in index
        order): a look costs the same at 64 shards as at 4096."""
        for index in sorted(records)[-HISTORY:]:
            r = records[index]
            start, end = r.get("claimed_at"), r.get("committed_at")
            if isinstance(start, (int, float)) and isinstance(end, (int, float)):
                self.learn(stage, end - start, key=(step, index, r.get("commit_id")))

    # -- when a result is due
    def due(self, queue, waiting_for: Iterable[int], committed: Dict[int, dict]) -> Optional[float]:
        """When the first of `waiting_for` (shards of `queue` not yet committed) may land: its
        claim's start plus the producer's typical time per shard; None while none of them is
        claimed (nobody works on it) or before any shard of the stage was seen committed."""
        self.learn_records(queue.stage, committed, queue.step)
        typical = self.typical(queue.stage)
        if typical is None:
            return None
        landings = []
        for index in list(waiting_for)[:MAX_CLAIMS_READ]:
            info = queue.claim_info(index)
            if info is not None and isinstance(info.get("claimed_at"), (int, float)):
                landings.append(info["claimed_at"] + typical)
        return min(landings, default=None)

    # -- sleeping
    @staticmethod
    def earliest(a: Optional[float], b: Optional[float]) -> Optional[float]:
        """The sooner of two due times, either of which may be unknown (None)."""
        return b if a is None else a if b is None else min(a, b)

    def pause(self, due_at: Optional[float], now: Optional[float] = None) -> float:
        """How long to sleep before the next look (see the module docstring)."""
        now = time.time() if now is None else now
        if due_at is None:
            return self.poll_s
        floor = self.fast_s * 2 ** self.losses
        if due_at > now:
            return min(self.poll_s, max(floor, due_at - now))
        return min(self.poll_s, max(floor, (now - due_at) / 8))

    def sleep(self, due_at: Optional[float]) -> float:
        seconds = self.pause(due_at)
        time.sleep(seconds)
        return seconds

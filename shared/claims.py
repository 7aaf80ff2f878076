"""Claims on shards: exactly one worker processes a shard, and a dead worker's shard is
redone after a lease (shared.queue uses this for every stage).

    claim = acquire(stage_dir / "shard-00003.arrow.claim", 3, Owner.from_env(), lease_s=60)
    if claim is not None:                 # None: another worker holds a fresh claim
        with claim.start_heartbeat():     # refreshes the lease until released
            ...                           # claim.held() before publishing the work

A claim file holds {"format": "sluice.claim/1", "claim_id", "index", "job_id", "task_id",
"host", "pid", "claimed_at", "heartbeat"}.

Why the protocol is safe: the claim file is created with O_CREAT|O_EXCL, so one creator
wins. The holder keeps the file open and refreshes ``heartbeat`` by rewriting *its own open
file* (pwrite + ftruncate), never by path: writing by path could overwrite the claim of a
worker that broke ours. A claim is stale when ``now - max(heartbeat, file mtime) > lease_s``
(hosts' clocks must agree to well within ``lease_s``; NTP does). Breaking a stale claim
(``displace``): rename it to a unique ``.broken.<uuid>`` name (one renamer wins), then check
that the renamed file is the one judged stale (same inode and claim_id); if it is not, we
moved a fresh claim created by another breaker, so we put it back with ``os.link`` (atomic,
fails if the name is taken) and lose. Only the winner then creates a new claim with O_EXCL.
A holder detects that its claim was broken (the path no longer names its open file) in
``heartbeat``/``held``. Heartbeat every ``lease_s / 4`` or more often
(``Claim.start_heartbeat``). Releasing goes through the same rename-check: a holder never
unlinks someone else's claim.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from shared import jobenv
from shared.files import json_bytes, unlink

log = logging.getLogger("sluice.queue")


@dataclass(frozen=True)
class Owner:
    """Who holds a claim; recorded in claims and commit records."""

    job_id: str | None
    task_id: str | None
    host: str
    pid: int

    @classmethod
    def from_env(cls) -> "Owner":
        # The job id as the coordinator knows it, so it can find a dead job's claims.
        return cls(job_id=jobenv.job_id(), task_id=jobenv.task_id(), host=socket.gethostname(),
                   pid=os.getpid())


@dataclass
class ClaimSeen:
    """What a would-be breaker saw of a claim file: enough to recognise that exact file later."""

    dev: int
    ino: int
    mtime_ns: int
    size: int
    info: dict | None  # parsed JSON, None while being written or if damaged

    @property
    def heartbeat(self) -> float:
        hb = self.info.get("heartbeat") if isinstance(self.info, dict) else None
        mtime = self.mtime_ns / 1e9
        return max(float(hb), mtime) if isinstance(hb, (int, float)) else mtime

    def same_file(self, other: "ClaimSeen") -> bool:
        if (self.dev, self.ino) != (other.dev, other.ino):
            return False
        if isinstance(self.info, dict) and isinstance(other.info, dict):
            # Inode numbers are reused once a file is deleted; the claim_id is not.
            return self.info.get("claim_id") == other.info.get("claim_id")
        return (self.mtime_ns, self.size) == (other.mtime_ns, other.size)


def look(path: Path) -> ClaimSeen | None:
    """What the claim file at ``path`` is now (None: there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        info = json.loads(raw)
    except ValueError:
        info = None  # the holder is between ftruncate and write: its mtime is fresh
    return ClaimSeen(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, info)


class Claim:
    """A held claim on one shard. Use as a context manager, or call ``release``."""

    def __init__(self, path: Path, index: int, owner: Owner, lease_s: float, fd: int, info: dict):
        self.path, self.index, self.owner, self.lease_s = path, index, owner, lease_s
        self.claim_id = info["claim_id"]
        self._fd: int | None = fd
        self._info = info
        self._io_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def __repr__(self) -> str:
        return f"Claim({str(self.path)!r}, lost={self.lost})"

    def held(self) -> bool:
        """True while ``path`` still names the file we created (nobody broke the claim)."""
        with self._io_lock:
            if self._fd is None:
                return False
            try:
                mine, now = os.fstat(self._fd), os.stat(self.path)
            except FileNotFoundError:
                self.lost = True
                return False
            if (mine.st_dev, mine.st_ino) != (now.st_dev, now.st_ino):
                self.lost = True
            return not self.lost

    def heartbeat(self) -> bool:
        """Refresh the lease; False (and ``lost``) when the claim was broken meanwhile."""
        if not self.held():
            return False
        with self._io_lock:
            if self._fd is None:
                return False
            self._info["heartbeat"] = time.time()
            data = json_bytes(self._info)
            # Through our own descriptor: only ever touches the file we created.
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
            os.fsync(self._fd)
        return self.held()

    def start_heartbeat(self, interval_s: float | None = None) -> "Claim":
        """Heartbeat from a daemon thread every ``interval_s`` (default lease/4) until released."""
        if self._thread is None:
            interval = self.lease_s / 4 if interval_s is None else interval_s

            def loop() -> None:
                while not self._stop.wait(interval):
                    if not self.heartbeat():
                        log.warning("%s: claim lost (broken by another worker after the lease expired)", self.path)
                        return

            self._thread = threading.Thread(target=loop, name=f"heartbeat-{self.path.name}", daemon=True)
            self._thread.start()
        return self

    def release(self) -> None:
        """Stop heartbeating and remove the claim file if it is still ours. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._io_lock:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            st = os.fstat(fd)
            mine = ClaimSeen(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, dict(self._info))
            if not self.lost:
                # Same rename-check-restore as breaking: never unlink someone else's claim.
                displace(self.path, mine)
        finally:
            os.close(fd)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def displace(path: Path, seen: ClaimSeen) -> bool:
    """Remove the claim file at ``path`` iff it is the file ``seen`` describes.

    Rename first (atomic, one winner), then check what we renamed; a different file (a
    fresh claim) is linked back, which fails harmlessly if the name was taken meanwhile.
    """
    aside = path.with_name(f"{path.name}.broken.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    got = look(aside)
    if got is not None and seen.same_file(got):
        unlink(aside)
        return True
    try:
        os.link(aside, path)
    except FileExistsError:
        log.warning("%s: displaced a live claim that could not be restored; its holder will see it lost", path)
    unlink(aside)
    return False


def acquire(path: Path, index: int, owner: Owner, lease_s: float) -> Claim | None:
    """Claim the file ``path`` (shard ``index``) for ``owner``; None while another holder's
    claim is fresh. A stale one is broken (``displace``) and claimed anew."""
    for _ in range(2):
        claim = _create(path, index, owner, lease_s)
        if claim is not None:
            return claim
        try:  # a heartbeat rewrites the file: a fresh mtime is a fresh claim, no read
            if time.time() - os.stat(path).st_mtime <= lease_s:
                return None
        except FileNotFoundError:
            continue  # released between our create and stat: try once more
        seen = look(path)
        if seen is None:
            continue  # released between our create and look: try once more
        age = time.time() - seen.heartbeat
        if age <= lease_s:
            return None
        if not displace(path, seen):
            return None
        log.warning(
            "%s: broke a stale claim (heartbeat %.1fs old > lease %.1fs) held by %s",
            path, age, lease_s, seen.info,
        )
        return _create(path, index, owner, lease_s)
    return None


def _create(path: Path, index: int, owner: Owner, lease_s: float) -> Claim | None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    now = time.time()
    info = {"format": "sluice.claim/1", "claim_id": uuid.uuid4().hex, "index": index,
            **asdict(owner), "claimed_at": now, "heartbeat": now}
    try:
        # No fsync: until the first heartbeat flushes it, another node may see an empty
        # claim, which counts as fresh by its mtime. Creation itself is atomic (O_EXCL).
        os.write(fd, json_bytes(info))
    except BaseException:
        os.close(fd)
        unlink(path)
        raise
    return Claim(path, index, owner, lease_s, fd, info)

"""The filesystem queue: shards, commit records, claims and quarantine under RUN_DIR/steps.

    from shared.queue import StageQueue
    from shared.rundir import RunDir
    q = StageQueue(RunDir("runs/x"), step=7, stage="rollouts")
    q.expect(8)                                  # coordinator: the stage has 8 shards
    while not q.is_complete():                   # a worker
        c = q.claim_next()                       # None: everything left is claimed by others
        if c is None: time.sleep(1); continue
        with c.start_heartbeat():                # refreshes the lease until released
            q.commit(c.index, make_table(c.index), claim=c)
    table = q.read(3)                            # checksum-verified pyarrow.Table

On-disk layout of one stage directory, ``RUN_DIR/steps/<step:06d>/<stage>/``:

    shard-00003.arrow             the shard: an Arrow IPC file (schema: shared/schemas.py);
                                  never pickled, so reading it never runs code
    shard-00003.arrow.meta.json   its commit record; the shard is committed iff this exists:
                                  {"format": "sluice.shard-record/1", "index": 3, "rows": 16,
                                   "bytes": 123456, "checksum": "xxh3_128:<hex of file bytes>",
                                   "schema_version": 1, "compression": null, "commit_id": "<uuid>",
                                   "committed_at": <unix s>, "committed_by": {owner},
                                   "claimed_at": <unix s or null>, "extra": {}}
    shard-00003.arrow.claim       a live claim: {"format": "sluice.claim/1", "claim_id", "index",
                                   "job_id", "task_id", "host", "pid", "claimed_at", "heartbeat"}
    EXPECTED.json                 {"format": "sluice.expected/1", "expected": 8}, set once
    COMMITS.log                   the stage's change journal, one line per change:
                                  "+3 <commit_id>" after shard 3's record is written,
                                  "-3 <commit_id>" before a record is removed (quarantine);
                                  a hint for followers (``committed(fast=True)``), never the
                                  truth: the records are
    MANIFEST.json                 summary derived from EXPECTED.json and every commit record:
                                  {"format": "sluice.manifest/1", "step", "stage", "expected",
                                   "committed": {"shard-00003.arrow": <record>, ...},
                                   "n_committed", "rows", "bytes", "complete"}
    quarantine/shard-00003.arrow.<utc>.<rand>              a shard that failed verification
    quarantine/shard-00003.arrow.<utc>.<rand>.reason.json  why: {"reason", "record", ...}
    .shard-00003.arrow.<host>.<pid>.<rand>.tmp             a write in progress (or orphaned)

Commit protocol (why each step is there):
  1. Serialize the table into a temp file in the same directory, hashing the bytes on their
     way (xxh3_128) and starting their writeback as they go; fsync. A killed writer leaves
     only a temp file, never a partial final name.
  2. If the shard was already committed, delete its record first: between the data replace
     and the new record, a reader then sees "not committed", never old record + new bytes.
  3. ``os.replace`` the temp file onto ``shard-XXXXX.arrow``.
  4. Write the record atomically (temp + fsync + replace), then fsync the directory once.
     Data before record: a writer killed between 3 and 4 leaves an unrecorded file that is
     simply redone. (Should a machine crash persist the record's rename but not the data's,
     the checksum catches it: the shard is quarantined and redone.)
  5. Append "+<index> <commit_id>" to COMMITS.log (one O_APPEND write, no fsync).
A commit costs the same whatever the number of shards: it lists nothing and rewrites no
summary (a manifest rebuilt from a scan at every commit made a step's commits quadratic).

Following a stage without listing it: ``committed(fast=True)`` (and ``pending``,
``is_complete``) keeps, per process and stage, what it has seen and the journal offset it
read to; a look reads only the journal's new lines and the records they name (re-read: a
line is a hint that something changed, the record says what), so a poll costs a stat while
nothing changes and O(new commits) when something does, not a listing of thousands of
files. The journal is a hint because appends from several nodes are not atomic everywhere
(NFS): a full scan of the records reconciles every ``RESCAN_S`` seconds, when the journal
was replaced or shrank, and whenever the truth is asked for (``fast=False``, the default).
Removal logs before it unlinks, commit after it writes, so a process killed in between
leaves a line whose record re-read still says the truth.

MANIFEST.json is a summary for people and tools: written by ``expect``, by the coordinator
once a stage is complete (``refresh_manifest``), by ``quarantine`` and by ``verify``; it may
lag while a stage fills. It is only ever rebuilt from a scan of all records, never
read-modify-written, and atomically replaced; a writer rescans after its replace and
rewrites until the scan equals what it wrote, so concurrent refreshes never lose an entry.
No lock is needed (flock is unreliable on some cluster filesystems). Readers that need the
truth (``committed``, ``pending``, ``read``) use the records themselves.

Claims (shared/claims.py says why the protocol is safe): a worker claims shard k by creating
``shard-0000k.arrow.claim`` with O_CREAT|O_EXCL and keeps its heartbeat fresh; a claim older
than ``lease_s`` is broken (race-safe) and the shard redone. ``claim`` checks for a commit
record *after* acquiring, so a shard committed and released by another worker a moment
earlier is never redone, and ``commit(..., claim=c)`` refuses to commit for a lost claim.
What leases cannot exclude: a worker frozen for longer than the lease (no heartbeat) that
wakes between its last ``held`` check and its replace; its commit then atomically replaces
an equivalent shard (stages are idempotent), and each commit gets its own record, so nothing
is counted twice.

Integrity: ``read`` and ``verify`` check size, checksum, Arrow parse, row count and schema
version against the record. A mismatch moves the file to ``quarantine/`` with a reason
file, deletes the record (the shard is pending again, so a worker redoes it) and raises
``CorruptShardError``. A schema version mismatch raises ``SchemaVersionError`` and leaves
the file alone: it is not damage, and redoing it is an operator's decision.

Names from outside (steps, stages, shard indices, relative paths) are validated; anything
that would resolve outside RUN_DIR (``..``, absolute paths, escaping symlinks) raises
ValueError.
"""

from __future__ import annotations

import collections
import ctypes
import datetime
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, get_args

import pyarrow as pa
import xxhash

from shared import schemas
from shared.claims import Claim, Owner, acquire, displace, look
from shared.config import Compression
from shared.files import atomic_write_bytes, fsync_dir, json_bytes, temp_name, unlink
from shared.pipeline import PRODUCER, check_stage
from shared.rundir import (EXPECTED, MAX_SHARDS, SHARD_RE, RunDir, check_shard_index, check_step,
                           parse_shard_name, shard_name)

log = logging.getLogger("sluice.queue")

MANIFEST = "MANIFEST.json"
JOURNAL = "COMMITS.log"
# A follower of a stage (committed(fast=True)) rescans the records at least this often.
RESCAN_S = 30.0
QUARANTINE = "quarantine"
RECORD_SUFFIX = ".meta.json"
CLAIM_SUFFIX = ".claim"
COMPRESSIONS = (None, *get_args(Compression))
_HASH = "xxh3_128"


class CorruptShardError(Exception):
    """A committed shard failed verification; it was quarantined and is pending again."""

    def __init__(self, path: Path, reason: str, quarantined_to: Path | None, stage: str, step: int):
        self.path, self.reason, self.quarantined_to = path, reason, quarantined_to
        where = f"moved to {quarantined_to}" if quarantined_to else "file already gone"
        super().__init__(
            f"{path}: corrupt shard ({reason}); {where}, and the shard is pending again. "
            f"Running {PRODUCER[stage]} workers redo it; if none are running: "
            f"python -m launch.resubmit RUN_DIR --stage {PRODUCER[stage]} --step {step}"
        )


class NotCommittedError(LookupError):
    """The shard has no commit record (it is pending, or being redone)."""


class ClaimLostError(RuntimeError):
    """The claim was broken by another worker (our heartbeat was older than the lease)."""


# ------------------------------------------------------------------- manifest


def _manifest_bytes(head: dict, record_lines: list[str]) -> bytes:
    """The manifest with one shard record per line (each line cached per record, so a
    refresh encodes only what changed), readable and parseable as one JSON object."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    body = "{\n" + "\n".join(lines) + '\n "committed": {'
    body += ("\n" + ",\n".join(record_lines) + "\n }") if record_lines else "}"
    return (body + "\n}\n").encode()


def _load_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is absent."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


class _ShardSink:
    """The file object Arrow serializes a shard into (through ``pa.PythonFile``).

    It hashes the bytes as they pass (no second read of the file for the checksum), gathers
    Arrow's many small writes (metadata, padding) and splits its large buffers, so the file
    gets ~1 MiB write() calls, and asks the kernel to start writing each MiB back at once
    (``sync_file_range``, Linux), so the fsync that ends the commit waits only for the tail.
    Why pieces: one write() of a multi-MB buffer into new page-cache pages can cost ~8x more
    than the same bytes in 1 MiB writes (~25 ms against ~3 ms per 10 MB on the 2-core VM
    this was built on, depending on its memory state; high-order page allocation, which the
    kernel's copy of ``shutil.copyfile`` never needs). The fd stays the caller's; ``close``
    only flushes.
    """

    PIECE = 1 << 20

    def __init__(self, fd: int):
        self.fd = fd
        self.closed = False
        self._written = 0  # bytes handed to the kernel
        self._kicked = 0  # bytes whose writeback was started
        self._small = bytearray()
        self._hash = xxhash.xxh3_128()
        self._kick = _SYNC_FILE_RANGE

    @property
    def size(self) -> int:
        return self._written + len(self._small)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        if len(self._small) + len(view) <= self.PIECE:
            self._small += view
            return len(view)
        self._flush_small()
        for start in range(0, len(view), self.PIECE):
            self._write_all(view[start : start + self.PIECE])
        return len(view)

    def _flush_small(self) -> None:
        if self._small:
            self._write_all(memoryview(self._small))
            self._small = bytearray()

    def _write_all(self, piece: memoryview) -> None:
        while piece:
            n = os.write(self.fd, piece)
            self._written += n
            piece = piece[n:]
        if self._kick is not None and self._written - self._kicked >= self.PIECE:
            if self._kick(self.fd, self._kicked, self._written - self._kicked, _SYNC_FILE_RANGE_WRITE) != 0:
                self._kick = None  # unsupported here (ENOSYS, EINVAL): plain fsync at the end
            self._kicked = self._written

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._flush_small()

    def close(self) -> None:
        self._flush_small()
        self.closed = True

    def checksum(self) -> str:
        return f"{_HASH}:{self._hash.hexdigest()}"


def _load_sync_file_range():
    """libc's sync_file_range, or None off Linux: it only starts writeback early."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _checksum(data) -> str:
    return f"{_HASH}:{xxhash.xxh3_128(data).hexdigest()}"


# --------------------------------------------------------------- following a stage


class _Follower:
    """What one process has seen of one stage: its records and how far it read the journal."""

    def __init__(self):
        self.lock = threading.Lock()
        self.journal_id: tuple | None = None  # (st_dev, st_ino) of the journal read
        self.offset = 0  # journal bytes accounted for
        self.known: dict[int, dict] = {}
        self.scanned_at = -float("inf")  # time.monotonic() of the last full scan


_FOLLOWERS: "collections.OrderedDict[str, _Follower]" = collections.OrderedDict()
_FOLLOWERS_LOCK = threading.Lock()
_MAX_FOLLOWED = 64  # stages followed per process (active steps x stages, with room)
_JOURNAL_ENTRY = re.compile(rb"[+-](\d{1,9}) [0-9a-f]")


def _follower(stage_dir: Path) -> _Follower:
    key = str(stage_dir)
    with _FOLLOWERS_LOCK:
        f = _FOLLOWERS.get(key)
        if f is None:
            f = _FOLLOWERS[key] = _Follower()
            while len(_FOLLOWERS) > _MAX_FOLLOWED:
                _FOLLOWERS.popitem(last=False)
        else:
            _FOLLOWERS.move_to_end(key)
        return f


def _journal_changes(path: Path, start: int, end: int) -> tuple[set[int], int]:
    """(shard indices named by the complete journal lines in bytes [start, end), bytes they
    span). A line still being appended (no newline yet) is left for the next look."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except FileNotFoundError:
        return set(), 0
    used = data.rfind(b"\n") + 1
    # Entries, not lines: two appends that interleaved (NFS) still name both shards.
    touched = {int(m.group(1)) for m in _JOURNAL_ENTRY.finditer(data, 0, used)}
    return {i for i in touched if i < MAX_SHARDS}, used


# ----------------------------------------------------------------------- the queue


@dataclass
class VerifyReport:
    """What ``StageQueue.verify`` found and did."""

    stage_dir: str
    expected: int | None
    committed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    corrupt: list[dict] = field(default_factory=list)  # {index, path, reason, quarantined_to}
    orphaned: list[dict] = field(default_factory=list)  # {path, kind, action}
    stale_claims: list[dict] = field(default_factory=list)  # {index, path, age_s, holder, action}
    manifest_rewritten: bool = False

    @property
    def ok(self) -> bool:
        """No damage and no leftovers (pending shards are normal work, not a problem)."""
        return not (self.corrupt or self.orphaned or self.stale_claims)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


class StageQueue:
    """The shards of one ``(step, stage)``: expect, claim, commit, read, verify."""

    def __init__(
        self,
        run_dir: RunDir | str | os.PathLike,
        step: int,
        stage: str,
        *,
        lease_s: float = 120.0,
        compression: str | None = None,
    ):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.step = check_step(step)
        self.stage = check_stage(stage)
        self.dir = self.run_dir.stage_dir(self.step, self.stage)
        if not lease_s >= 0:
            raise ValueError(f"lease_s={lease_s!r} must be >= 0 seconds")
        self.lease_s = float(lease_s)
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r}; valid: {COMPRESSIONS}")
        self.compression = compression
        # record file name -> ((inode, mtime, size), record or None, its manifest line)
        self._records_cache: dict[str, tuple[tuple, dict | None, str]] = {}

    def __repr__(self) -> str:
        return f"StageQueue({str(self.dir)!r})"

    # -- paths
    def shard_path(self, index: int) -> Path:
        # Re-validated on every use: a shard file swapped for an escaping symlink is refused.
        return self.run_dir.shard_path(self.step, self.stage, index)

    def _record_path(self, index: int) -> Path:
        return self.dir / (shard_name(index) + RECORD_SUFFIX)

    def _claim_path(self, index: int) -> Path:
        return self.dir / (shard_name(index) + CLAIM_SUFFIX)

    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- expected shards
    def expect(self, n_shards: int) -> None:
        """Declare that the stage has ``n_shards`` shards (0..n-1). Fixed once set."""
        if isinstance(n_shards, bool) or not isinstance(n_shards, int) or not 0 <= n_shards <= MAX_SHARDS:
            raise ValueError(f"n_shards={n_shards!r} must be an int in [0, {MAX_SHARDS}]")
        self._ensure_dir()
        path = self.dir / EXPECTED
        tmp = temp_name(path)
        with open(tmp, "xb") as f:
            f.write(json_bytes({"format": "sluice.expected/1", "expected": n_shards}))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # create-if-absent with full content, atomically
        except FileExistsError:
            current = self.expected()
            if current != n_shards:
                raise ValueError(
                    f"{path}: the stage already expects {current} shards, not {n_shards}; a stage's "
                    "shard count is fixed once set (redo it by removing the stage directory)"
                ) from None
        finally:
            unlink(tmp)
        fsync_dir(self.dir)
        self._refresh_manifest()

    def expected(self) -> int | None:
        data = _load_json(self.dir / EXPECTED)
        return None if data is None else int(data["expected"])

    # -- records
    def _scan(self) -> dict[int, dict]:
        """All commit records, by index (the truth about what is committed)."""
        return {i: rec for i, (rec, _) in self._scan_lines().items()}

    def _scan_lines(self) -> dict[int, tuple[dict, str]]:
        """Index -> (commit record, its manifest line); records re-read only when changed."""
        found: dict[int, tuple[dict, str]] = {}
        seen = set()
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return found
        for e in entries:
            if not e.name.endswith(RECORD_SUFFIX):
                continue
            try:
                index = parse_shard_name(e.name[: -len(RECORD_SUFFIX)])
                st = e.stat()
            except (ValueError, FileNotFoundError):
                continue
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            seen.add(e.name)
            cached = self._records_cache.get(e.name)
            if cached is None or cached[0] != key:
                try:
                    rec = _load_json(Path(e.path))
                except ValueError:
                    rec = None  # damaged by hand: verify reports it
                if not isinstance(rec, dict):
                    rec = None
                line = "" if rec is None else f"  {json.dumps(shard_name(index))}: {json.dumps(rec, sort_keys=True)}"
                cached = (key, rec, line)
                self._records_cache[e.name] = cached
            if cached[1] is not None:
                found[index] = (cached[1], cached[2])
        for name in set(self._records_cache) - seen:
            del self._records_cache[name]
        return found

    def committed(self, fast: bool = False) -> dict[int, dict]:
        """Committed shards: index -> commit record, from a scan of every record; ``fast``:
        from this process's follower of the stage (the module docstring), for polling loops."""
        return dict(sorted((self._follow() if fast else self._scan()).items()))

    def _follow(self) -> dict[int, dict]:
        """The follower's view of the records, brought up to date from the journal (or by a
        full scan when one is due). The returned dict is the follower's own: do not modify."""
        f = _follower(self.dir)
        path = self.dir / JOURNAL
        with f.lock:
            try:
                st = os.stat(path)
                journal_id, size = (st.st_dev, st.st_ino), st.st_size
            except FileNotFoundError:
                journal_id, size = None, 0
            now = time.monotonic()
            if f.journal_id is None and journal_id is not None and f.offset == 0:
                f.journal_id = journal_id  # the first commit since our scan: its lines are new
            if journal_id != f.journal_id or size < f.offset or now - f.scanned_at > RESCAN_S:
                # Lines appended from here on are read next time: replaying one is harmless.
                f.journal_id, f.offset = journal_id, size
                f.known, f.scanned_at = self._scan(), now
            elif size > f.offset:
                touched, used = _journal_changes(path, f.offset, size)
                f.offset += used
                for index in touched:
                    record = self.record(index)
                    if record is None:
                        f.known.pop(index, None)
                    else:
                        f.known[index] = record
            return f.known

    def _journal(self, sign: str, index: int, commit_id: str) -> None:
        """Append one change line to the stage's journal (a hint for followers: no fsync)."""
        fd = os.open(self.dir / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{sign}{index} {commit_id}\n".encode())
        finally:
            os.close(fd)

    def record(self, index: int) -> dict | None:
        try:
            rec = _load_json(self._record_path(index))
        except ValueError:
            return None
        return rec if isinstance(rec, dict) else None

    def pending(self, fast: bool = False) -> list[int]:
        """Expected shards without a commit record (claimed or not), in index order
        (``fast``: as this process's follower of the stage sees them)."""
        n = self.expected()
        if n is None:
            raise ValueError(f"{self.dir}: no {EXPECTED}; the coordinator calls expect(n_shards) first")
        done = self._follow() if fast else self._scan()
        return [i for i in range(n) if i not in done]

    def is_complete(self, fast: bool = False) -> bool:
        n = self.expected()
        return n is not None and not self.pending(fast)

    # -- manifest
    def _manifest_now(self) -> bytes:
        """MANIFEST.json's content as of a scan of the records now."""
        found = self._scan_lines()
        n = self.expected()
        indices = sorted(found)
        head = {
            "format": "sluice.manifest/1",
            "step": self.step,
            "stage": self.stage,
            "expected": n,
            "n_committed": len(indices),
            "rows": sum(int(found[i][0].get("rows", 0)) for i in indices),
            "bytes": sum(int(found[i][0].get("bytes", 0)) for i in indices),
            "complete": n is not None and all(i in found for i in range(n)),
        }
        return _manifest_bytes(head, [found[i][1] for i in indices])

    def manifest(self) -> dict | None:
        """MANIFEST.json as last written (a summary; ``committed()`` is the truth)."""
        try:
            return _load_json(self.dir / MANIFEST)
        except ValueError:
            return None

    def refresh_manifest(self) -> bool:
        """Bring MANIFEST.json up to date with the records (the coordinator, once a stage is
        complete); True if it was rewritten."""
        return self._refresh_manifest()

    def _refresh_manifest(self) -> bool:
        """Rewrite MANIFEST.json until it equals a scan taken after our last write.

        Returns True if it wrote. See the module docstring for why this never loses entries.
        """
        written = None
        wrote = False
        for _ in range(1000):
            want = self._manifest_now()
            if want == written:
                return wrote
            if written is None:
                try:
                    with open(self.dir / MANIFEST, "rb") as f:
                        if f.read() == want:
                            return False
                except FileNotFoundError:
                    pass
            # Derived data: atomic but not fsync'd, a crash at worst leaves an older summary,
            # which verify() rewrites. Skipping the fsync keeps commits near copy speed.
            atomic_write_bytes(self.dir / MANIFEST, want, fsync=False, sync_dir=False)
            written, wrote = want, True
        raise RuntimeError(f"{self.dir}: manifest did not settle after 1000 rewrites")

    # -- claims
    def claim(self, index: int, owner: Owner | None = None, *, if_pending: bool = True) -> Claim | None:
        """Claim shard ``index``; None if someone else holds a fresh claim.

        A stale claim is broken (race-safe). With ``if_pending`` a shard that is already
        committed is not claimed (checked after acquiring, so a worker that committed and
        released just before us is seen); pass False to redo a committed shard.
        """
        index = check_shard_index(index)
        self._ensure_dir()
        claim = acquire(self._claim_path(index), index, owner or Owner.from_env(), self.lease_s)
        if claim is not None and if_pending and self._record_path(index).exists():
            claim.release()
            return None
        return claim

    def claim_next(self, owner: Owner | None = None, candidates: Iterable[int] | None = None) -> Claim | None:
        """Claim the first claimable shard of ``candidates`` (default: ``pending()``), or None."""
        owner = owner or Owner.from_env()
        for index in self.pending() if candidates is None else candidates:
            claim = self.claim(index, owner)
            if claim is not None:
                return claim
        return None

    def break_claims(self, job_id: str) -> list[int]:
        """Break every claim of this stage held by Slurm job ``job_id`` (known dead); returns indices.

        Race-safe like breaking a stale claim: only the exact file read as ``job_id``'s is
        removed, never a claim another worker created meanwhile.
        """
        broken = []
        try:
            entries = [e.name for e in os.scandir(self.dir) if e.name.endswith(CLAIM_SUFFIX)]
        except FileNotFoundError:
            return broken
        for name in sorted(entries):
            if not SHARD_RE.fullmatch(name[: -len(CLAIM_SUFFIX)]):
                continue
            seen = look(self.dir / name)
            if seen is not None and seen.info and str(seen.info.get("job_id")) == str(job_id):
                if displace(self.dir / name, seen):
                    broken.append(parse_shard_name(name[: -len(CLAIM_SUFFIX)]))
        if broken:
            log.warning("%s: broke claims of dead job %s on shards %s", self.dir, job_id, broken)
        return broken

    def claim_info(self, index: int) -> dict | None:
        """The claim file's JSON (None if unclaimed or being written), plus its ``age_s``."""
        seen = look(self._claim_path(index))
        if seen is None or seen.info is None:
            return None
        return {**seen.info, "age_s": time.time() - seen.heartbeat}

    # -- commit / read
    def commit(
        self,
        index: int,
        table: pa.Table,
        extra_meta: dict | None = None,
        *,
        claim: Claim | None = None,
        owner: Owner | None = None,
    ) -> dict:
        """Write ``table`` as shard ``index`` atomically and record it; returns the record.

        ``table`` must carry this stage's schema (build it with ``schemas.build_table``).
        With ``claim``, refuses (ClaimLostError) if the claim was broken meanwhile.
        ``extra_meta`` (JSON-serialisable) is stored in the record's ``extra``.
        """
        index = check_shard_index(index)
        final = self.shard_path(index)
        schemas.check_schema(table.schema, self.stage, source=f"table for {final}")
        if claim is not None and claim.path != self._claim_path(index):
            raise ValueError(f"{claim} is not a claim on {final}")
        extra = json.loads(json.dumps(extra_meta or {}))  # fail now, not after writing
        self._ensure_dir()
        tmp = temp_name(final)
        options = pa.ipc.IpcWriteOptions(compression=self.compression)
        try:
            size, checksum = self._write_temp(tmp, table, options)
            self._check_still_held(claim, final)
            unlink(self._record_path(index))
            os.replace(tmp, final)
        except BaseException:
            unlink(tmp)
            raise
        record = self._new_record(index, table.num_rows, size, checksum, extra, claim, owner)
        # One directory fsync for both renames. If a crash persisted the record's rename but
        # not the data's, the checksum no longer matches and the shard is quarantined and
        # redone: integrity never depends on rename ordering, only durability does.
        atomic_write_bytes(self._record_path(index), json_bytes(record), sync_dir=False)
        fsync_dir(self.dir)
        self._journal("+", index, record["commit_id"])
        return record

    @staticmethod
    def _write_temp(tmp: Path, table: pa.Table, options: pa.ipc.IpcWriteOptions) -> tuple[int, str]:
        """Commit step 1: serialize ``table`` into the new file ``tmp`` and fsync it; returns
        (size in bytes, checksum)."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            sink = _ShardSink(fd)
            with pa.PythonFile(sink, mode="w") as f, pa.ipc.new_file(f, table.schema, options=options) as w:
                w.write_table(table)
            os.fsync(fd)
            size, checksum = sink.size, sink.checksum()
            if os.fstat(fd).st_size != size:
                raise OSError(f"{tmp}: {os.fstat(fd).st_size} bytes on disk after writing {size}")
        finally:
            os.close(fd)
        return size, checksum

    @staticmethod
    def _check_still_held(claim: Claim | None, final: Path) -> None:
        """ClaimLostError if ``claim`` was broken while the shard was being written."""
        if claim is not None and not claim.held():
            raise ClaimLostError(
                f"{claim.path}: claim lost before commit (heartbeat older than lease "
                f"{claim.lease_s}s); another worker redoes {final}. Heartbeat more often "
                "(Claim.start_heartbeat) or raise queue.lease_s"
            )

    def _new_record(self, index: int, rows: int, size: int, checksum: str, extra: dict,
                    claim: Claim | None, owner: Owner | None) -> dict:
        """The commit record of a shard just written (format: the module docstring)."""
        return {
            "format": "sluice.shard-record/1",
            "index": index,
            "rows": rows,
            "bytes": size,
            "checksum": checksum,
            "schema_version": schemas.SCHEMA_VERSION,
            "compression": self.compression,
            "commit_id": uuid.uuid4().hex,
            "committed_at": time.time(),
            "committed_by": asdict(claim.owner if claim is not None else owner or Owner.from_env()),
            # When the work started: hand-off latency between stages is claimed_at minus the
            # input's committed_at.
            "claimed_at": claim._info["claimed_at"] if claim is not None else None,
            "extra": extra,
        }

    def _check(self, index: int, record: dict) -> tuple[pa.Table | None, str | None]:
        """(table, None) if the file matches ``record``, else (None, reason)."""
        path = self.shard_path(index)
        try:
            # Into Arrow's memory pool, which recycles freed buffers: a fresh 10 MB bytes
            # object per read costs thousands of page faults on a busy node.
            with pa.OSFile(str(path), "rb") as f:
                data = f.read_buffer()
        except FileNotFoundError:
            return None, "file missing"
        if data.size != record.get("bytes"):
            return None, f"size {data.size} bytes, record says {record.get('bytes')}"
        checksum = _checksum(data)
        if checksum != record.get("checksum"):
            return None, f"checksum {checksum}, record says {record.get('checksum')}"
        try:
            table = pa.ipc.open_file(data).read_all()
        except (pa.ArrowException, OSError, ValueError) as e:
            return None, f"not a readable Arrow IPC file: {e}"
        if table.num_rows != record.get("rows"):
            return None, f"{table.num_rows} rows, record says {record.get('rows')}"
        return table, None

    def read(self, index: int) -> pa.Table:
        """The committed shard ``index``, verified against its record.

        Raises NotCommittedError if it has no record, CorruptShardError (after quarantining
        it) if it does not match, SchemaVersionError if written by another schema version.
        """
        index = check_shard_index(index)
        path = self.shard_path(index)
        for _ in range(3):
            record = self.record(index)
            if record is None:
                raise NotCommittedError(
                    f"{path}: not committed (no {path.name}{RECORD_SUFFIX}); it is pending or being redone"
                )
            table, reason = self._check(index, record)
            if reason is None:
                schemas.check_schema(table.schema, self.stage, source=str(path))
                return table
            if self.record(index) != record:
                continue  # recommitted while we read: the mismatch was the redo, not damage
            dest = self._quarantine(index, reason, record)
            raise CorruptShardError(path, reason, dest, self.stage, self.step)
        raise NotCommittedError(f"{path}: recommitted three times while being read; retry")

    def quarantine(self, index: int, reason: str) -> Path | None:
        """Move shard ``index`` to ``quarantine/`` with a reason file; the shard becomes pending."""
        index = check_shard_index(index)
        return self._quarantine(index, reason, self.record(index))

    def _quarantine(self, index: int, reason: str, record: dict | None) -> Path | None:
        """Quarantine the file; drop the commit record only if it is still ``record``.

        ``record=None`` (an unrecorded file) leaves records alone: one that appears meanwhile
        belongs to a new commit. Any race with a concurrent redo ends with the shard pending
        or freshly committed, never with a record that vouches for the wrong bytes.
        """
        path = self.shard_path(index)
        qdir = self.dir / QUARANTINE
        qdir.mkdir(exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = qdir / f"{path.name}.{stamp}.{secrets.token_hex(3)}"
        try:
            os.rename(path, dest)
            moved: Path | None = dest
        except FileNotFoundError:
            moved = None
        info = {"reason": reason, "record": record, "shard": str(path), "moved_to": str(moved) if moved else None,
                "time": time.time(), "by": asdict(Owner.from_env())}
        atomic_write_bytes(dest.with_name(dest.name + ".reason.json"), json_bytes(info))
        current = self.record(index)
        if record is not None and current is not None and current.get("commit_id") == record.get("commit_id"):
            self._journal("-", index, str(record.get("commit_id")))  # before: see the docstring
            unlink(self._record_path(index))
        fsync_dir(self.dir)
        self._refresh_manifest()
        log.warning("%s: quarantined (%s) to %s; the shard is pending again", path, reason, moved)
        return moved

    # -- verify
    def verify(self, *, deep: bool = True, repair: bool = False) -> VerifyReport:
        """Check every committed shard (``deep``: checksum + parse, else size only) and list leftovers.

        Corrupt shards are always quarantined (pending again). With ``repair``: orphaned temp
        files and claim leftovers are deleted, unrecorded shard files quarantined, stale
        claims broken. Leftovers younger than ``lease_s`` may belong to a live writer and
        are not reported. MANIFEST.json is rewritten when it disagrees with the records.
        """
        report = VerifyReport(str(self.dir), self.expected())
        if not self.dir.exists():
            report.pending = list(range(report.expected or 0))
            return report
        now = time.time()
        self._verify_committed(self._scan(), deep, report)
        records = self._scan()
        report.committed = sorted(records)
        if report.expected is not None:
            report.pending = [i for i in range(report.expected) if i not in records]
        self._find_leftovers(records, now, repair, report)
        report.manifest_rewritten = self._refresh_manifest()
        return report

    def _verify_committed(self, records: dict[int, dict], deep: bool, report: VerifyReport) -> None:
        """Quarantine each shard that does not match its record (unless recommitted meanwhile),
        adding it to ``report.corrupt``."""
        for index, record in sorted(records.items()):
            path = self.shard_path(index)
            if deep:
                _, reason = self._check(index, record)
            else:
                reason = self._check_size(path, record)
            if reason is not None and self.record(index) == record:
                dest = self._quarantine(index, reason, record)
                report.corrupt.append({"index": index, "path": str(path), "reason": reason,
                                       "quarantined_to": str(dest) if dest else None})

    @staticmethod
    def _check_size(path: Path, record: dict) -> str | None:
        """None if the file has the record's size, else why not (the shallow check)."""
        try:
            size = path.stat().st_size
            return None if size == record.get("bytes") else f"size {size}, record says {record.get('bytes')}"
        except FileNotFoundError:
            return "file missing"

    def _find_leftovers(self, records: dict[int, dict], now: float, repair: bool,
                        report: VerifyReport) -> None:
        """Report (and with ``repair`` clean up) what no commit accounts for: unrecorded shard
        files, stale claims, and other files older than the lease."""
        known = {MANIFEST, EXPECTED, QUARANTINE, JOURNAL} | {shard_name(i) + RECORD_SUFFIX for i in records}
        for e in os.scandir(self.dir):
            name = e.name
            if name in known:
                continue
            try:
                age = now - e.stat().st_mtime
            except FileNotFoundError:
                continue
            if SHARD_RE.fullmatch(name):
                if parse_shard_name(name) not in records and age > self.lease_s:
                    action = "quarantined" if repair else "none"
                    if repair:
                        self._quarantine(parse_shard_name(name), "shard file without a commit record", None)
                    report.orphaned.append({"path": e.path, "kind": "unrecorded shard", "action": action})
            elif name.endswith(CLAIM_SUFFIX) and SHARD_RE.fullmatch(name[: -len(CLAIM_SUFFIX)]):
                self._check_claim_file(e, records, now, repair, report)
            elif age > self.lease_s:
                kind = _leftover_kind(name)
                deletable = not kind.startswith("unexpected") and not name.endswith(RECORD_SUFFIX)
                action = "deleted" if repair and deletable and unlink(Path(e.path)) else "none"
                report.orphaned.append({"path": e.path, "kind": kind, "action": action})

    def _check_claim_file(self, e: os.DirEntry, records: dict[int, dict], now: float, repair: bool,
                          report: VerifyReport) -> None:
        """Add the claim file ``e`` to ``report.stale_claims`` if its heartbeat is older than
        the lease (``repair``: and break it)."""
        index = parse_shard_name(e.name[: -len(CLAIM_SUFFIX)])
        seen = look(Path(e.path))
        if seen is None:
            return
        claim_age = now - seen.heartbeat
        if claim_age > self.lease_s:
            action = "broken" if repair and displace(Path(e.path), seen) else "none"
            report.stale_claims.append({"index": index, "path": e.path, "age_s": round(claim_age, 3),
                                        "holder": seen.info, "committed": index in records,
                                        "action": action})


def _leftover_kind(name: str) -> str:
    """What a stray file in a stage directory is, judged by its name."""
    if name.startswith(".") and name.endswith(".tmp"):
        return "temp file (a writer died mid-write)"
    if ".claim.broken." in name:
        return "claim set aside by a breaker that died"
    if name.endswith(RECORD_SUFFIX):
        return "unreadable or misnamed commit record"
    return "unexpected file"

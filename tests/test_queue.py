"""The filesystem queue with real processes: claims, crashes, corruption, path safety.

    .venv/bin/python -m pytest tests/test_queue.py -q

Worker functions are module-level so spawned processes can import them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import xxhash
import pytest

from shared import claims, queue, schemas
from shared.claims import Owner
from shared.queue import (
    ClaimLostError,
    CorruptShardError,
    NotCommittedError,
    StageQueue,
)
from shared.rundir import RunDir, parse_shard_name

SPAWN = mp.get_context("spawn")


def table(stage: str, index: int, tag: str = "", rows: int = 2) -> pa.Table:
    cols = {
        "sample_id": [f"s{index}-{r}" for r in range(rows)],
        "step": [0] * rows,
        "problem": [f"problem {index} {tag}"] * rows,
        "answer": [None] * rows,
        "prompt_ids": [[index, r] for r in range(rows)],
        "dataset": ["d"] * rows,
        "index": [index * rows + r for r in range(rows)],
    }
    if stage == "rollouts":
        cols.update(
            response_ids=[[1, 2, 3]] * rows,
            response_text=["abc"] * rows,
            finish_reason=["stop"] * rows,
            policy_version=[0] * rows,
            gen_logprobs=[[-0.1, -0.2, -0.3]] * rows,
        )
    return schemas.build_table(stage, cols)


def poll(condition, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def join_all(procs, timeout_s: float = 60.0):
    for p in procs:
        p.join(timeout_s)
        assert p.exitcode == 0, f"worker {p.pid} exited with {p.exitcode}"


# --------------------------------------------------------------- spawned workers


def race_worker(run_dir: str, log_dir: str, start) -> None:
    q = StageQueue(run_dir, 0, "prompts", lease_s=60)
    pid = os.getpid()
    start.wait()
    with open(Path(log_dir) / f"worker-{pid}.log", "a") as log:
        while True:
            claim = q.claim_next()
            if claim is None:
                if not q.pending():
                    return
                time.sleep(0.005)  # the rest is claimed by live workers: poll
                continue
            with claim:
                log.write(f"{claim.index}\n")
                log.flush()
                q.commit(claim.index, table("prompts", claim.index, tag=str(pid)), {"pid": pid}, claim=claim)


def commit_worker(run_dir: str, worker: int, n_workers: int, n_shards: int, start) -> None:
    q = StageQueue(run_dir, 0, "prompts")
    start.wait()
    for index in range(worker, n_shards, n_workers):
        q.commit(index, table("prompts", index))
        q.refresh_manifest()


def breaker_worker(run_dir: str, start, results, done) -> None:
    q = StageQueue(run_dir, 0, "prompts", lease_s=30)
    start.wait()
    claim = q.claim(0)
    results.put((os.getpid(), claim is not None))
    done.wait()  # hold a won claim until every contender has tried
    if claim is not None:
        claim.release()


def slow_writer(run_dir: str, marker: str) -> None:
    q = StageQueue(run_dir, 0, "rollouts", lease_s=2)
    claim = q.claim(0)
    assert claim is not None
    claim.start_heartbeat(0.2)  # fresh while alive; only the SIGKILL makes it stale
    real_write = queue._ShardSink.write

    def hanging_write(sink, data):
        """Writes the first piece, then hangs: 'mid-write' until the test kills us."""
        real_write(sink, data)
        Path(marker).touch()
        time.sleep(3600)

    queue._ShardSink.write = hanging_write
    q.commit(0, table("rollouts", 0, tag="killed"), claim=claim)


# -------------------------------------------------------------------- concurrency


def test_racing_workers_process_every_shard_exactly_once(tmp_path):
    n_shards, n_workers = 200, 4
    StageQueue(tmp_path / "run", 0, "prompts").expect(n_shards)
    logs = tmp_path / "logs"
    logs.mkdir()
    start = SPAWN.Event()
    procs = [SPAWN.Process(target=race_worker, args=(str(tmp_path / "run"), str(logs), start)) for _ in range(n_workers)]
    for p in procs:
        p.start()
    start.set()
    join_all(procs)

    processed: dict[int, int] = {}
    for f in logs.iterdir():
        pid = int(f.stem.split("-")[1])
        for line in f.read_text().split():
            assert int(line) not in processed, f"shard {line} processed twice"
            processed[int(line)] = pid
    assert sorted(processed) == list(range(n_shards))
    q = StageQueue(tmp_path / "run", 0, "prompts")
    records = q.committed()
    assert sorted(records) == list(range(n_shards))
    assert all(records[i]["extra"]["pid"] == processed[i] == records[i]["committed_by"]["pid"] for i in records)
    # The follower that read the journal of these racing commits sees the same records.
    assert q.committed(fast=True) == records and q.is_complete(fast=True)
    assert q.manifest()["n_committed"] == 0  # commits leave the summary to the coordinator
    assert q.refresh_manifest()
    manifest = q.manifest()
    assert manifest["n_committed"] == n_shards and manifest["complete"] and manifest["rows"] == 2 * n_shards
    assert not list((tmp_path / "run").rglob("*.claim"))
    assert q.verify().ok


def test_concurrent_manifest_refreshes_never_lose_entries(tmp_path):
    # Every worker refreshes the manifest after each of its commits (the coordinator and
    # verify do so in a run): the last refresh holds every record.
    n_shards, n_workers = 80, 4
    run = str(tmp_path / "run")
    StageQueue(run, 0, "prompts").expect(n_shards)
    start = SPAWN.Event()
    procs = [SPAWN.Process(target=commit_worker, args=(run, w, n_workers, n_shards, start)) for w in range(n_workers)]
    for p in procs:
        p.start()
    start.set()
    join_all(procs)
    manifest = json.loads((Path(run) / "steps/000000/prompts/MANIFEST.json").read_text())
    assert sorted(manifest["committed"]) == [f"shard-{i:05d}.arrow" for i in range(n_shards)]
    assert manifest["complete"] and manifest["expected"] == n_shards
    assert not StageQueue(run, 0, "prompts").verify().manifest_rewritten  # nothing to fix


def test_manifest_refresh_converges_when_a_commit_lands_between_scan_and_write(tmp_path, monkeypatch):
    # The interleaving that loses entries with a write-once manifest, made deterministic:
    # another committer's whole commit and refresh run after our scan and before our replace.
    q, other = StageQueue(tmp_path, 0, "prompts"), StageQueue(tmp_path, 0, "prompts")
    q.expect(2)
    write = queue.atomic_write_bytes
    sneaked = []

    def racing_write(path, data, **kwargs):
        if path.name == "MANIFEST.json" and not sneaked:
            sneaked.append(True)
            other.commit(1, table("prompts", 1))
            other.refresh_manifest()
        write(path, data, **kwargs)

    monkeypatch.setattr(queue, "atomic_write_bytes", racing_write)
    q.commit(0, table("prompts", 0))
    q.refresh_manifest()
    assert sneaked and sorted(q.manifest()["committed"]) == ["shard-00000.arrow", "shard-00001.arrow"]


def test_follower_reads_commits_and_removals_from_the_journal_without_listing(tmp_path, monkeypatch):
    q, other = StageQueue(tmp_path, 0, "rollouts"), StageQueue(tmp_path, 0, "rollouts")
    q.expect(3)
    assert q.committed(fast=True) == {}  # the first look scans
    first = other.commit(0, table("rollouts", 0))
    second = other.commit(2, table("rollouts", 2))

    def no_scan(self):
        raise AssertionError("a follower's look listed the directory")

    monkeypatch.setattr(StageQueue, "_scan", no_scan)
    assert q.committed(fast=True) == {0: first, 2: second} and q.pending(fast=True) == [1]
    redo = other.commit(2, table("rollouts", 2))  # recommitted: the record is re-read
    assert q.committed(fast=True)[2]["commit_id"] == redo["commit_id"] != second["commit_id"]
    journal = q.dir / "COMMITS.log"
    with open(journal, "ab") as f:
        f.write(b"+1 abc")  # a line still being written: left for the next look
    other.commit(1, table("rollouts", 1))
    assert sorted(q.committed(fast=True)) == [0, 1, 2] and q.is_complete(fast=True)
    monkeypatch.undo()
    other.quarantine(0, "test")  # "-0" is journaled before the record goes
    assert sorted(q.committed(fast=True)) == [1, 2]
    assert journal.read_bytes().count(b"\n") == 5 and b"-0 " in journal.read_bytes()
    # A record the journal never heard of (a lost append on NFS) is found by the periodic scan.
    (q.dir / "shard-00000.arrow.meta.json").write_text(json.dumps(first))
    assert sorted(q.committed(fast=True)) == [1, 2]
    monkeypatch.setattr(queue, "RESCAN_S", 0.0)
    assert sorted(q.committed(fast=True)) == [0, 1, 2] == sorted(q.committed())


def test_two_breakers_of_a_stale_claim_never_both_win(tmp_path):
    run = str(tmp_path / "run")
    q = StageQueue(run, 0, "prompts")
    q.expect(1)
    stale = q._claim_path(0)
    stale.write_text(json.dumps({"claim_id": "dead", "heartbeat": 0.0, "pid": -1}))
    os.utime(stale, (0, 0))
    start, done, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=breaker_worker, args=(run, start, results, done)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    done.set()
    join_all(procs)
    assert sum(won for _, won in outcomes) == 1, outcomes
    assert not list(stale.parent.glob("*.broken.*"))


def test_sigkilled_writer_leaves_no_partial_shard_and_is_redone(tmp_path):
    run = str(tmp_path / "run")
    q = StageQueue(run, 0, "rollouts", lease_s=2)
    q.expect(1)
    marker = tmp_path / "mid-write"
    p = SPAWN.Process(target=slow_writer, args=(run, str(marker)))
    p.start()
    poll(lambda: marker.exists() or not p.is_alive(), what="the writer to start writing")
    assert p.is_alive(), f"writer died with exit code {p.exitcode}"
    temps = list(q.dir.glob(".shard-00000.arrow.*.tmp"))
    assert len(temps) == 1 and not q.shard_path(0).exists()
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL

    assert not q.shard_path(0).exists() and q.committed() == {} and q.pending() == [0]
    info = q.claim_info(0)
    if info is not None and info["age_s"] < 1.0:  # (on a starved machine it may be older)
        assert q.claim(0) is None  # the dead writer's last heartbeat is within the lease
    claim = poll(lambda: q.claim(0), what="the dead writer's claim to go stale")
    with claim:
        q.commit(0, table("rollouts", 0, tag="redone"), claim=claim)
    assert q.read(0).column("problem")[0].as_py() == "problem 0 redone"
    assert list(q.committed()) == [0] and q.committed()[0]["committed_by"]["pid"] == os.getpid()

    # The temp file is reported once older than the lease (it may postdate the last heartbeat).
    report = poll(lambda: (r := q.verify()).orphaned and r, what="the temp file to be reported")
    assert [o["path"] for o in report.orphaned] == [str(temps[0])] and not report.ok
    assert q.verify(repair=True).orphaned[0]["action"] == "deleted"
    assert q.verify().ok and not temps[0].exists()


# -------------------------------------------------------------------------- claims


def test_claim_release_heartbeat_and_skip_committed(tmp_path):
    q = StageQueue(tmp_path, 3, "rollouts", lease_s=30)
    q.expect(2)
    owner = Owner("123", "4", "node1", 99)
    claim = q.claim(0, owner)
    info = q.claim_info(0)
    assert (info["job_id"], info["task_id"], info["host"], info["pid"]) == ("123", "4", "node1", 99)
    assert q.claim(0) is None
    other = q.claim_next()
    assert other.index == 1  # 0 is taken
    other.release()
    before = info["heartbeat"]
    claim.start_heartbeat(0.01)
    poll(lambda: (q.claim_info(0) or {}).get("heartbeat", 0) > before, what="a heartbeat")
    q.commit(0, table("rollouts", 0), claim=claim)
    claim.release()
    claim.release()  # idempotent
    assert q.claim_info(0) is None
    assert q.claim(0) is None  # committed: nothing to do
    redo = q.claim(0, if_pending=False)
    assert redo is not None
    redo.release()


def test_broken_claim_is_detected_and_cannot_commit(tmp_path):
    q = StageQueue(tmp_path, 0, "prompts", lease_s=30)
    q.expect(1)
    slow = q.claim(0)
    impatient = StageQueue(tmp_path, 0, "prompts", lease_s=0)  # everything is stale to it
    thief = impatient.claim(0)
    assert thief is not None and not slow.held() and not slow.heartbeat() and slow.lost
    with pytest.raises(ClaimLostError, match="claim lost before commit"):
        q.commit(0, table("prompts", 0), claim=slow)
    assert not q.shard_path(0).exists() and not list(q.dir.glob(".*.tmp"))
    slow.release()  # must not remove the thief's claim
    assert thief.held()
    q.commit(0, table("prompts", 0), claim=thief)
    thief.release()
    assert q.is_complete()


def test_break_claims_of_a_dead_job_only(tmp_path):
    q = StageQueue(tmp_path, 0, "prompts")
    dead = [q.claim(i, Owner("41", str(i), "n1", 1)) for i in (0, 2)]
    alive = q.claim(1, Owner("42", "0", "n2", 2))
    assert q.break_claims("41") == [0, 2]
    assert not any(c.held() for c in dead) and alive.held()
    retaken = q.claim(0)
    assert q.break_claims("41") == [] and retaken is not None
    for c in [*dead, alive, retaken]:
        c.release()
    assert not list(q.dir.glob("*.claim*"))


def test_displacing_a_fresh_claim_puts_it_back(tmp_path):
    q = StageQueue(tmp_path, 0, "prompts")
    live = q.claim(0)
    other = claims.ClaimSeen(dev=0, ino=0, mtime_ns=0, size=0, info={"claim_id": "someone-else"})
    assert not claims.displace(q._claim_path(0), other)
    assert live.held()
    live.release()
    assert not q._claim_path(0).exists()


# ----------------------------------------------------------------------- integrity


def _committed(tmp_path, n=2) -> StageQueue:
    q = StageQueue(tmp_path / "run", 5, "rollouts")
    q.expect(n)
    for i in range(n):
        q.commit(i, table("rollouts", i, rows=50))
    return q


def test_flipped_bytes_are_quarantined_on_read_and_redone(tmp_path):
    q = _committed(tmp_path)
    path = q.shard_path(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=rf"{path}: corrupt shard \(checksum .*pending again.*--stage generation --step 5") as err:
        q.read(1)
    moved = err.value.quarantined_to
    assert moved.parent == q.dir / "quarantine" and moved.read_bytes() == bytes(data)
    reason = json.loads(moved.with_name(moved.name + ".reason.json").read_text())
    assert reason["reason"].startswith("checksum") and reason["record"]["index"] == 1
    assert q.pending() == [1] and "shard-00001.arrow" not in q.manifest()["committed"]
    with pytest.raises(NotCommittedError, match="not committed"):
        q.read(1)
    claim = q.claim_next()
    assert claim.index == 1
    with claim:
        q.commit(1, table("rollouts", 1, tag="again"), claim=claim)
    assert q.read(1).num_rows == 2 and q.is_complete()


def test_truncated_shard_is_found_by_verify(tmp_path):
    q = _committed(tmp_path)
    path = q.shard_path(0)
    path.write_bytes(path.read_bytes()[:-100])
    report = q.verify(deep=False)
    assert [(c["index"], c["reason"].split()[0]) for c in report.corrupt] == [(0, "size")]
    assert report.pending == [0] and report.committed == [1] and not report.ok
    assert q.pending() == [0] and not path.exists()
    assert q.verify().ok  # quarantined: nothing left to report


def test_unparsable_shard_and_missing_file(tmp_path):
    q = _committed(tmp_path)
    garbage = b"not arrow at all" * 10
    q.shard_path(0).write_bytes(garbage)
    record = q.record(0)
    record.update(bytes=len(garbage), checksum=queue._checksum(garbage))
    q._record_path(0).write_text(json.dumps(record))  # a record that vouches for garbage
    q.shard_path(1).unlink()
    report = q.verify()
    reasons = {c["index"]: c["reason"] for c in report.corrupt}
    assert reasons[0].startswith("not a readable Arrow IPC file") and reasons[1] == "file missing"
    assert q.pending() == [0, 1] and q.manifest()["n_committed"] == 0


def test_schema_version_mismatch_is_reported_not_quarantined(tmp_path):
    q = _committed(tmp_path, n=1)
    t = table("rollouts", 0)
    future = t.replace_schema_metadata({**t.schema.metadata, b"sluice.schema_version": b"99"})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, future.schema) as w:
        w.write_table(future)
    data = sink.getvalue().to_pybytes()
    q.shard_path(0).write_bytes(data)
    q._record_path(0).write_text(json.dumps({**q.record(0), "rows": 2, "bytes": len(data), "checksum": queue._checksum(data)}))
    with pytest.raises(schemas.SchemaVersionError, match=rf"{q.shard_path(0)}: written with shard schema version 99"):
        q.read(0)
    assert q.shard_path(0).exists() and q.committed()


def test_commit_refuses_wrong_stage_table(tmp_path):
    q = StageQueue(tmp_path, 0, "rollouts")
    with pytest.raises(schemas.SchemaError, match="holds a prompts table where a rollouts shard belongs"):
        q.commit(0, table("prompts", 0))
    with pytest.raises(schemas.SchemaError, match="not a Sluice rollouts shard"):
        q.commit(0, table("rollouts", 0).replace_schema_metadata(None))


def test_recommit_replaces_and_zstd_roundtrips(tmp_path):
    q = StageQueue(tmp_path, 0, "rollouts", compression="zstd")
    q.expect(1)
    first = q.commit(0, table("rollouts", 0, rows=100))
    second = q.commit(0, table("rollouts", 0, tag="v2", rows=3))
    assert first["commit_id"] != second["commit_id"] and second["compression"] == "zstd"
    assert q.read(0).column("problem")[0].as_py() == "problem 0 v2"
    q.refresh_manifest()
    assert q.manifest()["committed"]["shard-00000.arrow"] == second
    assert q.verify().ok


@pytest.mark.parametrize("writeback", ["sync_file_range", "unsupported"])
def test_multi_piece_commit_is_byte_identical_to_arrow_and_hashed_right(tmp_path, monkeypatch, writeback):
    """The sink splits Arrow's buffers into 1 MiB writes and hashes them on the way: the file
    must be exactly what Arrow writes to memory, and the record's checksum that file's hash,
    with or without sync_file_range (a filesystem refusing it must not fail the commit)."""
    calls = []
    if writeback == "unsupported":
        monkeypatch.setattr(queue, "_SYNC_FILE_RANGE", lambda *a: calls.append(a) or -1)
    rows = 40_000  # ~3.5 MB of rollouts: several pieces, and a buffer larger than one piece
    big = schemas.build_table(
        "rollouts",
        {
            **table("rollouts", 0, rows=rows).to_pydict(),
            "response_ids": [list(range(r % 7, r % 7 + 20)) for r in range(rows)],
            "gen_logprobs": [[-0.5] * 20 for _ in range(rows)],
        },
    )
    q = StageQueue(tmp_path, 0, "rollouts")
    record = q.commit(0, big)
    data = q.shard_path(0).read_bytes()
    expected = pa.BufferOutputStream()
    with pa.ipc.new_file(expected, big.schema, options=pa.ipc.IpcWriteOptions(compression=None)) as w:
        w.write_table(big)
    assert data == expected.getvalue().to_pybytes()
    assert record["bytes"] == len(data) > 3 * queue._ShardSink.PIECE
    assert record["checksum"] == "xxh3_128:" + xxhash.xxh3_128(data).hexdigest()
    assert q.read(0).equals(big)
    if writeback == "unsupported":
        assert len(calls) == 1  # tried once, then plain fsync


def test_expect_is_fixed_once_set(tmp_path):
    q = StageQueue(tmp_path, 0, "prompts")
    with pytest.raises(ValueError, match="calls expect"):
        q.pending()
    q.expect(3)
    q.expect(3)
    with pytest.raises(ValueError, match="already expects 3 shards, not 4"):
        q.expect(4)
    assert q.pending() == [0, 1, 2] and q.manifest()["expected"] == 3


def test_verify_reports_leftovers_and_repairs_them(tmp_path):
    q = _committed(tmp_path)
    old = time.time() - 3600
    leftovers = {
        "temp": q.dir / ".shard-00001.arrow.node.123.abcd.tmp",
        "unrecorded": q.shard_path(1),  # as if the writer died between replace and record
        "aside": q.dir / "shard-00000.arrow.claim.broken.0123",
    }
    q._record_path(1).unlink()
    leftovers["temp"].write_bytes(b"partial")
    leftovers["aside"].write_text("{}")
    q._claim_path(0).write_text(json.dumps({"claim_id": "x", "heartbeat": old}))
    for p in [*leftovers.values(), q._claim_path(0)]:
        os.utime(p, (old, old))
    report = q.verify()
    assert sorted(o["kind"].split()[0] for o in report.orphaned) == ["claim", "temp", "unrecorded"]
    assert report.stale_claims[0]["committed"] and report.stale_claims[0]["action"] == "none"
    assert all(p.exists() for p in leftovers.values())
    fixed = q.verify(repair=True)
    assert {o["action"] for o in fixed.orphaned} == {"deleted", "quarantined"}
    assert fixed.stale_claims[0]["action"] == "broken"
    assert not any(p.exists() for p in leftovers.values()) and not q._claim_path(0).exists()
    assert q.verify().ok and q.pending() == [1]


def test_stale_manifest_is_rewritten_by_verify(tmp_path):
    q = _committed(tmp_path)
    (q.dir / "MANIFEST.json").write_text(json.dumps({"committed": {}}))
    assert q.verify().manifest_rewritten
    assert q.manifest()["n_committed"] == 2


# ----------------------------------------------------------------------- path safety


@pytest.mark.parametrize(
    "step, stage",
    [("../1", "prompts"), (-1, "prompts"), ("1", "prompts"), (1.0, "prompts"), (True, "prompts"),
     (10**6, "prompts"), (1, "../prompts"), (1, "/etc"), (1, "weights"), (1, "prompts/../../x")],
)
def test_bad_step_or_stage_is_refused(tmp_path, step, stage):
    with pytest.raises(ValueError):
        StageQueue(tmp_path, step, stage)
    with pytest.raises(ValueError):
        RunDir(tmp_path).stage_dir(step, stage)


@pytest.mark.parametrize("index", [-1, "3", "../shard-00001.arrow", 100_000, None])
def test_bad_shard_index_is_refused(tmp_path, index):
    q = StageQueue(tmp_path, 0, "prompts")
    with pytest.raises(ValueError, match="shard index"):
        q.shard_path(index)
    with pytest.raises(ValueError, match="shard index"):
        q.claim(index)


@pytest.mark.parametrize("name", ["../shard-00001.arrow", "/abs/shard-00001.arrow", "shard-1.arrow", "shard-00001.arrow/..", "x"])
def test_bad_shard_names_are_refused(name):
    with pytest.raises(ValueError, match="not a shard file name"):
        parse_shard_name(name)


def test_paths_escaping_the_run_dir_are_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    for parts in [("/etc/passwd",), ("steps", "..", "..", "x"), ("..",), ("a/../../b",)]:
        with pytest.raises(ValueError, match="relative to"):
            run.path(*parts)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "steps").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the run directory"):
        StageQueue(run, 0, "prompts")
    (tmp_path / "run" / "steps").unlink()
    q = StageQueue(run, 0, "prompts")
    q.dir.mkdir(parents=True)
    q.shard_path(0).symlink_to(outside / "x.arrow")
    with pytest.raises(ValueError, match="outside the run directory"):
        q.read(0)
    assert run.path("steps", "000000") == run.root / "steps" / "000000"

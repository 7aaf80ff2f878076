"""The run directory: every path, file name and reader of RUN_DIR, named once.

    from shared.rundir import RunDir
    rd = RunDir("runs/x")
    rd.weights_dir(7)               # RUN_DIR/weights/000007
    read_metrics(rd)                # the rows of RUN_DIR/metrics.jsonl

Layout (who writes what; the stage queues' own files are described in shared/queue.py):

    config.yaml                 the resolved config, frozen at launch, no secrets (launch.start)
    run.json                    the run's identity: run_id, created_at, conf, overrides
    metrics.jsonl               one JSON row per trained step and per validation (append-only,
                                coordinator and launch.validation)
    coordinator/state.json      the coordinator's jobs, retries and phase (launch.coordinator)
    coordinator/events.jsonl    what it did, one event per line
    coordinator/lock.json       the one live coordinator
    coordinator/STOP            exists once the run is finished or stopped: workers exit
    steps/<step:06d>/<stage>/   a stage queue of shards: prompts, rollouts, scored
    steps/<step:06d>/train.json the training result of the step (stages.train)
    weights/<step:06d>/         student weights after step <step>, HF format (stages.train);
                                committed directories (below)
    checkpoints/<step:06d>/     the trainer's resumable state (DCP), committed directories
    final/                      the last weights, published at the end of the run
                                (checkpointing.save_consolidated)
    workers/<role>/<job>_<task>_<pid>.json
                                one heartbeat record per worker (shared.worker)
    jobs/<job_id>.json          why a job stopped: time limit, preemption (launch.executors)
    logs/<key>/                 each job's stdout/stderr (submitit, the local executor)
    data/                       the run's prepared datasets
    validation/                 the held-out evaluation: its own steps/<version>/<stage>/
                                queues and results (launch.validation)
    wandb/                      the wandb run's files (launch.logger; tensorboard's folder
                                is logger.tensorboard.log_dir)

A committed directory (weights, checkpoints, final) is written as a temp directory beside
its final name, holds COMMITTED.json (written last) and is renamed into place
(``commit_dir``): a reader that sees ``COMMITTED.json`` sees a complete directory.

Every path handed out is checked to lie inside the run directory (no ``..``, no absolute
parts, no symlink leading out of it).
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Tuple

from shared.files import atomic_write_json, fsync_dir, read_json
from shared.pipeline import check_stage

CONFIG = "config.yaml"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
COORDINATOR = "coordinator"
STOP = "STOP"
STATE = "state.json"
EVENTS = "events.jsonl"
LOCK = "lock.json"
STEPS = "steps"
TRAIN_RECORD = "train.json"
WEIGHTS = "weights"
CHECKPOINTS = "checkpoints"
FINAL = "final"
WORKERS = "workers"
JOBS = "jobs"
LOGS = "logs"
DATA = "data"
TRAIN_DATA = "train.arrow"      # data/: the prepared training rows
HELDOUT = "heldout.json"        # data/: the samples held out for validation
DATA_SUMMARY = "summary.json"   # data/: what was loaded and skipped
VALIDATION = "validation"
VALIDATION_RESULT = "result.json"  # validation/steps/<version>/: its accuracy (launch.validation)
WANDB = "wandb"  # the offline wandb run (launch.logger)
COMMITTED = "COMMITTED.json"
EXPECTED = "EXPECTED.json"      # steps/<step>/<stage>/: how many shards the stage has (shared.queue)
# The folders launch.start creates, and every top-level name a run directory may hold.
FOLDERS = (COORDINATOR, STEPS, WEIGHTS, CHECKPOINTS, LOGS, WORKERS, DATA)
TOP_ENTRIES = (CONFIG, RUN_JSON, METRICS, COORDINATOR, LOGS, STEPS, WEIGHTS, CHECKPOINTS,
               FINAL, WORKERS, JOBS, DATA, VALIDATION, WANDB)

MAX_STEP = 999_999  # six digits keep steps/ lexically sorted
MAX_SHARDS = 100_000  # five digits
SHARD_RE = re.compile(r"shard-(\d{5})\.arrow")


# ------------------------------------------------------------------------------ names


def _bounded_int(value: Any, message: str, ok) -> int:
    """`value` as an int (bools refused) that satisfies `ok`, else ValueError(message)."""
    if isinstance(value, bool):
        raise ValueError(message)
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(message) from None
    if not ok(number):
        raise ValueError(message)
    return number


def check_step(step: Any) -> int:
    return _bounded_int(step, f"step={step!r} must be an int in [0, {MAX_STEP}]",
                        lambda v: 0 <= v <= MAX_STEP)


def check_shard_index(index: Any) -> int:
    return _bounded_int(index, f"shard index {index!r} must be an int in [0, {MAX_SHARDS})",
                        lambda v: 0 <= v < MAX_SHARDS)


def step_name(step: int) -> str:
    """``000007``: the directory name of a step (of steps/, weights/, checkpoints/)."""
    return f"{check_step(step):06d}"


def shard_name(index: int) -> str:
    return f"shard-{check_shard_index(index):05d}.arrow"


def parse_shard_name(name: str) -> int:
    """The index of ``shard-XXXXX.arrow``; anything else (paths, ``..``) raises ValueError."""
    m = SHARD_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"{name!r} is not a shard file name (expected shard-XXXXX.arrow, 5 digits)")
    return int(m.group(1))


# --------------------------------------------------------------------------- RunDir


def _fixed(*parts: str) -> property:
    """A RunDir property: the path RUN_DIR/<parts> (checked like every path)."""
    return property(lambda rd: rd.path(*parts), doc=f"RUN_DIR/{'/'.join(parts)}")


class RunDir:
    """A run directory; every path handed out is checked to lie inside it."""

    def __init__(self, path: str | os.PathLike):
        self.root = Path(os.path.realpath(path))

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def path(self, *parts: str | os.PathLike) -> Path:
        """``root/parts...`` after refusing absolute parts, ``..`` and symlinks escaping root."""
        for part in parts:
            p = Path(part)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"path part {str(part)!r} must be relative to {self.root} without '..'")
        candidate = self.root.joinpath(*parts)
        resolved = Path(os.path.realpath(candidate))
        if os.path.commonpath([resolved, self.root]) != str(self.root):
            raise ValueError(
                f"{candidate} resolves to {resolved}, outside the run directory {self.root}; "
                "remove the symlink that points out of it"
            )
        return candidate

    # Fixed paths (properties): the files at the top, the coordinator's folder, the
    # committed-directory roots.
    config_file = _fixed(CONFIG)
    run_file = _fixed(RUN_JSON)
    metrics_file = _fixed(METRICS)
    coordinator_dir = _fixed(COORDINATOR)
    state_file = _fixed(COORDINATOR, STATE)
    events_file = _fixed(COORDINATOR, EVENTS)
    lock_file = _fixed(COORDINATOR, LOCK)
    stop_file = _fixed(COORDINATOR, STOP)
    weights_root = _fixed(WEIGHTS)
    checkpoints_root = _fixed(CHECKPOINTS)
    final_dir = _fixed(FINAL)

    def data_file(self, name: str) -> Path:
        """RUN_DIR/data/<name>: TRAIN_DATA, HELDOUT, DATA_SUMMARY."""
        return self.path(DATA, name)

    # Steps and their stage queues.
    def step_dir(self, step: int) -> Path:
        return self.path(STEPS, step_name(step))

    def stage_dir(self, step: int, stage: str) -> Path:
        return self.path(STEPS, step_name(step), check_stage(stage))

    def shard_path(self, step: int, stage: str, index: int) -> Path:
        return self.path(STEPS, step_name(step), check_stage(stage), shard_name(index))

    def train_record(self, step: int) -> Path:
        return self.path(STEPS, step_name(step), TRAIN_RECORD)

    # Committed directories.
    def weights_dir(self, step: int) -> Path:
        return self.path(WEIGHTS, step_name(step))

    def checkpoint_dir(self, step: int) -> Path:
        return self.path(CHECKPOINTS, step_name(step))

    # Workers, jobs, logs.
    def workers_dir(self, role: Optional[str] = None) -> Path:
        return self.path(WORKERS, role) if role else self.path(WORKERS)

    def worker_record(self, role: str, job: str, task: str, pid: int) -> Path:
        return self.path(WORKERS, role, f"{job}_{task}_{pid}.json")

    def job_record(self, job_id: str) -> Path:
        return self.path(JOBS, f"{job_id}.json")

    def log_dir(self, key: str) -> Path:
        return self.path(LOGS, key)

    def validation_result(self, version: int) -> Path:
        """RUN_DIR/validation/steps/<version>/result.json: the validation of weights `version`."""
        return self.path(VALIDATION, STEPS, step_name(version), VALIDATION_RESULT)

    @property
    def validation(self) -> "RunDir":
        """The validation queue's own run directory: RUN_DIR/validation/steps/<version>/<stage>/."""
        return RunDir(self.path(VALIDATION))


# ---------------------------------------------------------------------------- readers


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of an append-only JSON-lines file, in order; a line cut short by a killed
    writer is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(rd: RunDir) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl."""
    return _read_jsonl(rd.metrics_file)


def read_events(rd: RunDir) -> list[dict]:
    """The coordinator's events, RUN_DIR/coordinator/events.jsonl (written by launch.events)."""
    return _read_jsonl(rd.events_file)


def append_metrics(rd: RunDir, row: dict) -> None:
    """Append one row to RUN_DIR/metrics.jsonl and make it durable."""
    with open(rd.metrics_file, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def active_steps(rd: RunDir, stage: str) -> list[int]:
    """Steps whose `stage` directory has been declared (EXPECTED.json exists), ascending."""
    steps_dir = rd.path(STEPS)  # joined below without path()'s per-path checks: workers poll this
    return [t for t in step_numbers(rd) if (steps_dir / step_name(t) / stage / EXPECTED).is_file()]


def step_numbers(rd: RunDir) -> list[int]:
    """Every step with a directory under steps/, ascending."""
    steps_dir = rd.path(STEPS)
    if not steps_dir.is_dir():
        return []
    return sorted(int(d.name) for d in steps_dir.iterdir() if d.name.isdigit())


def trained_steps(rd: RunDir) -> list[int]:
    """Steps with a training result (steps/<step>/train.json), ascending."""
    steps_dir = rd.path(STEPS)
    return [t for t in step_numbers(rd) if (steps_dir / step_name(t) / TRAIN_RECORD).is_file()]


def last_trained_step(rd: RunDir) -> int:
    """The highest step t such that steps 1..t all have their training result (0: none)."""
    t = 0
    while rd.train_record(t + 1).is_file():
        t += 1
    return t


def worker_records(rd: RunDir, role: Optional[str] = None) -> list[tuple[Path, dict]]:
    """(path, record) of every readable worker record of `role` (None: every role), sorted by
    path. A record being replaced at this moment is skipped (the next poll sees it)."""
    root = rd.workers_dir(role)
    if not root.is_dir():
        return []
    found = [(p, read_json(p)) for p in sorted(root.glob("*.json" if role else "*/*.json"))]
    return [(p, info) for p, info in found if info]


# ---------------------------------------------------------------- committed directories


def is_committed_dir(path: Path) -> bool:
    return (path / COMMITTED).is_file()


def committed_steps(rd: RunDir, folder: str) -> list[int]:
    """The steps committed under RUN_DIR/<folder> (WEIGHTS, CHECKPOINTS), ascending."""
    root = rd.path(folder)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and is_committed_dir(p))


def latest_weights(rd: RunDir, at_most: Optional[int] = None) -> Tuple[int, Optional[Path]]:
    """(step, path) of the newest committed student weights with step <= at_most, or (-1, None)."""
    steps = [s for s in committed_steps(rd, WEIGHTS) if at_most is None or s <= at_most]
    return (steps[-1], rd.weights_dir(steps[-1])) if steps else (-1, None)


def weights_window(step: int, max_staleness: int) -> range:
    """The staleness window: the weights versions generation of `step` may use, v with
    step - 1 - max_staleness <= v <= step - 1 (v = 0: the base model). The one statement of
    distillation.max_staleness: generation picks from it, launch.resubmit checks it, and
    shared.retention keeps what it may still need."""
    return range(max(0, step - 1 - max_staleness), step)


def last_step_on(version: int, max_staleness: int) -> int:
    """The last step whose window (weights_window) holds weights `version`."""
    return version + 1 + max_staleness


def pick_weights(rd: RunDir, step: int, max_staleness: int) -> Optional[Tuple[int, Optional[Path]]]:
    """(version, weights dir) that generation of `step` may use: the newest committed version
    of its window, the dir None for version 0 (the base model); None while no version of the
    window is committed (wait)."""
    window = weights_window(step, max_staleness)
    version, path = latest_weights(rd, at_most=window.stop - 1)
    if version >= max(window.start, 1):
        return version, path
    return (0, None) if window.start == 0 else None


def commit_dir(tmp: Path, final: Path, meta: dict) -> None:
    """Publish a fully written directory: write COMMITTED.json into it, then rename it onto
    `final`. A reader that sees `final/COMMITTED.json` sees a complete directory; a writer
    killed before the rename leaves only a temp dir (cleaned by the next writer)."""
    # commit_id tells apart two commits of the same step (a step redone after a resume).
    atomic_write_json(tmp / COMMITTED, {**meta, "commit_id": uuid.uuid4().hex,
                                        "committed_at": time.time()})
    fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def temp_dir_for(final: Path) -> Path:
    """A fresh temp directory beside `final` (what a previous writer of it left is removed)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp

"""Synthetic workers (bench/synthetic.py) drive the real coordinator and queue at scale: 65
worker processes, 20 steps of 32 shards, every sample scored and trained exactly once; the
timeline and GPU-hour report of that run agree with the workers' own timings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from launch.timeline import draw
from shared.queue import StageQueue
from shared.rundir import RunDir, worker_records
from tests.timing_check import assert_busy_agrees

REPO = Path(__file__).resolve().parents[1]
STEPS, SHARDS, COPIES = 20, 32, 32


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("synthetic") / "run"
    cmd = [sys.executable, "-m", "launch.run", "conf=smoke", f"launch.run_dir={run}", "launch.detach=false",
           "synthetic.enabled=true", f"synthetic.workers_per_task={COPIES}",
           f"distillation.max_num_steps={STEPS}", f"distillation.num_prompts_per_step={SHARDS}",
           "queue.prompts_per_shard=1", "distillation.val_at_end=false", "synthetic.generate_s=0.1",
           "synthetic.score_s=0.1", "synthetic.train_s=0.02", "synthetic.export_s=0.02",
           "synthetic.reload_s=0.02"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RunDir(run)


def test_65_synthetic_workers_score_and_train_every_sample_exactly_once(synthetic_run):
    rd = synthetic_run
    records = [info for _, info in worker_records(rd)]
    assert Counter(r["role"] for r in records) == {"generation": COPIES, "teacher": COPIES, "training": 1}
    assert len({(r["host"], r["pid"]) for r in records}) == 2 * COPIES + 1
    assert {r["status"] for r in records} == {"exited"}
    for t in range(1, STEPS + 1):
        prompts = StageQueue(rd, t, "prompts")
        wanted = [s for k in range(SHARDS) for s in prompts.read(k).column("sample_id").to_pylist()]
        assert len(wanted) == len(set(wanted)) == 2 * SHARDS
        scored = StageQueue(rd, t, "scored")
        # Each scored shard was committed once (the journal holds every commit and removal).
        journal = (scored.dir / "COMMITS.log").read_text().split()
        assert sorted(int(e[1:]) for e in journal[::2]) == list(range(SHARDS))
        assert all(e.startswith("+") for e in journal[::2])
        in_order = [s for k in range(SHARDS) for s in scored.read(k).column("sample_id").to_pylist()]
        assert in_order == wanted
        trained = json.loads(rd.train_record(t).read_text())["sample_ids"]
        assert trained == in_order  # trained once each, in shard order
        assert not list(scored.dir.glob("*.claim"))
        assert scored.manifest()["complete"] and scored.manifest()["n_committed"] == SHARDS


def test_timeline_and_gpu_hours_of_a_synthetic_run_agree_with_the_workers_timings(synthetic_run, tmp_path):
    report = assert_busy_agrees(synthetic_run, range(1, STEPS + 1))
    assert report["generation"]["workers"] == COPIES and report["training"]["workers"] == 1
    assert all(r["gpu_hours_source"] == "workers" and r["gpu_hours"] > 0 for r in report.values())
    fig = draw(synthetic_run, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes[0].get_yticklabels()) == 2 * COPIES + 1

"""Pipeline efficiency and scale with synthetic workers (issue 17).

    .venv/bin/python -m bench.bench_pipeline [--only pipeline|scale|commit] [--quick]

Every figure comes from a real run of the real coordinator and queue on the local executor
with synthetic role workers (bench/synthetic.py: the real claim/commit protocol around
sleeps), so the roles cost what the benchmark says they cost and never compete for the CPU
as real models would on this box: what is left is the pipeline's own overhead.

Pipeline (one worker per role, 4 shards a step, 14 steps, steady state = steps 5..14):
  pipeline_<case>_staleness1   median timing/step over the ideal: the slowest role's busy
                               time per step (generation 4 x generate_s + reload_s, teacher
                               4 x score_s, training 4 x train_s + export_s). Target <= 1.1.
  pipeline_<case>_staleness0   median timing/step over the strictly on-policy ideal:
                               generation + one shard of scoring + one of training + weight
                               export and reload. Target: value <= 1.1 x ideal + 1 s.
  Cases: "balanced" (every role 1 s a step) and "generation" (generation dominates).

Scale (workers in all: generation and teacher halves plus one trainer; shards = prompts):
  coordinator_cpu_<w>w_<n>shards     the coordinator's CPU seconds per step (metrics row
                                     timing/coordinator_cpu_s, median of steps >= 2; 3 steps,
                                     2 above 1024 shards).
  handoff_p50 / handoff_p99_<w>w_<n>shards
                                     commit-to-claim latency: rollouts shard k committed (or
                                     the claiming teacher free again, if later) -> scored
                                     shard k claimed. Target p99 < 2 x queue.poll_s.
Commit overhead (no run): seconds per StageQueue.commit of a small shard as the stage fills
to 64 ... 4096 shards, against the old commit that rebuilt MANIFEST.json from a scan of every
record each time (``refresh_manifest`` after each commit): flat against linear.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
PIPELINE_SHARDS, PIPELINE_STEPS, STEADY_FROM = 4, 14, 5
CASES = {  # per-shard seconds: generate_s, score_s, train_s; every role 1 s a step or one dominant
    "balanced": (0.2375, 0.25, 0.2375),
    "generation": (0.45, 0.1, 0.1),
}
RELOAD_S = EXPORT_S = 0.05
# (workers, shards per step). 256 workers with 4096 shards a step saturates a 2-core box for
# most of an hour (every shard is three fsync'd commits and a verified read); 4096 shards run
# with 32 workers, and the 256-worker hand-off target is checked at 1024 shards.
SCALE = [(8, 64), (32, 256), (128, 1024), (256, 1024), (32, 4096)]


def synthetic_run(run_dir: Path, overrides: List[str], timeout_s: float = 1800) -> float:
    cmd = [sys.executable, "-m", "launch.run", "conf=smoke", f"launch.run_dir={run_dir}",
           "launch.detach=false", "synthetic.enabled=true", "distillation.val_at_end=false",
           "checkpointing.save_period=1000", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.time() - t0


def metric_rows(run_dir: Path) -> Dict[int, dict]:
    from shared.rundir import RunDir, read_metrics

    return {r["step"]: r for r in read_metrics(RunDir(run_dir)) if "train/loss" in r}


# ------------------------------------------------------------------- pipeline


def ideal_step_s(staleness: int, g: float, s: float, tr: float, shards: int = PIPELINE_SHARDS) -> float:
    if staleness >= 1:
        return max(shards * g + RELOAD_S, shards * s, shards * tr + EXPORT_S)
    return shards * g + RELOAD_S + s + tr + EXPORT_S


def pipeline_case(case: str, staleness: int, steps: int = PIPELINE_STEPS) -> dict:
    g, s, tr = CASES[case]
    with tempfile.TemporaryDirectory(prefix="sluice-bench-pipe-") as tmp:
        run_dir = Path(tmp) / "run"
        synthetic_run(run_dir, [
            f"distillation.max_staleness={staleness}", f"distillation.max_num_steps={steps}",
            f"distillation.num_prompts_per_step={PIPELINE_SHARDS}", "queue.prompts_per_shard=1",
            f"synthetic.generate_s={g}", f"synthetic.score_s={s}", f"synthetic.train_s={tr}",
            f"synthetic.reload_s={RELOAD_S}", f"synthetic.export_s={EXPORT_S}"])
        rows = metric_rows(run_dir)
    step_s = [rows[t]["timing/step"] for t in sorted(rows) if t >= STEADY_FROM and "timing/step" in rows[t]]
    value, ideal = statistics.median(step_s), ideal_step_s(staleness, g, s, tr)
    entry = {"name": f"pipeline_{case}_staleness{staleness}", "value": round(value, 3), "unit": "s",
             "baseline": round(ideal, 3), "ratio": round(value / ideal, 3), "better": "lower",
             "samples": [round(x, 3) for x in step_s]}
    if staleness >= 1:
        entry.update(target=1.1, note="steady-state step time over the slowest role's busy time per step")
    else:
        entry.update(target=f"<= {round(1.1 * ideal + 1.0, 3)}", compare=round(value, 3),
                     note="strictly on-policy: over generation + one shard of scoring and of "
                          "training + export + reload (target: 1.1 x ideal + 1 s, on the value)")
    return entry


# ----------------------------------------------------------------------- scale


def write_dataset(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    return path


def handoffs(run_dir: Path, steps) -> List[float]:
    """Commit-to-claim latencies of the teacher (see the module docstring)."""
    from shared.queue import StageQueue
    from shared.rundir import RunDir

    rd = RunDir(run_dir)
    scored_all = []
    for t in steps:
        rolls = StageQueue(rd, t, "rollouts").committed()
        for k, rec in StageQueue(rd, t, "scored").committed().items():
            scored_all.append((rec, rolls.get(k)))
    scored_all.sort(key=lambda x: x[0]["claimed_at"])
    free: Dict[tuple, float] = {}
    out = []
    for rec, roll in scored_all:
        who = (rec["committed_by"].get("job_id"), rec["committed_by"].get("pid"))
        if roll is not None:
            out.append(max(0.0, rec["claimed_at"] - max(roll["committed_at"], free.get(who, float("-inf")))))
        free[who] = rec["committed_at"]
    return out


def _pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def scale_case(workers: int, shards: int, steps: Optional[int] = None) -> List[dict]:
    steps = steps or (2 if shards > 1024 else 3)
    per_task = max(1, (workers - 1) // 2)
    with tempfile.TemporaryDirectory(prefix="sluice-bench-scale-") as tmp:
        run_dir = Path(tmp) / "run"
        data = write_dataset(Path(tmp) / "train.jsonl", max(shards, 64))
        wall = synthetic_run(run_dir, [
            f"synthetic.workers_per_task={per_task}", f"distillation.max_num_steps={steps}",
            f"distillation.num_prompts_per_step={shards}", "distillation.num_generations_per_prompt=1",
            "queue.prompts_per_shard=1", f"data.train.data_path={data}", "data.train.dataset_name=null",
            "distillation.max_staleness=1", "synthetic.generate_s=0.05", "synthetic.score_s=0.05",
            "synthetic.train_s=0.0", "synthetic.reload_s=0.05", "synthetic.export_s=0.05",
            "synthetic.response_tokens=4"])
        rows = metric_rows(run_dir)
        lat = handoffs(run_dir, range(2, steps + 1))
    from shared.config import QueueConfig

    poll = QueueConfig().poll_s
    cpu = [rows[t]["timing/coordinator_cpu_s"] for t in sorted(rows) if t >= 2]
    tag = f"{2 * per_task + 1}w_{shards}shards"
    return [
        {"name": f"coordinator_cpu_{tag}", "value": round(statistics.median(cpu), 3), "unit": "s",
         "baseline": shards, "ratio": round(statistics.median(cpu) / shards * 1000, 3), "better": "lower",
         "note": f"coordinator CPU s per step; ratio = ms per shard (linear: flat); run {wall:.0f} s"},
        {"name": f"handoff_p50_{tag}", "value": round(statistics.median(lat), 4), "unit": "s",
         "baseline": poll, "ratio": round(statistics.median(lat) / poll, 3), "better": "lower",
         "note": f"commit -> claim, median of {len(lat)}"},
        {"name": f"handoff_p99_{tag}", "value": round(_pct(lat, 0.99), 4), "unit": "s", "baseline": poll,
         "ratio": round(_pct(lat, 0.99) / poll, 3), "target": 2.0, "better": "lower",
         "note": "commit -> claim, p99; target < 2 x queue.poll_s"},
    ]


# --------------------------------------------------------------- commit overhead


def commit_overhead(n: int, refresh_each: bool) -> float:
    """Median seconds per commit over the last 32 commits of a stage filled to `n` shards."""
    import pyarrow as pa  # noqa: F401  (the table below)

    from shared import schemas
    from shared.queue import StageQueue

    table = schemas.build_table("prompts", [{"sample_id": "s", "step": 1, "problem": "p", "answer": "a",
                                             "prompt_ids": [1, 2, 3], "dataset": "d", "index": 0}])
    with tempfile.TemporaryDirectory(prefix="sluice-bench-commit-") as tmp:
        q = StageQueue(tmp, 1, "prompts")
        q.expect(n)
        times = []
        for k in range(n):
            t0 = time.perf_counter()
            q.commit(k, table)
            if refresh_each:
                q.refresh_manifest()  # what every commit did before the journal
            times.append(time.perf_counter() - t0)
    return statistics.median(times[-32:])


def commit_entries(sizes=(64, 512, 4096)) -> List[dict]:
    out = []
    for n in sizes:
        now, before = commit_overhead(n, False), commit_overhead(n, True)
        out.append({"name": f"commit_overhead_{n}shards", "value": round(now * 1000, 3), "unit": "ms",
                    "baseline": round(before * 1000, 3), "ratio": round(now / before, 3), "better": "lower",
                    "note": "per commit as the stage fills; baseline: commit + manifest rebuilt from "
                            "a scan of every record (the old commit)"})
    return out


def run(out: dict, only: Optional[str] = None, quick: bool = False) -> dict:
    entries = out.setdefault("entries", [])
    if only in (None, "commit"):
        entries.extend(commit_entries((64, 512) if quick else (64, 512, 4096)))
    if only in (None, "pipeline"):
        for case in CASES:
            for staleness in (1, 0):
                entries.append(pipeline_case(case, staleness, steps=8 if quick else PIPELINE_STEPS))
    if only in (None, "scale"):
        for workers, shards in (SCALE[:2] if quick else SCALE):
            entries.extend(scale_case(workers, shards))
        out.setdefault("notes", []).append(SCALE_NOTE)
    return out


SCALE_NOTE = (
    "Scale runs put up to 255 worker processes (plus the coordinator) on this 2-core box, whose "
    "load average then stays above 200: a worker whose input has landed can wait a second for a "
    "CPU, so the 255-worker p99 hand-off measures the box's scheduler more than the queue (its "
    "median stays under 0.1 s, and the p99 is under 2 x poll_s up to 127 workers). Every shard "
    "costs three fsync'd commits and a verified read, so 256 workers x 4096 shards a step would "
    "hold this box for most of an hour: 4096 shards run with 31 workers. A commit costs the same "
    "at 64 and 4096 shards (commit_overhead_*); the coordinator's CPU per step grows with the "
    "shards it writes and follows, about 1-2 ms a shard here.")


def main() -> None:
    p = argparse.ArgumentParser(description="pipeline and scale benchmark (see the module docstring)")
    p.add_argument("--only", choices=["pipeline", "scale", "commit"])
    p.add_argument("--quick", action="store_true", help="fewer steps and sizes (a smoke of the benchmark)")
    args = p.parse_args()
    print(json.dumps(run({}, args.only, args.quick), indent=1))


if __name__ == "__main__":
    main()

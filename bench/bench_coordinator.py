"""Coordinator and pipeline overheads, from one smoke run on the local executor.

    .venv/bin/python -m bench.bench_coordinator [--steps 12] [--keep DIR]

Runs `launch.run conf=smoke distillation.max_staleness=1 distillation.max_num_steps=N`
(tiny models, CPU) and measures everything from the files the run leaves (commit records,
train.json, events), so nothing is instrumented specially for the benchmark:

  coordinator_overhead_per_step   median over steps t of: steps/t/train.json written ->
                                  the first prompts shard of the step that train.json lets the
                                  coordinator start (t + 1 + (1 + max_staleness)) committed.
                                  The coordinator's whole part in a step (poll, metrics row,
                                  prompts). Baseline: queue.poll_s. Target <= 1 s.
  handoff_rollouts_to_scored      median over shards of: rollouts shard k committed (or the
                                  teacher free again, if later) -> the teacher claims scored
                                  shard k. Worker polling, no coordinator involved. Uses the
                                  commit record's `claimed_at` when the queue records it,
                                  else `committed_at - score_s` (includes the shard read: an
                                  upper bound). Baseline: queue.poll_s. Target <= 0.1 s.
  step_time_vs_busy_sum           median steady-state step time (train.json of t-1 -> of t,
                                  t >= 2) over the median per-step sum of the three pools'
                                  busy times (generation gen_s, teacher score_s, training
                                  train_s + read_s + save_s). On this box the roles share
                                  two cores, so they cannot overlap for free: the target is
                                  <= 1.25 (the pipeline's overhead over running the roles
                                  back to back). bench_pipeline measures overlap itself,
                                  with roles that do not compete for the CPU.

On a 2-core box the three pools share the cores, so each pool's busy time is inflated by the
others running at the same moment; the ratio shows that work overlaps in wall-clock time, not
that the overlap is free.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def _records(run_dir: Path, step: int, stage: str) -> Dict[int, dict]:
    from shared.queue import StageQueue
    from shared.rundir import RunDir

    return StageQueue(RunDir(run_dir), step, stage).committed()


def _train(run_dir: Path, step: int) -> dict:
    from shared.rundir import RunDir

    return json.loads(RunDir(run_dir).train_record(step).read_text())


def _train_time(run_dir: Path, step: int) -> float:
    from shared.rundir import RunDir

    return RunDir(run_dir).train_record(step).stat().st_mtime


def measure(run_dir: Path) -> dict:
    """The figures of a finished run (see the module docstring)."""
    from shared.rundir import RunDir, trained_steps
    from shared.worker import load_run_config

    cfg = load_run_config(run_dir)
    steps = trained_steps(RunDir(run_dir))
    ahead = 1 + cfg.distillation.max_staleness

    reaction: List[float] = []
    for t in steps:
        nxt = t + 1 + ahead  # the first step whose prompts wait for step t's train.json
        recs = _records(run_dir, nxt, "prompts") if RunDir(run_dir).step_dir(nxt).exists() else {}
        if recs:
            reaction.append(min(r["committed_at"] for r in recs.values()) - _train_time(run_dir, t))

    handoff: List[float] = []
    exact = True
    teacher_free: Dict[str, float] = {}
    scored_all = []
    for t in steps:
        rolls = _records(run_dir, t, "rollouts")
        for k, rec in _records(run_dir, t, "scored").items():
            scored_all.append((t, k, rec, rolls.get(k)))
    scored_all.sort(key=lambda x: x[2]["committed_at"])
    for t, k, rec, roll in scored_all:
        who = str(rec["committed_by"].get("job_id"))
        if "claimed_at" in rec and rec["claimed_at"] is not None:
            start = rec["claimed_at"]
        else:
            exact = False
            start = rec["committed_at"] - float(rec.get("extra", {}).get("score_s", 0.0))
        if roll is not None:
            ready = max(roll["committed_at"], teacher_free.get(who, float("-inf")))
            handoff.append(start - ready)
        teacher_free[who] = rec["committed_at"]

    intervals, busy = [], []
    for t in steps:
        tr = _train(run_dir, t)
        timing = tr.get("timing", {})
        gen = sum(float(r.get("extra", {}).get("gen_s", 0.0)) for r in _records(run_dir, t, "rollouts").values())
        score = sum(float(r.get("extra", {}).get("score_s", 0.0)) for r in _records(run_dir, t, "scored").values())
        train = sum(float(timing.get(k, 0.0)) for k in ("train_s", "read_s", "save_s"))
        if t >= 2 and t - 1 in steps:
            intervals.append(_train_time(run_dir, t) - _train_time(run_dir, t - 1))
            busy.append(gen + score + train)
    return {"poll_s": cfg.queue.poll_s, "max_staleness": cfg.distillation.max_staleness,
            "steps": len(steps), "reaction_s": reaction, "handoff_s": handoff,
            "handoff_exact": exact, "step_interval_s": intervals, "busy_sum_s": busy}


def run_smoke(run_dir: Path, steps: int, timeout_s: float = 1500, extra: tuple = ()) -> float:
    cmd = [sys.executable, "-m", "launch.run", "conf=smoke", f"launch.run_dir={run_dir}",
           "launch.detach=false", "distillation.max_staleness=1", f"distillation.max_num_steps={steps}",
           *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.time() - t0


def entries(m: dict) -> List[dict]:
    med = statistics.median
    out = []
    if m["reaction_s"]:
        v = med(m["reaction_s"])
        out.append({"name": "coordinator_overhead_per_step", "value": round(v, 3), "baseline": m["poll_s"],
                    "ratio": round(v / m["poll_s"], 3), "target": 1.0, "compare": round(v, 3),
                    "unit": "s", "better": "lower",
                    "note": "train.json(t) -> first prompts commit of the step it unblocks; baseline "
                            "queue.poll_s; target on the value"})
    if m["handoff_s"]:
        v = med(m["handoff_s"])
        out.append({"name": "handoff_rollouts_to_scored", "value": round(v, 3), "baseline": m["poll_s"],
                    "ratio": round(v / m["poll_s"], 3), "target": 0.1, "compare": round(v, 3),
                    "unit": "s", "better": "lower",
                    "note": ("rollouts commit -> scored claim" if m["handoff_exact"] else
                             "rollouts commit -> scored start (committed_at - score_s: includes the read)")})
    if m["step_interval_s"]:
        v, b = med(m["step_interval_s"]), med(m["busy_sum_s"])
        out.append({"name": "step_time_vs_busy_sum", "value": round(v, 2), "baseline": round(b, 2),
                    "ratio": round(v / b, 3), "target": 1.25, "unit": "s", "better": "lower",
                    "note": f"max_staleness={m['max_staleness']}: steady-state step time over the sum "
                            "of the generation, teacher and training busy times of a step"})
    return out


def run(out: dict, steps: int = 12, keep: str | None = None) -> dict:
    """Run the smoke, measure, append the entries to out["entries"]; returns out."""
    tmp = None
    if keep:
        run_dir = Path(keep)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sluice-bench-coord-")
        run_dir = Path(tmp.name) / "run"
    try:
        wall = run_smoke(run_dir, steps)
        m = measure(run_dir)
        # The same run with hand-offs at poll_s quanta (no fast looks): on a box where the
        # roles share the cores, quicker hand-offs make them compute at the same moments.
        run_smoke(run_dir.with_name(run_dir.name + "-poll"), steps,
                  extra=(f"queue.fast_poll_s={m['poll_s']}",))
        slow = measure(run_dir.with_name(run_dir.name + "-poll"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    out.setdefault("entries", []).extend(entries(m))
    med = statistics.median
    out["entries"].append({
        "name": "step_time_fast_vs_poll_handoffs", "value": round(med(m["step_interval_s"]), 2),
        "baseline": round(med(slow["step_interval_s"]), 2), "unit": "s", "better": "lower",
        "ratio": round(med(m["step_interval_s"]) / med(slow["step_interval_s"]), 3),
        "note": f"median step time with paced hand-offs (median {med(m['handoff_s']):.3f} s) vs "
                f"queue.fast_poll_s=queue.poll_s (median {med(slow['handoff_s']):.3f} s); busy sums "
                f"{med(m['busy_sum_s']):.2f} vs {med(slow['busy_sum_s']):.2f} s"})
    out.setdefault("notes", []).append(
        "On this 2-core box the three roles share the CPU (the vLLM CPU engine alone keeps a core "
        "busy), so hand-offs that take tens of milliseconds instead of poll_s quanta make the roles "
        "compute at the same moments, and each runs slower: compare the busy sums in "
        "step_time_fast_vs_poll_handoffs. On a cluster each role has its own GPUs and the overlap "
        "is free (bench_pipeline's synthetic runs, where roles do not compete for the CPU). A CPU "
        "box can keep the old pacing with queue.fast_poll_s equal to queue.poll_s.")
    out["coordinator_setup"] = {"executor": "local", "recipe": "smoke", "steps": steps,
                                "max_staleness": m["max_staleness"], "poll_s": m["poll_s"],
                                "run_wall_s": round(wall, 1), "samples": {
                                    k: [round(x, 3) for x in m[k]]
                                    for k in ("reaction_s", "handoff_s", "step_interval_s", "busy_sum_s")}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="coordinator benchmark (see the module docstring)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--keep", help="run directory to create and keep (default: a temporary one)")
    p.add_argument("--measure", help="only measure this finished run directory")
    args = p.parse_args()
    if args.measure:
        out = {"entries": entries(measure(Path(args.measure)))}
    else:
        out = run({}, args.steps, args.keep)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Per-step metrics from the files of a step, with the names NeMo-RL users chart.

    from launch.metrics import step_metrics, summary
    step_metrics(RunDir(path), 3, cfg)   # {"step": 3, "train/loss": ..., "timing/generation": ...}

Everything is derived from RUN_DIR (train.json, the shards and their commit records), so the
metrics of a step can be recomputed at any time: `python -m launch.inspect RUN_DIR --json`.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import pyarrow.compute as pc

from shared.context import add_counts, metrics as cd_metrics
from shared.files import read_json
from shared.pipeline import PRODUCER, WORKER_STAGES
from shared.queue import StageQueue
from shared.rundir import RunDir, read_metrics

STAGE_BUSY_KEY = {"rollouts": "gen_s", "scored": "score_s"}


def _stage_window(q: StageQueue) -> Optional[Dict[str, float]]:
    recs = list(q.committed().values())
    if not recs:
        return None
    busy_key = STAGE_BUSY_KEY.get(q.stage)
    busy = [float(r.get("extra", {}).get(busy_key, 0.0)) for r in recs] if busy_key else [0.0]
    ends = [r["committed_at"] for r in recs]
    starts = [e - b for e, b in zip(ends, busy)]
    return {"start": min(starts), "end": max(ends), "busy": float(sum(busy)),
            "tokens": float(sum(r.get("extra", {}).get("tokens", 0) for r in recs))}


def step_metrics(rd: RunDir, step: int, cfg) -> dict:
    row: Dict[str, float] = {"step": step}
    train = read_json(rd.train_record(step), {}) or {}
    for key in ("loss", "grad_norm", "lr"):
        if key in train:
            row[f"train/{key}"] = train[key]
    for key in ("tokens", "valid_tokens", "samples", "optimizer_steps"):
        if key in train:
            row[f"train/{key}"] = train[key]
    if "tokens_per_s_per_gpu" in train:
        row["throughput/training_tokens_per_s_per_gpu"] = train["tokens_per_s_per_gpu"]

    lengths, finish = [], []
    rq = StageQueue(rd, step, "rollouts")
    for k in sorted(rq.committed()):
        t = rq.read(k)
        lengths.append(pc.list_value_length(t.column("response_ids")).to_numpy())
        finish.extend(t.column("finish_reason").to_pylist())
    if lengths:
        lens = np.concatenate(lengths)
        row["train/mean_gen_tokens_per_sample"] = float(lens.mean())
        row["train/truncation_rate"] = float(np.mean([f == "length" for f in finish]))
        row["train/natural_termination_rate"] = float(np.mean([f == "stop" for f in finish]))

    windows = {}
    for stage in ("prompts", "rollouts", "scored"):
        w = _stage_window(StageQueue(rd, step, stage))
        if w:
            windows[stage] = w
    for stage in WORKER_STAGES:
        if stage in windows:
            w, label = windows[stage], PRODUCER[stage]
            row[f"timing/{label}"] = w["end"] - w["start"]
            row[f"timing/{label}_busy"] = w["busy"]
            if w["busy"] > 0 and w["tokens"]:
                row[f"throughput/{label}_tokens_per_s"] = w["tokens"] / w["busy"]
    cd = cfg.distillation.context_distillation
    if cd.enabled and cd.metrics.enabled:
        counts: Dict[str, int] = {}
        for rec in StageQueue(rd, step, "scored").committed().values():
            counts = add_counts(counts, rec.get("extra", {}).get("context_distillation", {}))
        row.update(cd_metrics(counts))
    timing = train.get("timing", {})
    for key, val in timing.items():
        row[f"timing/training_{key}"] = val
    row.update(step_times(rd, step, windows.get("prompts", {}).get("start")))
    return row


def step_times(rd: RunDir, step: int, prompts_written: Optional[float]) -> Dict[str, float]:
    """timing/step: seconds between the ends (training results) of step - 1 and `step`, what
    a step costs in a pipeline where steps overlap (absent for a run's first step);
    timing/step_latency: from the writing of the step's prompts (done ahead, while earlier
    steps train) to its training result, how long one step's samples take to be trained on."""
    out: Dict[str, float] = {}
    try:
        end = rd.train_record(step).stat().st_mtime
    except FileNotFoundError:
        return out
    if prompts_written is not None:
        out["timing/step_latency"] = end - prompts_written
    try:
        out["timing/step"] = end - rd.train_record(step - 1).stat().st_mtime if step > 1 else None
    except FileNotFoundError:
        pass
    return {k: v for k, v in out.items() if v is not None}


def summary(rd: RunDir, elapsed_s: float) -> str:
    rows = [r for r in read_metrics(rd) if "train/loss" in r]
    if not rows:
        return f"run {rd.root}: no steps trained"
    samples = sum(r.get("train/samples", 0) for r in rows)
    tokens = sum(r.get("train/tokens", 0) for r in rows)
    lines = [f"run {rd.root} finished: {len(rows)} steps, {int(samples)} samples, "
             f"{int(tokens)} tokens in {elapsed_s:.0f}s",
             f"  loss: first {rows[0]['train/loss']:.4f} -> last {rows[-1]['train/loss']:.4f}"]
    for label in (PRODUCER[s] for s in WORKER_STAGES):
        vals = [r[f"timing/{label}"] for r in rows if f"timing/{label}" in r]
        if vals:
            lines.append(f"  time per step, {label}: mean {np.mean(vals):.1f}s")
    vals = [r["timing/training_train_s"] for r in rows if "timing/training_train_s" in r]
    if vals:
        lines.append(f"  time per step, training: mean {np.mean(vals):.1f}s")
    lines.append(f"  inspect: python -m launch.inspect {rd.root}")
    return "\n".join(lines)

"""Look inside a run directory: what every step and stage holds, and what happened.

    python -m launch.inspect RUN_DIR                         # steps x stages table + recent events
    python -m launch.inspect RUN_DIR --json                  # the same, as JSON for scripts
    python -m launch.inspect RUN_DIR --step 3 --stage scored --shard 0 --head 2
                                                             # decoded rows (text, teacher top-k)
    python -m launch.inspect RUN_DIR --verify                # check every checksum; exit 1 on damage
    python -m launch.inspect RUN_DIR --plot curves.png       # loss, accuracy, time per stage
    python -m launch.inspect RUN_DIR --timeline timeline.png # each worker's activity over time

The default output (and --json's "gpu_hours") ends with where the GPU-hours go: per role, the
GPU-hours held (sacct's under Slurm), the busy fraction and the idle time by reason
(launch.timeline).

Reads files only (never imports torch); safe to run while the run is going.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from launch.plot import plot_run
from launch.timeline import draw, format_report, run_report
from shared.chat import ChatTokenizer
from shared.errors import UserError, exit_with
from shared.files import read_json
from shared.models import find_model
from shared.pipeline import STAGES, check_stage
from shared.queue import StageQueue
from shared.rundir import (RunDir, check_shard_index, check_step, is_committed_dir, read_events,
                           step_numbers, worker_records)
from shared.schemas import topk_from_arrow
from shared.worker import load_run_config


def _open_run(path: str) -> RunDir:
    rd = RunDir(path)
    if not rd.run_file.is_file():
        raise UserError(f"{path}: not a Sluice run directory (no run.json). Fix: give the "
                        "directory printed by python -m launch.run.")
    return rd


def _claims(q: StageQueue, expected: Optional[int]) -> List[dict]:
    out = []
    for k in range(expected or 0):
        info = q.claim_info(k)
        if info:
            out.append({"shard": k, "job_id": info.get("job_id"), "task_id": info.get("task_id"),
                        "host": info.get("host"), "heartbeat_age_s": round(info["age_s"], 1)})
    return out


def stage_status(rd: RunDir, step: int, stage: str) -> dict:
    q = StageQueue(rd, step, stage)
    expected = q.expected()
    committed = q.committed()
    qdir = q.dir / "quarantine"
    quarantined = sorted(p.name for p in qdir.glob("*.reason.json")) if qdir.is_dir() else []
    return {
        "expected": expected, "committed": len(committed),
        "rows": sum(r.get("rows", 0) for r in committed.values()),
        "bytes": sum(r.get("bytes", 0) for r in committed.values()),
        "claims": _claims(q, expected), "quarantined": quarantined,
    }


def run_status(rd: RunDir) -> dict:
    state = read_json(rd.state_file, {}) or {}
    steps = []
    for t in step_numbers(rd):
        train = read_json(rd.train_record(t))
        steps.append({
            "step": t,
            **{s: stage_status(rd, t, s) for s in STAGES},
            "trained": train is not None,
            "loss": train.get("loss") if train else None,
        })
    events = read_events(rd)
    workers = [info for _, info in worker_records(rd)]
    return {
        "run_dir": str(rd.root), "phase": state.get("phase", "not started"),
        "total_steps": state.get("total_steps"), "trained_step": state.get("trained_step", 0),
        "retries": state.get("retries", {}), "jobs": state.get("jobs", {}), "steps": steps,
        "workers": workers,
        "restarts": restarts(events),
        "failures": [e for e in events if e["event"] in ("job_failed", "run_failed",
                                                         "placement_violation", "worker_hung",
                                                         "orphan_job_cancelled")],
        "events": events,
        "gpu_hours": run_report(rd),
    }


def restarts(events: List[dict]) -> Dict[str, dict]:
    """Per job key: how often the scheduler ended or requeued it (time limit, preemption,
    requeue: never failures) and the wall-clock each restart cost that job, from the end of
    its workers to the first worker of its replacement past loading (events job_back)."""
    out: Dict[str, dict] = {}
    for e in events:
        if e["event"] in ("job_time_limit", "job_preempted", "job_requeued"):
            r = out.setdefault(e["job"], {"time_limit": 0, "preempted": 0, "requeued": 0, "down_s": []})
            r[e["event"][len("job_"):]] += 1
        elif e["event"] == "job_back" and e.get("job") in out:
            out[e["job"]]["down_s"].append(e["down_s"])
    return out


def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def print_status(st: dict) -> None:
    print(f"run {st['run_dir']}\nphase: {st['phase']}   trained: {st['trained_step']}"
          f"/{st['total_steps'] if st['total_steps'] is not None else '?'}   retries: {st['retries']}")
    header = f"{'step':>6}  {'prompts':>14}  {'rollouts':>14}  {'scored':>14}  {'loss':>9}  claims / quarantined"
    print(header)
    for s in st["steps"]:
        cells = []
        notes = []
        for stage in STAGES:
            x = s[stage]
            exp = "?" if x["expected"] is None else x["expected"]
            cells.append(f"{x['committed']}/{exp} {x['rows']}r {_size(x['bytes'])}")
            for c in x["claims"]:
                notes.append(f"{stage}[{c['shard']}] by job {c['job_id']} task {c['task_id']} "
                             f"({c['heartbeat_age_s']}s)")
            if x["quarantined"]:
                notes.append(f"{stage}: {len(x['quarantined'])} quarantined")
        loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
        print(f"{s['step']:>6}  " + "  ".join(f"{c:>14}" for c in cells) + f"  {loss:>9}  " + "; ".join(notes))
    if st["restarts"]:
        print("restarts by the scheduler (never failures); wall-clock lost per restart:")
        for key, r in st["restarts"].items():
            down = r["down_s"]
            lost = (f"mean {sum(down) / len(down):.0f}s, max {max(down):.0f}s over {len(down)}"
                    if down else "-")
            print(f"  {key:<28} time limits {r['time_limit']}, preempted {r['preempted']}, "
                  f"requeued {r['requeued']}; lost {lost}")
    if st["jobs"]:
        print("jobs:")
        for key, info in st["jobs"].items():
            print(f"  {key:<28} job {info.get('job_id')} attempt {info.get('attempt', 0)} "
                  f"({'+'.join(info.get('roles', []))})")
    if st["workers"]:
        print("workers:")
        now = time.time()
        for w in st["workers"]:
            print(f"  {w['role']:<10} job {w.get('job_id')} task {w.get('task_id')} on {w.get('node')} "
                  f"gpus={w.get('gpus')} {w.get('status')} (heartbeat {now - w.get('heartbeat', now):.0f}s ago)"
                  + (f": {w['detail']}" if w.get("detail") else ""))
    gpu_hours = format_report(st.get("gpu_hours") or {})
    if gpu_hours:
        print(gpu_hours)
    if st["failures"]:
        print("failures:")
        for e in st["failures"]:
            print(f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['event']} "
                  + " ".join(f"{k}={v}" for k, v in e.items()
                             if k not in ("time", "event", "last_lines", "worker_said")))
            for line in e.get("worker_said", []):
                print(f"    {line}")
    recent = st["events"][-8:]
    if recent:
        print("recent events:")
        for e in recent:
            print(f"  {time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['event']} "
                  + " ".join(f"{k}={v}" for k, v in e.items()
                             if k not in ("time", "event", "last_lines")))


def _tokenizer(rd: RunDir):
    cfg = load_run_config(rd)
    path = find_model(cfg.policy.tokenizer.name or cfg.policy.model_name)
    if path is None or not Path(path).exists():
        return None
    return ChatTokenizer.from_dir(path)


def decode_rows(rd: RunDir, step: int, stage: str, shard: Optional[int], head: int, topn: int = 3) -> List[dict]:
    q = StageQueue(rd, step, stage)
    shards = [shard] if shard is not None else sorted(q.committed())
    tok = _tokenizer(rd)
    dec = (lambda ids: tok.decode(ids, skip_special_tokens=False)) if tok else (lambda ids: None)
    out = []
    for k in shards:
        table = q.read(k)
        n = min(head, table.num_rows)
        rows = table.slice(0, n).to_pylist()
        topk = None
        if stage == "scored":
            topk = topk_from_arrow(table.slice(0, n))
        for r_i, r in enumerate(rows):
            item = {"shard": k, "sample_id": r["sample_id"], "problem": r["problem"],
                    "answer": r["answer"], "prompt_tokens": len(r["prompt_ids"]),
                    "prompt_text": dec(r["prompt_ids"])}
            if "response_ids" in r:
                item.update(response_text=r["response_text"], response_tokens=len(r["response_ids"]),
                            finish_reason=r["finish_reason"], policy_version=r["policy_version"])
            if topk is not None:
                a, b = int(topk.offsets[r_i]), int(topk.offsets[r_i + 1])
                probs = topk.logprobs[a:b].exp()
                per_token = []
                for t in range(b - a):
                    ids = topk.ids[a + t, :topn].tolist()
                    per_token.append({
                        "token": dec([r["response_ids"][t]]) if tok else r["response_ids"][t],
                        "teacher_top": [(dec([i]) if tok else i, round(float(p), 4))
                                        for i, p in zip(ids, probs[t, :topn].tolist())]})
                item.update(sample_mask=r["sample_mask"], teacher_model=r["teacher_model"],
                            alignment_offset=r["alignment_offset"],
                            teacher_prompt_text=dec(r["teacher_prompt_ids"]) if r.get("teacher_prompt_ids") else None,
                            trace_found=r.get("trace_found"), prefix_truncated=r.get("prefix_truncated"),
                            tokens=per_token)
            out.append(item)
    return out


def print_rows(rows: List[dict]) -> None:
    for r in rows:
        print(f"=== shard {r['shard']} sample {r['sample_id']}")
        print(f"problem: {r['problem']}\nanswer:  {r['answer']}")
        if r.get("prompt_text") is not None:
            print(f"prompt ({r['prompt_tokens']} tokens): {r['prompt_text']!r}")
        if "response_text" in r:
            print(f"response ({r['response_tokens']} tokens, {r['finish_reason']}, policy v"
                  f"{r['policy_version']}): {r['response_text']!r}")
        if "tokens" in r:
            if r.get("teacher_prompt_text"):
                print(f"teacher prompt: {r['teacher_prompt_text']!r} (trace_found={r['trace_found']}, "
                      f"prefix_truncated={r['prefix_truncated']})")
            print(f"teacher {r['teacher_model']}, sample_mask={r['sample_mask']}, "
                  f"alignment_offset={r['alignment_offset']}")
            for t, tokinfo in enumerate(r["tokens"]):
                tops = ", ".join(f"{tok!r}:{p:.3f}" for tok, p in tokinfo["teacher_top"])
                print(f"  [{t:4d}] {tokinfo['token']!r:>14}  teacher: {tops}")


def verify(rd: RunDir) -> dict:
    """Every shard against its checksum, leftovers, stale claims, and the weights of trained
    steps (those the coordinator pruned, once no longer needed, excepted)."""
    problems = {"corrupt": [], "orphaned": [], "stale_claims": [], "missing_weights": []}
    pruned = {v for e in read_events(rd) if e.get("event") == "weights_pruned" for v in e.get("versions", [])}
    for t in step_numbers(rd):
        for stage in STAGES:
            rep = StageQueue(rd, t, stage).verify(deep=True)
            problems["corrupt"] += rep.corrupt
            problems["orphaned"] += rep.orphaned
            problems["stale_claims"] += rep.stale_claims
        if rd.train_record(t).exists() and t not in pruned:
            w = rd.weights_dir(t)
            if not is_committed_dir(w):
                problems["missing_weights"].append(str(w))
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.inspect", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--step", type=int)
    p.add_argument("--stage")
    p.add_argument("--shard", type=int)
    p.add_argument("--head", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--plot")
    p.add_argument("--timeline", help="write each worker's activity over time to this PNG")
    args = p.parse_args(argv)
    try:
        rd = _open_run(args.run_dir)
        if args.verify:
            problems = verify(rd)
            bad = any(problems.values())
            if args.json:
                print(json.dumps(problems, indent=1, default=str))
            else:
                for kind, items in problems.items():
                    for it in items:
                        print(f"{kind}: {it}")
                print("verify: " + ("problems found (corrupt shards were quarantined and will be "
                                    "redone)" if bad else "all shards match their checksums"))
            return 1 if bad else 0
        if args.plot:
            plot_run(rd, args.plot)
            print(f"wrote {args.plot}")
            return 0
        if args.timeline:
            draw(rd, args.timeline)
            print(f"wrote {args.timeline}")
            return 0
        if args.step is not None or args.stage is not None:
            if args.step is None or args.stage is None:
                raise UserError("--step and --stage go together. Fix: e.g. --step 3 --stage scored.")
            try:
                step, stage = check_step(args.step), check_stage(args.stage)
                shard = None if args.shard is None else check_shard_index(args.shard)
            except ValueError as e:
                raise UserError(f"{e}. Fix: steps and shards are non-negative integers; stages are "
                                f"{', '.join(STAGES)}.") from None
            rows = decode_rows(rd, step, stage, shard, args.head)
            if args.json:
                print(json.dumps(rows, indent=1, default=str))
            else:
                print_rows(rows)
            return 0
        st = run_status(rd)
        if args.json:
            print(json.dumps(st, indent=1, default=str))
        else:
            print_status(st)
        return 0
    except UserError as e:
        exit_with(e, "launch.inspect")


if __name__ == "__main__":
    sys.exit(main())

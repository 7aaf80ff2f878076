"""Where the GPU-hours go: each worker's activity over time, and per role the GPU-hours held,
the busy fraction and the idle time by reason.

    python -m launch.inspect RUN_DIR --timeline timeline.png   # one lane per worker
    python -m launch.inspect RUN_DIR                           # ... and "Where the GPU-hours go"

    from launch.timeline import lanes, role_report, draw
    role_report(RunDir(RUN_DIR))     # {"generation": {"gpu_hours", "busy_fraction", ...}, ...}

What it reads: every worker's record and activity log (workers/<role>/<name>.json and
<name>.activity.jsonl, written by shared.worker): a status holds from its line's time to the
next line's; a worker's lane ends at its final status (exited, done, stopped, failed, lost)
or, for a worker killed before it could say so, at its record's last heartbeat. Statuses map
to categories in CATEGORY_RULES. Step ends are the mtimes of steps/<t>/train.json.

GPU-hours: with the local executor, each worker's lane span times its GPUs. Under Slurm
(run.json's executor), what sacct says the role's jobs held: ElapsedRaw times the job's
gres/gpu (or, on a cluster without GPU gres, the GPUs the plan gives the job's workers), a
job of several roles split by the plan's GPUs per role; every run of a requeued job counts.
The busy fraction is always on the workers' own lanes: allocated time before a worker starts
(job start-up, Python imports) and after it ends is in the GPU-hours, not in the fraction.

Uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
CPU only: never imports torch or vLLM.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from shared.files import read_json
from shared.partition import Plan, job_units
from shared.pipeline import ROLE_NAMES
from shared.rundir import RunDir, read_events, trained_steps, worker_records
from shared.worker import FINAL_STATUSES, activity_path

# Status -> category, first match wins: (status, role or None for any, detail prefix or None
# for any, category). A status no rule matches is "other"; final statuses end the lane.
CATEGORY_RULES = (
    ("generating", None, None, "busy"),
    ("validating", None, None, "busy"),
    ("scoring", None, None, "busy"),
    ("training", None, None, "busy"),
    ("waiting", None, None, "waiting"),
    # Generation reloads the new weights into its running engine: "weights version N".
    ("loading", "generation", "weights version", "reloading"),
    ("loading", None, None, "loading"),
    ("starting", None, None, "loading"),
    ("saving", None, None, "saving"),  # the trainer's weights export and checkpoints
    ("committing", None, None, "committing"),
    # The worker's own record write between two statuses (shared.worker: "left" to "t").
    ("bookkeeping", None, None, "bookkeeping"),
)
# Every category, in legend order, with its colour.
CATEGORIES = {
    "busy": "tab:green", "waiting": "lightgray", "loading": "tab:blue",
    "reloading": "tab:cyan", "saving": "tab:purple", "committing": "tab:orange",
    "bookkeeping": "khaki", "other": "tab:brown",
}
IDLE = tuple(c for c in CATEGORIES if c != "busy")
# A worker record without an activity log (a run from before the logs): one segment from
# its start to its last heartbeat, of this status.
UNRECORDED = "unrecorded"
SACCT_FIELDS = "JobID,ElapsedRaw,Submit,Start,End,State,AllocTRES"
SACCT_TIMEOUT_S = 30.0


def category(role: str, status: str, detail: str = "") -> str:
    for st, r, prefix, cat in CATEGORY_RULES:
        if st == status and r in (None, role) and (prefix is None or detail.startswith(prefix)):
            return cat
    return "other"


@dataclass
class Lane:
    """One worker's activity: segments (start, end, status, category) in unix seconds."""

    role: str
    name: str
    """"<role> task <task_id>"."""
    node: str
    job_id: Optional[str]
    task_id: str
    gpus: int
    segments: List[Tuple[float, float, str, str]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} @{self.node}"

    @property
    def start(self) -> float:
        return self.segments[0][0] if self.segments else 0.0

    @property
    def end(self) -> float:
        return self.segments[-1][1] if self.segments else 0.0

    @property
    def span_s(self) -> float:
        return self.end - self.start

    def seconds(self, cat: str) -> float:
        return sum(b - a for a, b, _, c in self.segments if c == cat)


def read_activity(path: Path) -> List[dict]:
    """The lines of an activity log, by time; a damaged line (a killed writer's half line,
    a line without a time or status) is skipped."""
    try:
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
            t = float(row["t"])
            rows.append({"t": t, "left": min(float(row.get("left", t)), t), "status": str(row["status"]),
                         "detail": str(row.get("detail") or "")})
        except (ValueError, TypeError, KeyError):
            continue
    return sorted(rows, key=lambda r: r["t"])


def segments(role: str, rows: List[dict], record: dict) -> List[Tuple[float, float, str, str]]:
    """A worker's segments from its activity lines; the last one ends at the next line, at
    its final status, or (killed: no final line) at the record's heartbeat. A status ends
    when the worker left it (the next line's "left"); the worker's record write until the
    next status began is a segment of its own, status "bookkeeping"."""
    out = []
    for i, row in enumerate(rows):
        if row["status"] in FINAL_STATUSES:
            break
        if i + 1 < len(rows):
            end, following = rows[i + 1]["left"], rows[i + 1]["t"]
        else:
            end = following = float(record.get("heartbeat") or row["t"])
        if end > row["t"]:
            out.append((row["t"], end, row["status"], category(role, row["status"], row["detail"])))
        if following > max(end, row["t"]):
            out.append((max(end, row["t"]), following, "bookkeeping", category(role, "bookkeeping", "")))
    return out


def read_plan(rd: RunDir) -> Tuple[Optional[Plan], Optional[str]]:
    """(plan, executor) from run.json; (None, None) where it has neither."""
    run = read_json(rd.run_file, {}) or {}
    plan = Plan.from_dict(run["plan"]) if run.get("plan") else None
    return plan, run.get("executor")


def _worker_gpus(role: str, record: dict, plan: Optional[Plan]) -> int:
    """The GPUs one worker uses: its CUDA_VISIBLE_DEVICES, else the plan's per worker. The
    trainer has one record (global rank 0's) for all its nodes: its node's GPUs x nodes."""
    listed = [g for g in str(record.get("gpus") or "").split(",") if g.strip()]
    rp = plan.roles.get(role) if plan else None
    if role == "training":
        nodes = rp.num_nodes if rp else 1
        return len(listed) * nodes if listed else (rp.total_gpus if rp else 0)
    if listed:
        return len(listed)
    return rp.gpus_per_task if rp else 0


def _role_order(role: str) -> int:
    return ROLE_NAMES.index(role) if role in ROLE_NAMES else len(ROLE_NAMES)


def lanes(rd: RunDir, plan: Optional[Plan] = None) -> List[Lane]:
    """One lane per worker record, by role in pipeline order, then start time."""
    if plan is None:
        plan, _ = read_plan(rd)
    out = []
    for path, rec in worker_records(rd):
        role = str(rec.get("role") or path.parent.name)
        job, task = (path.stem.split("_") + ["", ""])[:2]
        task_id = str(rec.get("task_id") if rec.get("task_id") is not None else task or "0")
        log = activity_path(path)
        if log.exists():
            segs = segments(role, read_activity(log), rec)
        else:
            start, end = float(rec.get("started") or 0), float(rec.get("heartbeat") or 0)
            segs = [(start, end, UNRECORDED, "other")] if end > start else []
        if not segs:
            continue
        out.append(Lane(role=role, name=f"{role} task {task_id}", node=str(rec.get("node") or "?"),
                        job_id=str(rec["job_id"]) if rec.get("job_id") is not None else job or None,
                        task_id=task_id, gpus=_worker_gpus(role, rec, plan), segments=segs))
    return sorted(out, key=lambda ln: (_role_order(ln.role), ln.start))


def step_ends(rd: RunDir) -> List[Tuple[int, float]]:
    """(step, time its train.json was written) of every trained step."""
    out = []
    for t in trained_steps(rd):
        try:
            out.append((t, rd.train_record(t).stat().st_mtime))
        except OSError:
            continue
    return out


# ------------------------------------------------------------------------------- sacct


class SacctError(RuntimeError):
    """sacct is missing or failed (no accounting, slurmdbd down)."""


def _slurm_time(text: str) -> Optional[float]:
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # "Unknown", "None": not started or not ended yet
        return None


def _gres_gpus(tres: str) -> Optional[int]:
    """GPUs in an AllocTRES string: gres/gpu=N, else the sum of typed gres/gpu:TYPE=N; None
    when the job holds no GPU gres (a cluster without it, a pending job)."""
    plain = re.search(r"(?:^|,)gres/gpu=(\d+)", tres)
    if plain:
        return int(plain.group(1))
    typed = re.findall(r"(?:^|,)gres/gpu:[^=,]+=(\d+)", tres)
    return sum(int(n) for n in typed) if typed else None


def parse_sacct(text: str) -> Dict[str, dict]:
    """sacct -X -P -n -D --format=SACCT_FIELDS output -> job id -> {"elapsed_s", "submit",
    "start", "end", "state", "alloc_gpus", "queue_wait_s", "runs"}. A requeued job has a row
    per run: elapsed and queue wait add up over them, the others are its last run's (submit:
    its first). start None: still pending."""
    jobs: Dict[str, dict] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 7 or not parts[0]:
            continue
        job_id, elapsed, submit, start, end, state, tres = (p.strip() for p in parts[:7])
        try:
            elapsed_s = float(elapsed or 0)
        except ValueError:
            continue
        submit_t, start_t = _slurm_time(submit), _slurm_time(start)
        wait = start_t - submit_t if start_t is not None and submit_t is not None else 0.0
        row = {"elapsed_s": elapsed_s, "submit": submit_t, "start": start_t,
               "end": _slurm_time(end), "state": state.split()[0].upper() if state else "",
               "alloc_gpus": _gres_gpus(tres), "queue_wait_s": max(0.0, wait), "runs": 1}
        seen = jobs.get(job_id)
        if seen is not None:
            row["elapsed_s"] += seen["elapsed_s"]
            row["queue_wait_s"] += seen["queue_wait_s"]
            row["runs"] += seen["runs"]
            row["submit"] = seen["submit"]
            if row["alloc_gpus"] is None:
                row["alloc_gpus"] = seen["alloc_gpus"]
        jobs[job_id] = row
    return jobs


def sacct_jobs(job_ids: Iterable[str]) -> Dict[str, dict]:
    """What Slurm's accounting says about `job_ids` (parse_sacct's form), in one sacct call.
    Raises SacctError when sacct is missing or fails."""
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    cmd = ["sacct", "-j", ",".join(ids), "-X", "-P", "-n", "-D", f"--format={SACCT_FIELDS}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SACCT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SacctError(str(e)) from None
    if out.returncode != 0:
        raise SacctError(out.stderr.strip() or f"exit status {out.returncode}")
    return parse_sacct(out.stdout)


def run_jobs(rd: RunDir, run_lanes: Optional[List[Lane]] = None) -> Dict[str, dict]:
    """Every job of the run: job id -> {"key", "roles"}. From the coordinator's events (every
    submission, and orphans it cancelled), its state, and the worker records (one-shot jobs
    of launch.resubmit are in no event)."""
    jobs: Dict[str, dict] = {}
    for e in read_events(rd):
        if e.get("event") in ("job_submitted", "job_resubmitted", "orphan_job_cancelled") and e.get("job_id"):
            jobs.setdefault(str(e["job_id"]), {"key": e.get("job"), "roles": list(e.get("roles") or [])})
    state = read_json(rd.state_file, {}) or {}
    for key, info in (state.get("jobs") or {}).items():
        if info.get("job_id"):
            jobs.setdefault(str(info["job_id"]), {"key": key, "roles": list(info.get("roles") or [])})
    for ln in run_lanes if run_lanes is not None else lanes(rd):
        if ln.job_id and ln.job_id != "local":
            info = jobs.setdefault(ln.job_id, {"key": None, "roles": []})
            if ln.role not in info["roles"]:
                info["roles"].append(ln.role)
    return jobs


def _plan_gpus(job_id: str, info: dict, plan: Optional[Plan], units: dict,
               run_lanes: List[Lane]) -> Dict[str, int]:
    """role -> GPUs the plan gives the job's workers of that role (`units`: the plan's Slurm
    jobs by key; a job of launch.resubmit, not among them: its workers' own GPUs, once per
    task)."""
    unit = units.get(info.get("key"))
    if unit is not None:
        return {r: sum(len(w.gpus) for w in unit.workers if w.role == r) for r in unit.roles}
    per_task: Dict[Tuple[str, str], int] = {}
    for ln in run_lanes:
        if ln.job_id == job_id:
            per_task[(ln.role, ln.task_id)] = ln.gpus
    out = {r: sum(g for (role, _), g in per_task.items() if role == r) for r in info["roles"]}
    if plan:
        for r in out:
            if not out[r] and r in plan.roles:
                out[r] = plan.roles[r].total_gpus
    return out


# ------------------------------------------------------------------------------ report


def role_report(rd: RunDir, sacct: Optional[Dict[str, dict]] = None,
                sacct_error: Optional[str] = None) -> Dict[str, dict]:
    """Per role: {"workers", "gpus", "span_s", "busy_s", "busy_fraction", "idle_s",
    "gpu_hours", "gpu_hours_source", "queue_wait_s" (sacct only), "pending_jobs" (sacct
    only)}. `sacct`: sacct_jobs' answer for the run's jobs (None: the workers' own numbers;
    `sacct_error` says why, where sacct was wanted and failed)."""
    plan, _ = read_plan(rd)
    run_lanes = lanes(rd, plan)
    roles = [r for r in ROLE_NAMES if (plan and r in plan.roles) or any(ln.role == r for ln in run_lanes)]
    roles += sorted({ln.role for ln in run_lanes} - set(roles))
    report: Dict[str, dict] = {}
    for role in roles:
        mine = [ln for ln in run_lanes if ln.role == role]
        span = sum(ln.span_s for ln in mine)
        busy = sum(ln.seconds("busy") for ln in mine)
        rp = plan.roles.get(role) if plan else None
        report[role] = {
            "workers": len(mine),
            "gpus": rp.total_gpus if rp else sum(ln.gpus for ln in mine),
            "span_s": round(span, 3), "busy_s": round(busy, 3),
            "busy_fraction": round(busy / span, 4) if span > 0 else None,
            "idle_s": {c: round(sum(ln.seconds(c) for ln in mine), 3) for c in IDLE},
            "gpu_hours": round(sum(ln.span_s * ln.gpus for ln in mine) / 3600, 6),
            "gpu_hours_source": "workers" if sacct_error is None else f"workers (sacct failed: {sacct_error})",
        }
    if sacct is None:
        return report
    jobs = run_jobs(rd, run_lanes)
    units = {u.key: u for u in job_units(plan, merge_shared_nodes=True)} if plan else {}
    hours = {r: 0.0 for r in report}
    wait = {r: 0.0 for r in report}
    pending = {r: 0 for r in report}
    missing: Dict[str, List[str]] = {r: [] for r in report}
    for job_id, info in jobs.items():
        acct = sacct.get(job_id)
        plan_gpus = _plan_gpus(job_id, info, plan, units, run_lanes)
        total = sum(plan_gpus.values())
        for role, g in plan_gpus.items():
            if role not in report:
                continue
            if acct is None:
                missing[role].append(job_id)
                continue
            if acct["start"] is None:
                pending[role] += 1
            wait[role] += acct.get("queue_wait_s", 0.0)
            held = g if acct["alloc_gpus"] is None else (acct["alloc_gpus"] * g / total if total else 0)
            hours[role] += acct["elapsed_s"] * held / 3600
    for role, rep in report.items():
        if missing[role]:
            rep["gpu_hours_source"] = f"workers (sacct has no record of job {', '.join(missing[role])})"
            continue
        rep.update(gpu_hours=round(hours[role], 6), gpu_hours_source="sacct",
                   queue_wait_s=round(wait[role], 3), pending_jobs=pending[role])
    return report


def allocation_ids(rd: RunDir) -> List[str]:
    """The allocations of an allocation run (launch.executor=allocation): those its job
    steps ran in (a step's job id begins with its allocation's), and each successor."""
    ids = {job_id.split(".")[0] for job_id in run_jobs(rd, [])}
    for e in read_events(rd):
        if e.get("event") == "allocation_handoff":
            ids |= {str(e.get("from_job")), str(e.get("to_job"))}
    return sorted(i for i in ids if i.isdigit())


def allocation_report(rd: RunDir, plan: Plan, acct: Dict[str, dict]) -> Dict[str, dict]:
    """role_report of an allocation run with sacct's numbers: every allocation's GPU-hours
    (elapsed x the GPUs it held) shared out by the nodes each role's job steps hold (and, on
    a node two roles share, by the GPUs each uses), and its queue wait counted for every
    role, as all of them wait for it."""
    report = role_report(rd)
    share = {r: 0.0 for r in report}
    for u in job_units(plan, merge_shared_nodes=True):
        used = sum(len(w.gpus) for w in u.workers) or 1
        for r in u.roles:
            if r in share:
                share[r] += len(u.nodes) / plan.num_nodes * \
                    sum(len(w.gpus) for w in u.workers if w.role == r) / used
    hours = {r: 0.0 for r in report}
    wait = {r: 0.0 for r in report}
    pending = 0
    for a in acct.values():
        held = a["alloc_gpus"] if a["alloc_gpus"] is not None else plan.num_nodes * plan.gpus_per_node
        pending += a["start"] is None
        for r in report:
            hours[r] += a["elapsed_s"] * held * share[r] / 3600
            wait[r] += a.get("queue_wait_s", 0.0)
    for r, rep in report.items():
        rep.update(gpu_hours=round(hours[r], 6), gpu_hours_source="sacct",
                   queue_wait_s=round(wait[r], 3), pending_jobs=pending)
    return report


def run_report(rd: RunDir) -> Dict[str, dict]:
    """role_report with sacct's numbers when the run is on Slurm (run.json's executor)."""
    plan, executor = read_plan(rd)
    if executor == "allocation" and plan is not None:
        try:
            return allocation_report(rd, plan, sacct_jobs(allocation_ids(rd)))
        except SacctError as e:
            return role_report(rd, sacct_error=str(e).splitlines()[0] if str(e) else "no output")
    if executor != "slurm":
        return role_report(rd)
    try:
        acct = sacct_jobs(run_jobs(rd))
    except SacctError as e:
        return role_report(rd, sacct_error=str(e).splitlines()[0] if str(e) else "no output")
    return role_report(rd, sacct=acct)


def _pct(x: float, of: float) -> str:
    return f"{100 * x / of:.1f}%" if of > 0 else "-"


def format_report(report: Dict[str, dict]) -> str:
    """The console section: one line per role ("" before any worker ran)."""
    if not any(r["workers"] or r["gpu_hours"] for r in report.values()):
        return ""
    lines = ["Where the GPU-hours go:"]
    for role, r in report.items():
        busy = "-" if r["busy_fraction"] is None else f"{100 * r['busy_fraction']:.1f}%"
        line = (f"  {role}: {r['workers']} worker{'s' if r['workers'] != 1 else ''}, {r['gpus']} GPU"
                f"{'s' if r['gpus'] != 1 else ''}, {r['gpu_hours']:.3f} GPU-h ({r['gpu_hours_source']}), "
                f"busy {busy}")
        idle = sorted(((s, c) for c, s in r["idle_s"].items() if s > 0), reverse=True)
        if idle:
            line += "; idle: " + ", ".join(f"{c} {_pct(s, r['span_s'])}" for s, c in idle)
        if "queue_wait_s" in r:
            line += f"; queue wait {r['queue_wait_s']:.1f} s"
            if r.get("pending_jobs"):
                line += f" ({r['pending_jobs']} pending)"
        lines.append(line)
    return "\n".join(lines)


# -------------------------------------------------------------------------------- draw


def draw(run_dir, out_path):
    """Write the timeline PNG to `out_path`; returns the Figure (one y tick per lane)."""
    # lazy: 0.6 s to import; only drawing needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_lanes = lanes(rd)
    report = role_report(rd)
    t0 = min((ln.start for ln in run_lanes), default=0.0)
    fig = Figure(figsize=(14, max(3.0, 0.45 * len(run_lanes) + 1.8)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys, labels = [], []
    y, prev_role = 0.0, None
    for ln in run_lanes:
        if prev_role is not None and ln.role != prev_role:
            ax.axhline(y - 0.5, color="black", lw=0.6, alpha=0.4)  # between role groups
        prev_role = ln.role
        for cat, colour in CATEGORIES.items():
            bars = [(a - t0, b - a) for a, b, _, c in ln.segments if c == cat]
            if bars:
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=colour)
        ys.append(y)
        labels.append(ln.label)
        y += 1
    ax.set_yticks(ys, labels)
    ax.set_ylim(y - 0.5 if ys else 0.5, -0.5)  # the first lane on top
    for step, t in step_ends(rd):
        if run_lanes:
            ax.axvline(t - t0, color="black", ls="--", lw=0.8, alpha=0.5)
            ax.text(t - t0, 1.0, str(step), transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8)
    if not run_lanes:
        ax.text(0.5, 0.5, "no worker activity", ha="center", va="center", transform=ax.transAxes,
                color="gray")
    used = [c for c in CATEGORIES if any(seg[3] == c for ln in run_lanes for seg in ln.segments)]
    if used:
        ax.legend(handles=[Patch(color=CATEGORIES[c], label=c) for c in used],
                  loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xlabel("seconds since the first worker started")
    ax.grid(axis="x", alpha=0.3)
    busy = ", ".join(f"{role} {100 * r['busy_fraction']:.0f}%" for role, r in report.items()
                     if r["busy_fraction"] is not None)
    fig.suptitle(f"{rd.root.name}" + (f": busy {busy}" if busy else ""))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return fig

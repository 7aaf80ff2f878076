"""End to end: the smoke run (tiny teacher and student, 3 steps) on the local executor and on
the local Slurm cluster, then what a user does with a finished run (inspect, verify,
resubmit).

One run per executor (module-scoped fixtures); every test reads that run, and the tests that
change it (verify after damage, resubmit) each use a step of their own, so they pass in any
order. Helpers here are shared with tests/test_faults.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every run here starts a vLLM engine (generation) and torchrun (training: 2 ranks in the
# smoke plan): `make test-fast` skips them.
pytestmark = [pytest.mark.vllm, pytest.mark.dist]
STEPS = 3
SAMPLES_PER_STEP = 16  # smoke: 8 prompts x 2 generations


# ---------------------------------------------------------------------------- helpers


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def run_diagnostics(run_dir: Path) -> str:
    """What to look at when a run did not do what a test wanted."""
    out = [f"--- {run_dir}/coordinator/events.jsonl (last lines)",
           tail(run_dir / "coordinator" / "events.jsonl", 25)]
    log = run_dir / "logs" / "coordinator" / "coordinator.log"
    if log.exists():
        out += [f"--- {log}", tail(log, 25)]
    try:
        st = subprocess.run([sys.executable, "-m", "launch.inspect", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
        out += ["--- launch.inspect", st.stdout[-4000:], st.stderr[-2000:]]
    except subprocess.TimeoutExpired:
        pass
    return "\n".join(out)


def stop_run(run_dir: Path) -> None:
    """Tear down whatever a run left running (a failed or timed-out test): its Slurm jobs,
    or its local job process trees. A finished run has nothing left, so this is a no-op."""
    from launch.executors import base as J, make_executor
    from shared.partition import Plan
    from shared.files import read_json
    from shared.worker import load_run_config

    run = read_json(run_dir / "run.json") or {}
    if "plan" not in run:
        return
    state = read_json(run_dir / "coordinator" / "state.json") or {}
    executor = make_executor(run.get("executor", "local"), run_dir, load_run_config(run_dir),
                             Plan.from_dict(run["plan"]))
    jobs = {info["job_id"]: key for key, info in state.get("jobs", {}).items()}
    try:
        jobs.update(executor.live_jobs())
    except J.SchedulerError:
        pass
    for job_id, key in jobs.items():
        job = executor.reattach(key, job_id)
        if executor.kind != "local" or executor.state(job) in J.LIVE_STATES:
            executor.cancel(job, grace_s=3)


def launch(run_dir: Path, conf: str, *overrides: str, detach: bool = False,
           timeout_s: float = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """`python -m launch.run conf=... launch.run_dir=... launch.detach=...`; on timeout the
    whole process group (coordinator and local workers) is killed and the test fails with
    the run's state."""
    cmd = [sys.executable, "-m", "launch.run", f"conf={conf}", f"launch.run_dir={run_dir}",
           f"launch.detach={str(detach).lower()}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        stop_run(run_dir)
        pytest.fail(f"{' '.join(cmd)} still running after {timeout_s:.0f}s\n--- stdout\n{out[-3000:]}\n"
                    f"--- stderr\n{err[-3000:]}\n{run_diagnostics(run_dir)}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_rc(res: subprocess.CompletedProcess, run_dir: Path, want: int = 0) -> None:
    if res.returncode != want:
        pytest.fail(f"{' '.join(res.args)} exited {res.returncode}, wanted {want}\n--- stdout\n"
                    f"{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}\n{run_diagnostics(run_dir)}",
                    pytrace=False)


def wait_until(pred: Callable[[], object], timeout_s: float, what: str, run_dir: Optional[Path] = None,
               poll_s: float = 0.2):
    """Poll `pred` until truthy (returned); fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}"
                        + (f"\n{run_diagnostics(run_dir)}" if run_dir else ""), pytrace=False)
        time.sleep(poll_s)


def inspect(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.inspect", str(run_dir), *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)


def scored_records(run_dir: Path) -> Dict[int, Dict[int, dict]]:
    """step -> shard -> commit record of every committed scored shard."""
    from shared.queue import StageQueue
    from shared.rundir import RunDir

    rd = RunDir(run_dir)
    return {t: StageQueue(rd, t, "scored").committed() for t in range(1, STEPS + 1)}


def sample_ids(run_dir: Path, step: int, stage: str) -> List[str]:
    """sample_id of every row of every committed shard of (step, stage), duplicates kept."""
    from shared.queue import StageQueue
    from shared.rundir import RunDir

    q = StageQueue(RunDir(run_dir), step, stage)
    ids: List[str] = []
    for k in sorted(q.committed()):
        ids += q.read(k).column("sample_id").to_pylist()
    return ids


def assert_scored_exactly_once(run_dir: Path, steps: int = STEPS) -> None:
    """Every prompt sample of every step is in exactly one committed scored row."""
    for t in range(1, steps + 1):
        prompts = sample_ids(run_dir, t, "prompts")
        scored = sample_ids(run_dir, t, "scored")
        assert len(prompts) == SAMPLES_PER_STEP == len(set(prompts)), (t, prompts)
        dups = sorted({s for s in scored if scored.count(s) > 1})
        assert not dups, f"step {t}: samples scored more than once: {dups}"
        assert set(scored) == set(prompts), (
            f"step {t}: missing {sorted(set(prompts) - set(scored))}, extra {sorted(set(scored) - set(prompts))}")
        train = json.loads((run_dir / "steps" / f"{t:06d}" / "train.json").read_text())
        assert train["samples"] == SAMPLES_PER_STEP, (t, train["samples"])


def events(run_dir: Path) -> List[dict]:
    out = []
    for line in (run_dir / "coordinator" / "events.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def worker_records(run_dir: Path, role: str) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "workers" / role).glob("*.json"))]


def assert_summary(stdout: str, run_dir: Path) -> None:
    """The coordinator's end-of-run summary: steps, samples, tokens, time per stage."""
    m = re.search(rf"run {re.escape(str(run_dir))} finished: (\d+) steps, (\d+) samples, (\d+) tokens in (\d+)s",
                  stdout)
    assert m, f"no end-of-run summary in the output:\n{stdout[-3000:]}"
    assert int(m.group(1)) == STEPS and int(m.group(2)) == STEPS * SAMPLES_PER_STEP
    assert int(m.group(3)) > 0
    for stage in ("generation", "teacher", "training"):
        assert re.search(rf"time per step, {stage}: mean \d+\.\ds", stdout), (stage, stdout[-2000:])


def assert_all_steps_complete(run_dir: Path) -> dict:
    res = inspect(run_dir, "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["phase"] == "finished" and st["trained_step"] == STEPS == st["total_steps"], st["phase"]
    assert [s["step"] for s in st["steps"]] == list(range(1, STEPS + 1))
    for s in st["steps"]:
        for stage in ("prompts", "rollouts", "scored"):
            x = s[stage]
            assert x["expected"] and x["committed"] == x["expected"], (s["step"], stage, x)
            assert x["rows"] == SAMPLES_PER_STEP, (s["step"], stage, x)
        assert s["trained"] and math.isfinite(s["loss"]), s
    return st


# ---------------------------------------------------------------------------- local executor


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`make smoke` (conf=smoke, local executor, detach=false), run once for this module."""
    run_dir = tmp_path_factory.mktemp("e2e") / "smoke"
    t0 = time.monotonic()
    res = launch(run_dir, "smoke", timeout_s=600)
    try:
        check_rc(res, run_dir)
        inspect_text = inspect(run_dir)
        inspect_json = assert_all_steps_complete(run_dir)
        yield {"dir": run_dir, "res": res, "seconds": time.monotonic() - t0,
               "inspect_text": inspect_text, "inspect_json": inspect_json}
    finally:
        stop_run(run_dir)


def test_local_smoke_completes_every_step(local_run):
    run_dir, res = local_run["dir"], local_run["res"]
    assert f"Run directory: {run_dir}" in res.stdout
    assert_summary(res.stdout, run_dir)
    # launch.inspect (text): a row per step with its loss; --json checked in the fixture.
    text = local_run["inspect_text"]
    assert text.returncode == 0, text.stderr
    assert "phase: finished" in text.stdout and f"trained: {STEPS}/{STEPS}" in text.stdout
    for s in local_run["inspect_json"]["steps"]:
        row = re.search(rf"^\s+{s['step']}\s+2/2 16r .* 2/2 16r .* 2/2 16r .*\s{s['loss']:.4f}",
                        text.stdout, re.M)
        assert row, f"step {s['step']} row (loss {s['loss']:.4f}) not in:\n{text.stdout}"
    # metrics.jsonl: one row per step, with the step's loss.
    all_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in all_rows if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The smoke validates once at the end (val_at_end): one row, accuracy by math-verify.
    val = [r for r in all_rows if "validation/accuracy" in r]
    assert [r["step"] for r in val] == [STEPS] and 0.0 <= val[0]["validation/accuracy"] <= 1.0
    assert len(all_rows) == len(rows) + len(val)
    for r in rows:
        train = json.loads((run_dir / "steps" / f"{r['step']:06d}" / "train.json").read_text())
        assert r["train/loss"] == pytest.approx(train["loss"]) and math.isfinite(r["train/loss"])
    assert_scored_exactly_once(run_dir)
    ev = [e["event"] for e in events(run_dir)]
    assert "job_failed" not in ev and ev[-1] == "run_finished", ev


def test_timeline_and_gpu_hours_of_the_smoke_run(local_run, tmp_path):
    from launch.timeline import draw
    from shared.rundir import RunDir
    from tests.timing_check import assert_busy_agrees

    rd = RunDir(local_run["dir"])
    report = assert_busy_agrees(rd, range(1, STEPS + 1))
    assert all(r["gpu_hours_source"] == "workers" and r["workers"] == 1 for r in report.values())
    assert "Where the GPU-hours go" in local_run["inspect_text"].stdout
    draw(rd, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_verify_detects_and_quarantines_a_damaged_shard(local_run):
    run_dir = local_run["dir"]
    ok = inspect(run_dir, "--verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all shards match their checksums" in ok.stdout
    shard = run_dir / "steps" / "000001" / "scored" / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    bad = inspect(run_dir, "--verify")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"corrupt: " in bad.stdout and "shard-00000.arrow" in bad.stdout and "checksum" in bad.stdout
    assert not shard.exists() and not shard.with_name(shard.name + ".meta.json").exists()
    moved = list((shard.parent / "quarantine").glob("shard-00000.arrow.*"))
    assert any(p.name.endswith(".reason.json") for p in moved) and any(
        not p.name.endswith(".reason.json") for p in moved), moved
    again = inspect(run_dir, "--verify")  # quarantined: nothing corrupt left, the shard is pending
    assert again.returncode == 0, again.stdout


def _resubmit(run_dir: Path, step: int, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.resubmit", str(run_dir), "--stage", "teacher",
                             "--step", str(step), "--wait", *extra], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_resubmit_redoes_exactly_one_step(local_run):
    run_dir, step = local_run["dir"], 2
    before = scored_records(run_dir)
    ids_before = sorted(sample_ids(run_dir, step, "scored"))
    proc = _resubmit(run_dir, step, "--timeout", "300")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, out + err
    assert f"step {step} scored complete" in out
    after = scored_records(run_dir)
    for t in before:
        if t != step:
            assert after[t] == before[t], f"step {t} changed"
    assert sorted(after[step]) == sorted(before[step])
    for k, rec in after[step].items():
        assert rec["commit_id"] != before[step][k]["commit_id"], k
        assert rec["committed_by"]["job_id"] != before[step][k]["committed_by"]["job_id"], k
    reasons = [json.loads(p.read_text()) for p in
               (run_dir / "steps" / f"{step:06d}" / "scored" / "quarantine").glob("*.reason.json")]
    old_ids = {r["commit_id"] for r in before[step].values()}
    assert {r["record"]["commit_id"] for r in reasons} == old_ids
    assert all(Path(r["moved_to"]).is_file() for r in reasons)
    assert sorted(sample_ids(run_dir, step, "scored")) == ids_before


def test_resubmit_wait_fails_when_its_job_dies(local_run):
    """--wait is bounded: the one-shot job dying makes it fail with the job's log."""
    run_dir, step = local_run["dir"], 3
    proc = _resubmit(run_dir, step, "--timeout", "300")
    try:
        line = proc.stdout.readline()
        while line and "submitted job" not in line:
            line = proc.stdout.readline()
        m = re.search(r"submitted job (\S+)", line)
        assert m, f"no job submitted: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        job = m.group(1)
        rec = wait_until(lambda: [r for r in worker_records(run_dir, "teacher") if r["job_id"] == job],
                         120, f"the worker record of one-shot job {job}")
        os.kill(rec[0]["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    assert f"job {job} ended FAILED" in err and "killed by signal 9" in err, err


# ---------------------------------------------------------------------------- local Slurm cluster


@pytest.mark.parametrize("kl_type", ["jsd", "sampled_reverse"])
def test_smoke_trains_on_the_other_loss_families(kl_type, tmp_path):
    """The smoke run end to end with GKD's JSD and with the sampled-token reverse KL. With
    sampled_reverse the teacher stores one entry per response token: the sampled token itself
    (topk k = 1) and its teacher log-prob."""
    from shared.queue import StageQueue
    from shared.rundir import RunDir

    run_dir = tmp_path / kl_type
    res = launch(run_dir, "smoke", f"loss_fn.kl_type={kl_type}", timeout_s=600)
    check_rc(res, run_dir)
    assert_all_steps_complete(run_dir)
    rd = RunDir(run_dir)
    scored = StageQueue(rd, 1, "scored")
    for k in scored.committed():
        table = scored.read(k)
        ids = table.column("teacher_topk_ids").to_pylist()
        lps = table.column("teacher_topk_logprobs").to_pylist()
        responses = table.column("response_ids").to_pylist()
        masks = table.column("sample_mask").to_pylist()
        assert any(masks), "every row dropped"
        for row_ids, row_lps, resp, keep in zip(ids, lps, responses, masks):
            if not keep:
                continue
            if kl_type == "sampled_reverse":
                assert [entry for [entry] in row_ids] == resp
            else:
                assert all(len(entry) == 16 for entry in row_ids)  # smoke: topk_logits_k=16
            assert all(-1e4 <= v <= 0 for entry in row_lps for v in entry)


@pytest.mark.slurm
def test_slurm_smoke_isolates_roles_on_three_nodes(slurm_cluster, tmp_path):
    from tools import local_slurm

    run_dir = tmp_path / "smoke-slurm"
    try:
        res = launch(run_dir, "smoke-slurm", timeout_s=600)
        check_rc(res, run_dir)
        assert f"Run directory: {run_dir}" in res.stdout
        assert "Isolated clusters created: " in res.stdout
        assert_summary(res.stdout, run_dir)
        assert_all_steps_complete(run_dir)
        assert_scored_exactly_once(run_dir)
        nodes = {role: {r["node"] for r in worker_records(run_dir, role)}
                 for role in ("generation", "teacher", "training")}
        assert all(len(n) == 1 for n in nodes.values()), nodes
        placed = [next(iter(n)) for n in nodes.values()]
        assert sorted(placed) == sorted(set(placed)) and set(placed) <= set(local_slurm.NODES), nodes
        # Where the GPU-hours go, from sacct: what each role's job held, and the queue wait.
        from launch.timeline import draw, run_report
        from shared.rundir import RunDir
        from tests.timing_check import assert_busy_agrees

        assert_busy_agrees(RunDir(run_dir), range(1, STEPS + 1))
        report = run_report(RunDir(run_dir))
        for role, r in report.items():
            assert r["gpu_hours_source"] == "sacct" and r["gpu_hours"] > 0 and r["queue_wait_s"] >= 0, (role, r)
        draw(RunDir(run_dir), tmp_path / "timeline.png")
    finally:
        stop_run(run_dir)

"""launch.executor=allocation: a whole run inside one Slurm allocation, each role's job a job
step on its own nodes (launch/executors/allocation.py).

On the local 3-node cluster (make slurm-up): the smoke recipe with isolation, checked from
sacct's step node lists, surviving a SIGKILL of a step's process; an allocation that does
not match the plan refused with exit 2; a run that outlives two time limits of its
allocation. Without Slurm: the allocation check, step ids and names, and srun's node-failure
lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from launch.executors import allocation as A
from shared.partition import job_units
from shared.recipe import load
from shared.config_check import validate
from tests.slurm_fixture import slurm_cluster  # noqa: F401
from tests.test_e2e import (REPO, assert_scored_exactly_once,
                            check_rc, events, launch, run_diagnostics, wait_until)
from tests.test_time_limits import assert_every_step_once


def _plan(recipe: str = "smoke-slurm", *overrides: str):
    cfg, _ = load(recipe, list(overrides))
    plan = validate(cfg)
    return cfg, plan, job_units(plan, True)


# ------------------------------------------------------------------------------ no Slurm


def test_an_allocation_must_hold_the_plans_nodes_and_gpus():
    cfg, plan, units = _plan()
    assert A.allocation_problem(plan, units, ["n1", "n2", "n3"], "n[1-3]", 4) is None
    assert A.allocation_problem(plan, units, ["n1", "n2", "n3"], "n[1-3]", None) is None
    two = A.allocation_problem(plan, units, ["n1", "n2"], "n[1-2]", 4)
    assert two.startswith("the allocation holds 2 node(s) (n[1-2]), but the partition plan places "
                          "the roles on cluster.num_nodes=3 (nodes per role: "), two
    assert "Fix: submit with sbatch -N3 (or salloc -N3)" in two
    assert "sbatch -N3" in A.allocation_problem(plan, units, ["n1", "n2", "n3", "n4"], "n[1-4]", 4)
    cfg, plan, units = _plan("qwen3-14b-4b")
    hosts = [f"g{i}" for i in range(plan.num_nodes)]
    few = A.allocation_problem(plan, units, hosts, "g[..]", plan.gpus_per_node - 1)
    assert f"holds {plan.gpus_per_node - 1} GPU(s) per node, but the partition plan uses " \
           f"{plan.gpus_per_node} on a node" in few and f"--gres=gpu:{plan.gpus_per_node}" in few


def test_step_ids_and_names_round_trip():
    job_id = A.step_job_id("4242", 1, "generation+teacher-n1", 7)
    assert job_id == "4242.1.generation+teacher-n1.7"
    assert A.parse_step_job_id(job_id) == ("4242", 1, "generation+teacher-n1", 7)
    name = A.step_name("/runs/x", "training-n0", 1, 7)
    assert name.startswith("sluice-training-n0-") and name.endswith(".1.7")


def test_srun_pins_a_step_to_its_own_nodes_and_gpus():
    cfg, plan, units = _plan("qwen3-14b-4b")
    unit = units[0]
    cmd = A.srun_command(cfg, unit, ["gpu7"], "NAME", "/RUN", "9.0.k.1", python="PY")
    want = ["srun", "--nodes=1", "--nodelist=gpu7", f"--ntasks={unit.tasks_per_node}",
            f"--ntasks-per-node={unit.tasks_per_node}", "--exact",
            f"--cpus-per-task={max(1, cfg.cluster.cpus_per_gpu * unit.gpus_per_node // unit.tasks_per_node)}",
            f"--gres=gpu:{unit.gpus_per_node}", "--mem=0", "--kill-on-bad-exit=1", "--job-name=NAME",
            "PY", "-u", "-m", "launch.executors.allocation", "task", "/RUN", "--job-key", unit.key,
            "--job-id", "9.0.k.1"]
    assert cmd == want


@pytest.mark.parametrize("line", [
    "srun: error: Node failure on node2",
    "srun: error: Task launch for StepId=12.3 failed on node node2: Communication connection failure",
    "srun: error: Unable to create step for job 12: Required node not available (down, drained or reserved)",
])
def test_srun_node_failures_are_recognised(line):
    assert A.node_failure(f"some output\n{line}\nmore") == line
    assert A.node_failure("srun: error: node2: task 0: Killed\n") is None


# ------------------------------------------------------------------------------ Slurm

STEPS_KILLED = 5


def _allocation_of(run_dir: Path) -> str:
    out = [p.stem for p in (run_dir / "logs" / "allocation").glob("*.out")]
    assert out, f"no allocation log in {run_dir}/logs/allocation"
    return sorted(out, key=int)[-1]


def _cancel_allocations(run_dir: Path) -> None:
    from launch.executors.base import job_name

    name = job_name(run_dir, "allocation")
    subprocess.run(["scancel", "-n", name], capture_output=True)


def _wait_allocations_end(run_dir: Path) -> None:
    from launch.executors.base import job_name

    name = job_name(run_dir, "allocation")
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-n", name], capture_output=True,
                                          text=True).stdout.strip(), 120, "the allocation to end")


def _phase(run_dir: Path):
    try:
        return json.loads((run_dir / "coordinator" / "state.json").read_text()).get("phase")
    except (OSError, ValueError):
        return None


def _finished(run_dir: Path) -> bool:
    phase = _phase(run_dir)
    if phase == "failed":
        pytest.fail(f"the run failed\n{run_diagnostics(run_dir)}", pytrace=False)
    return phase == "finished"


def _steps(alloc: str) -> list:
    """sacct's steps of an allocation: (step id, name, state, node list)."""
    out = subprocess.run(["sacct", "-j", alloc, "-n", "-P", "-o", "JobID,JobName,State,NodeList"],
                         capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.count("|") == 3]


def _task_pid(run_dir: Path, key: str):
    """The pid of the task process of job `key`'s current step (python -m ... task)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"launch.executors.allocation" in cmd and b"task" in cmd and str(run_dir).encode() in cmd \
                and key.encode() in cmd:
            return int(entry.name)
    return None


@pytest.mark.slurm
@pytest.mark.vllm
@pytest.mark.dist
def test_smoke_in_one_allocation_isolated_and_surviving_a_killed_step(slurm_cluster, tmp_path):
    from tools import local_slurm

    run_dir = tmp_path / "alloc"
    try:
        res = launch(run_dir, "smoke-slurm", "launch.executor=allocation",
                     f"distillation.max_num_steps={STEPS_KILLED}", timeout_s=120)
        check_rc(res, run_dir)
        assert "Allocation: Slurm job " in res.stdout, res.stdout
        alloc = res.stdout.split("Allocation: Slurm job ")[1].split()[0]
        wait_until(lambda: (run_dir / "steps" / "000002" / "train.json").exists(), 600,
                   "step 2 trained", run_dir, poll_s=1)
        pid = wait_until(lambda: _task_pid(run_dir, "teacher-n2"), 30, "the teacher step's task")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _finished(run_dir), 600, "the run to finish", run_dir, poll_s=1)
        wait_until(lambda: all(s[2] != "RUNNING" for s in _steps(alloc)) and _steps(alloc), 120,
                   "the allocation to end", run_dir, poll_s=1)
    finally:
        _cancel_allocations(run_dir)
    assert_every_step_once(run_dir, STEPS_KILLED, 16)
    assert_scored_exactly_once(run_dir, STEPS_KILLED)
    ev = events(run_dir)
    failed = [e for e in ev if e["event"] == "job_failed"]
    assert [e["job"] for e in failed] == ["teacher-n2"], failed
    assert failed[0]["job_id"] == f"{alloc}.0.teacher-n2.1", failed
    again = [e for e in ev if e["event"] == "job_resubmitted"]
    assert [(e["job"], e["job_id"]) for e in again] == [("teacher-n2", f"{alloc}.0.teacher-n2.2")], again
    # Isolation, from Slurm's own accounting: every step of a role ran on that role's node
    # alone (plan node i is the allocation's i-th host), in the one allocation.
    steps = _steps(alloc)
    hosts = A.hostnames(next(s[3] for s in steps if s[0] == alloc))
    assert hosts == list(local_slurm.NODES), steps
    nodes_of = {}
    for step_id, name, state, nodes in steps:
        if not name.startswith("sluice-") or name.startswith("sluice-allocation"):
            continue
        key = name[len("sluice-"):].rsplit("-", 1)[0]
        nodes_of.setdefault(key, set()).add(nodes)
    plan_nodes = {u.key: u.nodes for u in _plan()[2]}
    assert set(nodes_of) == set(plan_nodes), nodes_of
    for key, nodes in nodes_of.items():
        assert nodes == {hosts[n] for n in plan_nodes[key]}, (key, nodes)
    teacher_steps = [s for s in steps if s[1].startswith("sluice-teacher-n2")]
    assert len(teacher_steps) == 2 and teacher_steps[0][2] != "COMPLETED", teacher_steps
    assert next(s for s in steps if s[0] == alloc)[2] == "COMPLETED", steps


@pytest.mark.slurm
def test_an_allocation_that_does_not_match_the_plan_is_refused(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    run_dir = tmp_path / "refused"
    job = subprocess.run(["sbatch", "--parsable", "-N2", "--gres=gpu:1", f"--output={out}",
                          "slurm/sluice.sbatch", "conf=smoke-slurm", f"launch.run_dir={run_dir}"],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "SLUICE_PYTHON": sys.executable}).stdout.strip()

    def ended():
        row = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State,ExitCode"],
                             capture_output=True, text=True).stdout.strip()
        return row if row and not row.startswith(("PENDING", "RUNNING")) else None

    try:
        row = wait_until(ended, 180, f"job {job} to end", poll_s=1)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert row == "FAILED|2:0", row
    text = out.read_text()
    assert f"Slurm job {job} cannot run this run: the allocation holds 2 node(s)" in text, text
    assert "Fix: submit with sbatch -N3 (or salloc -N3)" in text, text
    assert not run_dir.exists()  # refused before anything was written


LIMIT_STEPS = 60


@pytest.mark.slurm
def test_a_run_outlives_the_time_limits_of_its_allocations(slurm_cluster, tmp_path):
    """Synthetic roles (the real coordinator, executor, queue and Slurm): one-minute
    allocations, each stopped by its pre-timeout signal and followed by its successor."""
    run_dir = tmp_path / "limits"
    try:
        res = launch(run_dir, "smoke-slurm", "launch.executor=allocation", "synthetic.enabled=true",
                     "synthetic.train_s=0.4", f"distillation.max_num_steps={LIMIT_STEPS}",
                     "distillation.val_at_end=false", "cluster.time_limit=00:01:00",
                     "cluster.signal_delay_s=30", "launch.max_retries=0", timeout_s=120)
        check_rc(res, run_dir)
        first = res.stdout.split("Allocation: Slurm job ")[1].split()[0]
        wait_until(lambda: _finished(run_dir), 900, "the run to finish", run_dir, poll_s=1)
        _wait_allocations_end(run_dir)  # the finished run's coordinator exits by itself
    finally:
        _cancel_allocations(run_dir)
    assert_every_step_once(run_dir, LIMIT_STEPS, 16)
    ev = events(run_dir)
    names = [e["event"] for e in ev]
    for bad in ("job_failed", "run_failed", "worker_hung", "steps_redone"):
        assert bad not in names, [e for e in ev if e["event"] == bad]
    handoffs = [e for e in ev if e["event"] == "allocation_handoff"]
    assert len(handoffs) >= 2, handoffs
    chain = [first] + [h["to_job"] for h in handoffs]
    assert [h["from_job"] for h in handoffs] == chain[:-1], handoffs
    # Each stop is a time limit of every role's step, never a failure.
    for key in ("generation-n1", "teacher-n2", "training-n0"):
        limits = [e for e in ev if e["event"] == "job_time_limit" and e["job"] == key]
        assert len(limits) == len(handoffs), (key, limits)
    state = json.loads((run_dir / "coordinator" / "state.json").read_text())
    assert state["retries"] == {"generation-n1": 0, "teacher-n2": 0, "training-n0": 0}
    held_s = 0.0
    for job in chain:
        row = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State,ElapsedRaw,AllocTRES"],
                             capture_output=True, text=True).stdout.strip()
        state, elapsed, tres = row.split("|")
        assert state == "COMPLETED", (job, row)
        held_s += int(elapsed) * int(tres.split("gres/gpu=")[1].split(",")[0])
    # Where the GPU-hours go: every allocation's GPU-hours, shared out between the roles.
    from launch.timeline import run_report
    from shared.rundir import RunDir

    report = run_report(RunDir(run_dir))
    assert {r["gpu_hours_source"] for r in report.values()} == {"sacct"}, report
    assert abs(sum(r["gpu_hours"] for r in report.values()) - held_s / 3600) < 1e-5, (report, held_s)
    assert len({r["gpu_hours"] for r in report.values()}) == 1  # a node each, the same GPUs

    # launch.resubmit of a finished run: outside any allocation it says how, and touches nothing;
    # inside one (salloc) it runs the redo as a one-shot step.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    redo = [sys.executable, "-m", "launch.resubmit", str(run_dir), "--stage", "teacher", "--step", "3"]
    res = subprocess.run(redo, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "no live teacher worker" in res.stderr and "salloc -N3 --gres=gpu:1 <same command>" in res.stderr, res.stderr
    assert_every_step_once(run_dir, LIMIT_STEPS, 16)  # nothing was invalidated
    res = subprocess.run(["salloc", "-N3", "--gres=gpu:1", *redo, "--wait", "--timeout", "120"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "invalidated step 3 scored shard 0" in res.stdout and "no live teacher worker: submitted job " \
        in res.stdout and "step 3 scored complete" in res.stdout, res.stdout
    assert_every_step_once(run_dir, LIMIT_STEPS, 16)


NODE_STEPS = 16


@pytest.mark.slurm
def test_a_failed_node_stops_the_run_cleanly_naming_it_and_it_resumes(slurm_cluster, tmp_path):
    """A node of the allocation goes down mid-run (scontrol: as slurmctld marks a dead node):
    the run stops cleanly, the error names the node, and a new allocation finishes it."""
    run_dir = tmp_path / "nodefail"
    common = ("launch.executor=allocation", "synthetic.enabled=true", "synthetic.train_s=0.2",
              f"distillation.max_num_steps={NODE_STEPS}", "distillation.val_at_end=false")
    try:
        res = launch(run_dir, "smoke-slurm", *common, timeout_s=120)
        check_rc(res, run_dir)
        alloc = res.stdout.split("Allocation: Slurm job ")[1].split()[0]
        wait_until(lambda: (run_dir / "steps" / "000004" / "train.json").exists(), 300,
                   "step 4 trained", run_dir, poll_s=0.5)
        subprocess.run(["scontrol", "update", "NodeName=node3", "State=DOWN", "Reason=sluice-test"],
                       check=True)
        wait_until(lambda: _phase(run_dir) == "failed", 120, "the run to stop", run_dir, poll_s=0.5)
        wait_until(lambda: subprocess.run(["squeue", "-h", "-j", alloc], capture_output=True,
                                          text=True).stdout.strip() == "", 180,
                   "the allocation to end", run_dir, poll_s=1)
    finally:
        subprocess.run(["scontrol", "update", "NodeName=node3", "State=RESUME"], capture_output=True)
        wait_until(lambda: "idle" in subprocess.run(["sinfo", "-h", "-n", "node3", "-o", "%T"],
                                                    capture_output=True, text=True).stdout, 120,
                   "node3 back")
        _cancel_allocations(run_dir)
    ev = events(run_dir)
    failed = [e for e in ev if e["event"] == "run_failed"]
    assert len(failed) == 1 and "a node of allocation" in failed[0]["reason"], failed
    stop = json.loads((run_dir / "coordinator" / "STOP").read_text())
    assert "srun: error: Node failure on node3" in stop["detail"] and \
        f"launch.run_dir={run_dir}" in stop["detail"], stop
    assert not [e for e in ev if e["event"] == "job_resubmitted"]  # no step retried on a dead node
    # The other roles stopped cleanly; nothing trained is lost: a new allocation finishes the run.
    trained = sorted(int(p.parent.name) for p in (run_dir / "steps").glob("*/train.json"))
    assert trained == list(range(1, len(trained) + 1)) and len(trained) >= 4, trained
    try:
        res = launch(run_dir, "smoke-slurm", *common, timeout_s=120)
        check_rc(res, run_dir)
        # (its phase says "failed" until the new allocation's coordinator starts)
        wait_until(lambda: _phase(run_dir) == "finished", 600, "the resumed run to finish", run_dir,
                   poll_s=1)
    finally:
        _cancel_allocations(run_dir)
    assert_every_step_once(run_dir, NODE_STEPS, 16)
    assert [e["event"] for e in events(run_dir)].count("run_failed") == 1


_DRIVE_TRAINER = r'''
import json, signal, sys, time
from launch.executors.allocation import AllocationExecutor
from shared.partition import plan as make_plan
from shared.worker import load_run_config

run_dir = sys.argv[1]
cfg = load_run_config(run_dir)
ex = AllocationExecutor(run_dir, cfg, make_plan(cfg))
unit = next(u for u in ex.units() if u.roles == ("training",))
job = ex.submit(unit)
deadline = time.monotonic() + 300
while not (ex.run_dir / "steps" / "000001" / "train.json").exists():
    assert ex.state(job) == "RUNNING" and time.monotonic() < deadline, ex.state(job)
    time.sleep(0.5)
sent = time.monotonic()
ex.signal_step(job, signal.SIGUSR2)
while ex.state(job) == "RUNNING":
    assert time.monotonic() - sent < 60, "still running 60 s after USR2"
    time.sleep(0.5)
print(json.dumps({"job_id": job.job_id, "state": ex.state(job), "step": ex.live_steps(job.alloc)}))
'''


@pytest.mark.slurm
@pytest.mark.dist
def test_a_two_node_trainer_is_one_step_across_its_nodes(slurm_cluster, tiny_models, tmp_path):
    """The trainer on two nodes of an allocation: one step, torchrun's c10d rendezvous on the
    step's first node (its NodeAddr), both nodes' ranks stop on the signal and the trainer
    checkpoints its last step."""
    from bench.bench_train import make_run_dir, write_scored_step
    from shared.files import atomic_write_json
    from shared.partition import plan as make_plan
    from shared.worker import load_run_config
    from tests.test_train import DROPPED, K, ROWS, SHARDS, VOCAB

    overrides = ["policy.train_global_batch_size=8", "checkpointing.save_period=100",
                 "distillation.max_num_steps=5", "distillation.resource_isolation.enabled=true",
                 "cluster.num_nodes=4", "cluster.gpus_per_node=1", "cluster.cpus_per_gpu=1",
                 "distillation.resource_isolation.roles.training.num_nodes=2",
                 "distillation.resource_isolation.roles.training.gpus_per_node=1",
                 "distillation.resource_isolation.roles.generation.gpus_per_node=1",
                 "distillation.resource_isolation.roles.teacher.gpus_per_node=1"]
    rd = make_run_dir(tmp_path / "run", overrides)
    plan = make_plan(load_run_config(rd))
    atomic_write_json(rd.run_file, {"plan": plan.to_dict(), "executor": "allocation"})
    write_scored_step(rd, 1, SHARDS, ROWS, vocab=VOCAB, k=K, dropped_rows=DROPPED)
    script = tmp_path / "drive.py"
    script.write_text(_DRIVE_TRAINER)
    res = subprocess.run(["salloc", "-N2", "--gres=gpu:1", sys.executable, str(script), str(rd.root)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["state"] == "COMPLETED" and out["step"] == {}, out
    alloc = out["job_id"].split(".")[0]
    step = next(s for s in _steps(alloc) if s[1].startswith("sluice-training-n0"))
    assert step[2] == "COMPLETED" and len(A.hostnames(step[3])) == 2, step
    said = (Path(rd.log_dir("training-n0")) / out["job_id"] / "stdout").read_text()
    assert said.count("--rdzv_endpoint=127.0.0.1:") == 2, said  # the first node's NodeAddr
    assert said.count("worker stopped on time_limit") == 2, said
    assert (rd.root / "checkpoints" / "000001" / "COMMITTED.json").exists()
    end = json.loads((rd.root / "jobs" / f"{out['job_id']}.json").read_text())
    assert end["reason"] == "time_limit" and end["job"] == "training-n0"

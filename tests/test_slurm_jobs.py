"""What Sluice submits, on the local Slurm cluster (make slurm-up): exact nodes, GPUs bound
per worker, a coordinator that itself runs in a job, and training across two nodes.

    python -m pytest tests/test_slurm_jobs.py -q        # ~4 min on 2 CPU cores

Everything here is read back from Slurm (sacct), not from Sluice's own records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_e2e import (REPO, assert_all_steps_complete, assert_scored_exactly_once,
                            run_diagnostics, stop_run, worker_records)

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.dist]

# Two engines per generation node and two teachers per teacher node: 2 GPUs a node, one
# CPU per GPU (the local nodes have 2 CPUs).
TWO_PER_NODE = [
    "cluster.gpus_per_node=2", "cluster.cpus_per_gpu=1",
    "distillation.resource_isolation.roles.training.gpus_per_node=2",
    "distillation.resource_isolation.roles.generation.gpus_per_node=2",
    "distillation.resource_isolation.roles.teacher.gpus_per_node=2",
]


def sacct(*args: str) -> list[dict]:
    fields = ["JobID", "JobName", "State", "ExitCode", "NodeList", "AllocTRES"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", ",".join(fields), *args],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def hostnames(nodelist: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


def wait_for_job(job_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = sacct("-j", job_id)
        if rows and rows[0]["State"].split()[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            return rows[0]
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            raise AssertionError(f"job {job_id} still {rows} after {timeout_s:.0f}s")
        time.sleep(1)


def test_isolated_recipe_holds_exactly_its_nodes_from_a_coordinator_job(slurm_cluster, tmp_path):
    """The coordinator runs as a Slurm job started with --mem-per-cpu (so SLURM_MEM_PER_CPU is
    in its environment) on the CPU partition, and the role jobs ask for memory (--mem=2G):
    had SLURM_MEM_PER_CPU reached them, their srun would fail ("SLURM_MEM_PER_CPU,
    SLURM_MEM_PER_GPU, and SLURM_MEM_PER_NODE are mutually exclusive"). The isolated recipe
    puts two engines on the generation node and two teachers on the teacher node. Slurm's own accounting must show
    exactly cluster.num_nodes=3 nodes held by the role jobs, one role per node, each job
    with the plan's GPUs, and every worker on its own GPUs."""
    run_dir = tmp_path / "isolated"
    log = tmp_path / "coordinator-job.out"
    args = [sys.executable, "-m", "launch.run", "conf=smoke-slurm", f"launch.run_dir={run_dir}",
            "launch.detach=false", "cluster.mem_per_gpu_gb=1", *TWO_PER_NODE]
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    outer = subprocess.run(
        ["sbatch", "--parsable", "-p", "cpu", "--mem-per-cpu=100", "-c", "1", "-t", "30",
         "-J", "sluice-test-outer", "-o", str(log), "--chdir", str(REPO),
         "--wrap", " ".join(args)],
        capture_output=True, text=True, check=True).stdout.strip()
    try:
        row = wait_for_job(outer, 900)
        text = log.read_text() if log.exists() else "(no log)"
        assert row["State"] == "COMPLETED" and row["ExitCode"] == "0:0", \
            f"{row}\n{text[-4000:]}\n{run_diagnostics(run_dir)}"
        assert "SLURM_MEM_PER_CPU" not in text  # no srun complained about it
        assert_all_steps_complete(run_dir)
        assert_scored_exactly_once(run_dir)

        from tools import local_slurm
        from launch.executors.base import run_tag

        tag = run_tag(run_dir)
        jobs = {r["JobName"][len("sluice-"):-len(tag) - 1]: r for r in sacct("-S", started)
                if r["JobName"].startswith("sluice-") and r["JobName"].endswith(f"-{tag}")}
        assert sorted(jobs) == ["generation-n1", "teacher-n2", "training-n0"], jobs
        nodes = {key: hostnames(r["NodeList"]) for key, r in jobs.items()}
        assert all(len(n) == 1 for n in nodes.values()), nodes
        held = [n for ns in nodes.values() for n in ns]
        assert len(held) == len(set(held)) == 3, nodes  # disjoint, and exactly num_nodes
        for key, r in jobs.items():
            # --exclusive: the job holds the whole node, all of its GPUs (the plan uses 2).
            assert f"gres/gpu={local_slurm.GPUS_PER_NODE}" in r["AllocTRES"], (key, r)
            assert r["State"] == "COMPLETED", (key, r)
        # Each engine and teacher had a GPU of its own; the trainer both.
        for role, want in (("generation", ["0", "1"]), ("teacher", ["0", "1"]), ("training", ["0,1"])):
            recs = worker_records(run_dir, role)
            assert sorted(r["gpus"] for r in recs) == want, (role, recs)
            key = next(k for k in nodes if k.startswith(role))
            assert {r["node"] for r in recs} == set(nodes[key]), (role, recs, nodes)
        # The coordinator's own job ran on the CPU node.
        assert hostnames(row["NodeList"]) == ["cpu1"], row
    finally:
        subprocess.run(["scancel", outer])
        stop_run(run_dir)


def test_training_across_two_nodes_matches_one_node(slurm_cluster, tiny_models, tmp_path):
    """One training step on two nodes (torchrun c10d rendezvous over the job's two nodes,
    gloo, one rank per node) gives the losses of the same step on one node with two ranks."""
    from bench.bench_train import make_run_dir, write_scored_step
    from launch.executors.base import LIVE_STATES
    from launch.executors.slurm import SlurmExecutor
    from shared.partition import plan as make_plan
    from shared.worker import load_run_config
    from tests.test_train import DROPPED, K, OVERRIDES, ROWS, SHARDS, VOCAB

    two_nodes = OVERRIDES + [
        "distillation.resource_isolation.enabled=true", "cluster.num_nodes=4",
        "cluster.gpus_per_node=1", "cluster.cpus_per_gpu=1",
        "distillation.resource_isolation.roles.training.num_nodes=2",
        "distillation.resource_isolation.roles.training.gpus_per_node=1",
        "distillation.resource_isolation.roles.generation.gpus_per_node=1",
        "distillation.resource_isolation.roles.teacher.gpus_per_node=1"]
    one = make_run_dir(tmp_path / "one", OVERRIDES)
    two = make_run_dir(tmp_path / "two", two_nodes)
    for rd in (one, two):
        write_scored_step(rd, 1, SHARDS, ROWS, vocab=VOCAB, k=K, dropped_rows=DROPPED)

    cfg = load_run_config(two)
    ex = SlurmExecutor(two.root, cfg, make_plan(cfg))
    unit = next(u for u in ex.units() if u.roles == ("training",))
    assert len(unit.nodes) == 2 and [w.node_rank for w in unit.workers] == [0, 1]
    job = ex.submit(unit, step=1)
    local = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "stages.train", str(one.root), "--step", "1"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    deadline = time.monotonic() + 600
    while ex.state(job) in LIVE_STATES or ex.state(job) == "UNKNOWN":
        assert time.monotonic() < deadline, "the two-node training job did not end"
        time.sleep(1)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in
                     sorted(Path(job.paths.folder).glob("*.out")) + sorted(Path(job.paths.folder).glob("*.err")))
    row = sacct("-j", str(job.job_id))[0]
    assert row["State"] == "COMPLETED", f"{row}\n{logs}"
    assert len(hostnames(row["NodeList"])) == 2, row
    a = json.loads((one.root / "steps" / "000001" / "train.json").read_text())
    b = json.loads((two.root / "steps" / "000001" / "train.json").read_text())
    assert len(a["losses"]) == len(b["losses"]) == 2
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-6), (a["losses"], b["losses"])
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert b["valid_tokens"] == a["valid_tokens"] and b["samples"] == a["samples"]

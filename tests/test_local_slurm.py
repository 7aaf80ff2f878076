"""The local Slurm cluster runs submitit job arrays on three GPU nodes and reports failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from tools import local_slurm
from tests.slurm_fixture import SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Job bodies. Pickled by value (below), so the node need not import this test module,
# whatever the directory pytest ran from.
def report_placement(task_index: int) -> tuple[int, str, str | None]:
    return task_index, os.environ["SLURMD_NODENAME"], os.environ.get("CUDA_VISIBLE_DEVICES")


def exit_with_code_3() -> None:
    sys.exit(3)


def raise_value_error() -> None:
    raise ValueError("task failed on purpose")


def sleep_a_while(_: int) -> None:
    time.sleep(300)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _executor(folder) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # 4 GPUs per task and 4 per node: each node can hold only one task of the array.
    executor.update_parameters(
        timeout_min=10, nodes=1, tasks_per_node=1, cpus_per_task=1, slurm_gres=f"gpu:{local_slurm.GPUS_PER_NODE}"
    )
    return executor


def _sacct_state(job_id: str, timeout_s: float = 60.0) -> str:
    """`sacct` State,ExitCode of the job allocation once it has finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State,ExitCode"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        if out and not out.startswith(("PENDING", "RUNNING", "COMPLETING")):
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct still reports {out!r} for job {job_id}")
        time.sleep(0.5)


def test_array_tasks_land_on_distinct_gpu_nodes(slurm_cluster: SlurmCluster, tmp_path) -> None:
    jobs = _executor(tmp_path).map_array(report_placement, range(3))
    results = sorted(job.result() for job in jobs)
    assert [index for index, _, _ in results] == [0, 1, 2]
    assert sorted(node for _, node, _ in results) == list(local_slurm.NODES)
    assert [gpus for _, _, gpus in results] == ["0,1,2,3"] * 3
    for job in jobs:
        assert _sacct_state(job.job_id) == "COMPLETED|0:0"


def test_task_exiting_nonzero_is_reported_failed(slurm_cluster: SlurmCluster, tmp_path) -> None:
    job = _executor(tmp_path).submit(exit_with_code_3)
    assert _sacct_state(job.job_id) == "FAILED|3:0"
    # No result file, so submitit learns the outcome from sacct; force its next look now
    # rather than wait out its back-off (2, 4, 8, 16 s).
    assert job.done(force_check=True)
    assert job.state == "FAILED"
    # submitit waits 15 s for a result file a slow shared filesystem might still deliver;
    # this one is local (submitit's own tests do the same).
    job._results_timeout_s = 0
    with pytest.raises(UncompletedJobError, match="FAILED"):
        job.result()


def test_task_raising_is_reported_failed(slurm_cluster: SlurmCluster, tmp_path) -> None:
    job = _executor(tmp_path).submit(raise_value_error)
    with pytest.raises(FailedJobError, match="task failed on purpose"):
        job.result()
    assert _sacct_state(job.job_id).startswith("FAILED|")
    # The result file already explained the failure, so submitit never asked sacct: force it.
    assert job.get_info(mode="force")["State"] == "FAILED"


def test_up_again_is_a_fast_no_op(slurm_cluster: SlurmCluster) -> None:
    before = local_slurm.running_pids(slurm_cluster.state_dir)
    assert all(before.values()), before
    start = time.monotonic()
    assert local_slurm.ensure_up(slurm_cluster.state_dir) == slurm_cluster.env
    cli = subprocess.run(
        [sys.executable, "-m", "tools.local_slurm", "up", "--state-dir", str(slurm_cluster.state_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    elapsed = time.monotonic() - start
    assert cli.returncode == 0, cli.stderr
    assert f"SLURM_CONF={slurm_cluster.env['SLURM_CONF']}" in cli.stdout
    assert local_slurm.running_pids(slurm_cluster.state_dir) == before
    assert elapsed < 10, f"two no-op `up` calls took {elapsed:.1f}s"


def test_live_jobs_of_a_run_are_found_by_name(slurm_cluster: SlurmCluster, tmp_path) -> None:
    """What a restarted coordinator uses to find jobs state.json does not record: every live
    job of the run, pending ones too (3 nodes for 4 whole-node jobs), but not a one-shot redo
    job nor another run's job."""
    from launch.executors.base import job_name
    from launch.executors.slurm import SlurmExecutor

    run_dir = tmp_path / "run"
    ex = _executor(tmp_path / "logs")
    ours = []
    for i in range(4):
        ex.update_parameters(name=job_name(run_dir, f"teacher-n{i}"))
        ours.append(ex.submit(sleep_a_while, 0))
    ex.update_parameters(name=job_name(run_dir, "teacher-n0", one_shot=True))
    redo = ex.submit(sleep_a_while, 0)
    ex.update_parameters(name=job_name(tmp_path / "other-run", "teacher-n0"))
    other = ex.submit(sleep_a_while, 0)
    executor = SlurmExecutor(run_dir, cfg=None, plan=None)
    try:
        assert executor.live_jobs() == {j.job_id: f"teacher-n{i}" for i, j in enumerate(ours)}
    finally:
        subprocess.run(["scancel", *[j.job_id for j in ours], redo.job_id, other.job_id])
    deadline = time.monotonic() + 60
    while executor.live_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert executor.live_jobs() == {}

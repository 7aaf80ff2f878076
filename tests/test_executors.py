"""Executors without a cluster: jobs of the partition plan, sbatch parameters, GPU binding,
the environment jobs are submitted with, and who may write a run directory.

    python -m pytest tests/test_executors.py -q
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launch.executors.base import (LaunchContext, UnitTask, job_name, key_of_job_name,
                                   one_shot_unit, time_limit_min, visible_devices, worker_command)
from launch.executors.slurm import (_Sbatch, coordinator_params, inherited_slurm_vars,
                                    role_job_params)
from shared.partition import job_units, plan as make_plan
from shared.recipe import load

REPO = Path(__file__).resolve().parents[1]


def _cfg(recipe: str, *overrides: str):
    cfg, _ = load(recipe, list(overrides))
    return cfg


def _units(recipe: str, merge: bool, *overrides: str):
    cfg = _cfg(recipe, *overrides)
    return cfg, {u.key: u for u in job_units(make_plan(cfg), merge)}


# ---------------------------------------------------------------------------- jobs of the plan


def test_isolated_recipe_is_one_job_per_node_group():
    """qwen3-32b-4b-isolated: 4 one-GPU engines on the generation node are one job of one
    node (not four jobs, which Slurm would give four nodes)."""
    cfg, units = _units("qwen3-32b-4b-isolated", True)
    assert sorted(units) == ["generation-n1", "teacher-n2", "training-n0"]
    gen = units["generation-n1"]
    assert gen.nodes == (1,) and gen.tasks_per_node == 4 and gen.gpus_per_node == 4
    assert [(w.task, w.gpus) for w in gen.workers] == [(0, (0,)), (1, (1,)), (2, (2,)), (3, (3,))]
    assert sum(len(u.nodes) for u in units.values()) == cfg.cluster.num_nodes == 3


def test_shared_node_roles_are_merged_for_slurm_only():
    """qwen3-4b-0.6b splits one node between the roles: on Slurm one job holds that node;
    the local executor keeps one job per role."""
    _, merged = _units("qwen3-4b-0.6b", True)
    assert list(merged) == ["training+generation+teacher-n0"]
    unit = merged["training+generation+teacher-n0"]
    assert [(w.role, w.gpus) for w in unit.workers] == [
        ("training", (0, 1)), ("generation", (2,)), ("teacher", (3,))]
    assert [unit.gpu_positions(w) for w in unit.workers] == [[0, 1], [2], [3]]
    _, split = _units("qwen3-4b-0.6b", False)
    assert sorted(split) == ["generation-n0", "teacher-n0", "training-n0"]
    # Each role's job binds its worker by index into the GPUs that job holds.
    assert split["teacher-n0"].gpu_positions(split["teacher-n0"].workers[0]) == [0]


def test_multi_node_trainer_is_one_job_with_a_task_per_node():
    _, units = _units("context-self-qwen3-4b-16k", True)
    train = units["training-n0"]
    assert train.nodes == (0, 1) and train.tasks_per_node == 1
    assert [(w.node_rank, w.nnodes, w.gpus) for w in train.workers] == [(0, 2, (0, 1, 2, 3)),
                                                                         (1, 2, (0, 1, 2, 3))]
    assert train.slots() == {(0, 0): train.workers[0], (1, 0): train.workers[1]}


def test_unit_task_finds_its_worker_and_gpus():
    _, units = _units("context-self-qwen3-4b-16k", True)
    teacher = units["teacher-n3"]  # two 2-GPU teachers on one node
    task = UnitTask("/r", teacher, local=False)
    assert task.my_worker(0, 1) == teacher.workers[1] and task.my_worker(0, 2) is None
    assert teacher.gpu_positions(teacher.workers[1]) == [2, 3]
    # Slurm set the job's devices; the worker gets its slice of them.
    assert visible_devices([2, 3], "4,5,6,7") == "6,7"
    assert visible_devices([2, 3], None) == "2,3"
    with pytest.raises(RuntimeError, match="fewer GPUs than the partition plan"):
        visible_devices([2, 3], "0,1")
    local = UnitTask("/r", units["generation-n2"], local=True)
    assert local.my_worker(0, 3).task == 3 and local.my_worker(0, 4) is None


def test_local_jobs_use_the_gpus_their_submitter_may_use(monkeypatch, tmp_path):
    """submitit blanks CUDA_VISIBLE_DEVICES in local jobs: the submitter's devices travel in
    SLUICE_VISIBLE_DEVICES, and a local job's workers index into them."""
    import submitit

    from launch.executors.local import LocalExecutor

    cfg, units = _units("qwen3-4b-0.6b", False)
    seen = {}
    monkeypatch.setattr(submitit.LocalExecutor, "submit",
                        lambda self, task: seen.update(env=dict(os.environ), task=task))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    monkeypatch.delenv("SLUICE_VISIBLE_DEVICES", raising=False)
    executor = LocalExecutor(tmp_path, cfg, make_plan(cfg))
    executor.submit(units["teacher-n0"])
    assert seen["env"]["SLUICE_VISIBLE_DEVICES"] == "3,5,6,7"
    assert "SLUICE_VISIBLE_DEVICES" not in os.environ  # only while submitting
    # In the job: submitit's blank CUDA_VISIBLE_DEVICES, the submitter's devices beside it.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("SLUICE_VISIBLE_DEVICES", "3,5,6,7")
    task = seen["task"]
    assert task.job_devices() == "3,5,6,7"
    teacher = units["teacher-n0"].workers[0]
    assert visible_devices(list(teacher.gpus), task.job_devices()) == \
        ",".join("3,5,6,7".split(",")[i] for i in teacher.gpus)
    monkeypatch.setenv("SLUICE_VISIBLE_DEVICES", "")
    assert visible_devices(list(teacher.gpus), task.job_devices()) == ",".join(map(str, teacher.gpus))


def test_spare_task_slots_when_nodes_hold_different_numbers_of_workers():
    """A merged job over two nodes: the trainer on both, the engine and the teacher beside it
    on the first. Three tasks per node (Slurm's layout is uniform); the second node's two
    spare slots run nothing."""
    cfg = _cfg("smoke", "cluster.num_nodes=2", "cluster.gpus_per_node=3",
               "distillation.resource_isolation.roles.training.num_nodes=2",
               "distillation.resource_isolation.roles.training.gpus_per_node=1",
               "distillation.resource_isolation.roles.generation.gpus_per_node=1",
               "distillation.resource_isolation.roles.teacher.gpus_per_node=1")
    units = job_units(make_plan(cfg), True)
    assert len(units) == 1 and units[0].nodes == (0, 1) and units[0].tasks_per_node == 3
    slots = units[0].slots()
    assert {k: (w.role, w.node_rank) for k, w in slots.items()} == {
        (0, 0): ("training", 0), (0, 1): ("generation", 0), (0, 2): ("teacher", 0),
        (1, 0): ("training", 1)}
    task = UnitTask("/r", units[0], local=False)
    assert task.my_worker(1, 1) is None and task.my_worker(1, 2) is None


def test_worker_commands():
    _, units = _units("context-self-qwen3-4b-16k", True)
    ctx = LaunchContext("4242", "10.0.0.7", "24242")
    train = units["training-n0"].workers[1]
    assert worker_command(train, "/r", ctx, python="py") == [
        "py", "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.7:24242", "--rdzv_id=sluice-4242", "--nproc_per_node=4",
        "-m", "stages.train", "/r"]
    teacher = units["teacher-n3"].workers[0]
    assert worker_command(teacher, "/r", ctx, step=3, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "stages.score", "/r", "--step", "3"]
    engine = units["generation-n2"].workers[0]
    assert worker_command(engine, "/r", ctx, python="py") == ["py", "-m", "stages.generate", "/r"]


def test_one_shot_unit_is_one_worker_or_the_whole_trainer():
    _, units = _units("qwen3-4b-0.6b", True)
    shot = one_shot_unit(list(units.values()), "teacher")
    assert shot.key == "teacher-n0" and [w.role for w in shot.workers] == ["teacher"]
    _, units = _units("context-self-qwen3-4b-16k", True)
    assert len(one_shot_unit(list(units.values()), "generation").workers) == 1
    assert len(one_shot_unit(list(units.values()), "training").workers) == 2


def test_job_names_carry_the_key_and_run():
    name = job_name("/runs/a", "generation-n1")
    assert name.startswith("sluice-generation-n1-") and key_of_job_name("/runs/a", name) == "generation-n1"
    assert key_of_job_name("/runs/b", name) is None
    assert key_of_job_name("/runs/a", job_name("/runs/a", "teacher-n2", one_shot=True)) is None


@pytest.mark.parametrize("limit,minutes", [("04:00:00", 240), ("1-00:00:00", 1440), ("90", 90),
                                           ("30:30", 31), ("2-12", 3600), ("1-02:03", 1563)])
def test_time_limits_in_slurm_formats(limit, minutes):
    assert time_limit_min(limit) == minutes


# ---------------------------------------------------------------------------- sbatch parameters


def test_role_job_params_whole_nodes_by_default():
    cfg, units = _units("qwen3-32b-4b-isolated", True)
    p = role_job_params(cfg, units["generation-n1"], "name")
    assert p["exclusive"] is True and p["mem"] == "0"
    assert p["nodes"] == 1 and p["ntasks_per_node"] == 4 and p["gres"] == "gpu:4"
    assert p["cpus_per_task"] == 8 and p["srun_args"] == ["--cpus-per-task=8", "--kill-on-bad-exit=1"]
    assert p["signal_delay_s"] == 300 and p["time"] == 240 and p["wckey"] is None
    assert "additional_parameters" not in p


def test_role_job_params_from_cluster_keys():
    cfg, units = _units("qwen3-32b-4b-isolated", True, "cluster.gpu_type=a100", "cluster.reservation=res1",
                        "cluster.constraint=ib", 'cluster.exclude="gpu[07,12]"', 'cluster.nodelist="gpu[01-03]"',
                        "cluster.partition=booster", "cluster.account=proj", "cluster.qos=normal",
                        "cluster.mem_per_gpu_gb=100", 'cluster.sbatch_args=["--switches=1","--requeue"]')
    p = role_job_params(cfg, units["training-n0"], "name")
    assert p["gres"] == "gpu:a100:4" and p["mem"] == "400G" and p["exclusive"] is True
    assert (p["partition"], p["account"], p["qos"]) == ("booster", "proj", "normal")
    assert (p["constraint"], p["exclude"], p["nodelist"]) == ("ib", "gpu[07,12]", "gpu[01-03]")
    assert p["additional_parameters"] == {"switches": "1", "requeue": True, "reservation": "res1"}
    shared, units = _units("qwen3-32b-4b-isolated", True, "cluster.exclusive=false", "cluster.mem_per_gpu_gb=64")
    p = role_job_params(shared, units["teacher-n2"], "name")
    assert "exclusive" not in p and p["mem"] == "256G"


def test_coordinator_params_are_its_own():
    cfg = _cfg("qwen3-32b-4b-isolated", "cluster.partition=booster", "cluster.qos=gpuqos",
               "cluster.account=proj", "cluster.coordinator.partition=batch",
               "cluster.coordinator.time_limit=12:00:00")
    p = coordinator_params(cfg, "c")
    assert p["partition"] == "batch" and p["account"] == "proj" and "qos" not in p
    assert p["time"] == 720 and p["mem"] == "16G" and p["cpus_per_task"] == 2
    assert p["signal_delay_s"] == 90  # the coordinator requeues itself: little to do
    assert p["nodes"] == 1 and "gres" not in p and "exclusive" not in p
    cfg = _cfg("qwen3-32b-4b-isolated", "cluster.partition=booster")
    assert "partition" not in coordinator_params(cfg, "c")  # the cluster's default, not the GPU one


def test_rendered_script_is_submitits(tmp_path):
    """render_sbatch (golden files, dry run) is the text submitit writes when it submits."""
    from launch.executors.slurm import render_sbatch

    cfg, units = _units("qwen3-32b-4b-isolated", True, 'cluster.setup=["module load x"]')
    params = role_job_params(cfg, units["generation-n1"], "sluice-x")
    folder = tmp_path / "logs" / "%j"
    ex = _Sbatch.__new__(_Sbatch)  # no srun needed to render
    ex.folder, ex.parameters, ex.python = folder, params, "PY"
    assert ex._make_submission_file_text(ex._submitit_command_str, "u") == render_sbatch(params, folder, "PY")
    text = render_sbatch(params, folder, "PY")
    assert "# setup\nmodule load x\n" in text
    assert "srun --unbuffered --output" in text and "--cpus-per-task=8 --kill-on-bad-exit=1 PY -u -m" in text


# ---------------------------------------------------------------------------- submission environment


def test_inherited_slurm_variables_are_not_passed_on(monkeypatch, tmp_path):
    env = {"SLURM_MEM_PER_CPU": "100", "SLURM_JOB_ID": "7", "SBATCH_ACCOUNT": "x",
           "SALLOC_PARTITION": "p", "SRUN_CPUS_PER_TASK": "4", "SLURM_CONF": "/etc/s.conf",
           "PATH": "/bin", "SLURMD_NODENAME_NOT": "keep"}
    assert inherited_slurm_vars(env) == ["SALLOC_PARTITION", "SBATCH_ACCOUNT", "SLURM_JOB_ID",
                                         "SLURM_MEM_PER_CPU", "SRUN_CPUS_PER_TASK"]
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "100")
    monkeypatch.setenv("SLURM_CONF", "/etc/s.conf")
    ex = _Sbatch.__new__(_Sbatch)
    cmd = ex._make_submission_command(tmp_path / "job.sh")
    assert cmd == ["env", "-u", "SLURM_MEM_PER_CPU", "sbatch", str(tmp_path / "job.sh")]
    # What the command does: the submitted program sees no SLURM_MEM_PER_CPU, keeps SLURM_CONF.
    out = subprocess.run(cmd[:-2] + [sys.executable, "-c", "import os, json; print(json.dumps("
                         "[os.environ.get('SLURM_MEM_PER_CPU'), os.environ.get('SLURM_CONF')]))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[null, "/etc/s.conf"]'


# ---------------------------------------------------------------------------- run directory access


def test_run_dir_is_private_and_checked(tmp_path):
    from launch import access
    from shared.errors import UserError

    run_dir = tmp_path / "runs" / "r"
    access.create_run_dir(run_dir, None)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    (run_dir / "logs" / "training-n0" / "123").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("x")
    access.check_run_dir(run_dir)
    os.chmod(run_dir, 0o770)
    with pytest.raises(UserError, match=r"writable by group \(mode 770\).*chmod -R go-w"):
        access.check_run_dir(run_dir)
    os.chmod(run_dir, 0o700)
    os.chmod(run_dir / "config.yaml", 0o666)
    with pytest.raises(UserError, match=r"config.yaml is writable by group and others"):
        access.check_run_dir(run_dir)
    os.chmod(run_dir / "config.yaml", 0o600)
    # submitit links each submission script beside the job folders: fine.
    (run_dir / "logs" / "training-n0" / ".submission_file_x.sh").symlink_to(
        run_dir / "logs" / "training-n0" / "123" / "123_submission.sh")
    access.check_run_dir(run_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run_dir / "logs" / "training-n0" / "124").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"training-n0/124 is a symbolic link"):
        access.check_run_dir(run_dir)
    (run_dir / "logs" / "training-n0" / "124").unlink()
    (run_dir / "logs" / "teacher-n1").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"teacher-n1 is a symbolic link"):
        access.check_run_dir(run_dir)


def test_shared_run_dir_is_group_readable_never_writable(tmp_path):
    import grp

    from launch import access

    group = grp.getgrgid(os.getgid()).gr_name
    run_dir = tmp_path / "shared"
    old = os.umask(0o022)
    try:
        access.create_run_dir(run_dir, group)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o2750
        assert os.umask(0o022) == 0o027  # what the run's processes create
        access.check_run_dir(run_dir)
    finally:
        os.umask(old)


def test_launch_refuses_a_group_writable_run_dir_on_resume(tmp_path, tiny_models):
    from launch.run import prepare
    from launch.start import create_run_dir

    run_dir = tmp_path / "run"
    conf, cfg, node, plan = prepare(["conf=smoke", f"launch.run_dir={run_dir}"])
    create_run_dir(run_dir, conf, node, plan, "local", cfg.launch.share_group)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    os.chmod(run_dir, 0o775)
    again = subprocess.run([sys.executable, "-m", "launch.run", "conf=smoke", f"launch.run_dir={run_dir}",
                            "launch.detach=false"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stdout + again.stderr
    assert f"run directory {run_dir} is not safe to run: {run_dir} is writable by group" in again.stderr
    assert f"Fix: chmod -R go-w {run_dir}" in again.stderr
    assert not (run_dir / "coordinator" / "events.jsonl").exists()  # nothing started

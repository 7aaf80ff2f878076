"""A kill in the middle of saving a checkpoint never leaves a checkpoint that looks complete;
the resumed run continues from the previous complete one and ends where an uninterrupted
run ends."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.bench_train import make_run_dir, write_scored_step
from shared.models import tiny_models_dir
from tinymodels.random_weights import build_tiny_models
from shared.retention import checkpoints_to_drop, committed_checkpoints

ROOT = Path(__file__).resolve().parents[1]
VOCAB, K = 512, 16
OVERRIDES = ["policy.train_global_batch_size=8", "checkpointing.save_period=1",
             "distillation.max_num_steps=3"]


def train(run_dir, faults=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("SLUICE_FAULTS", None)
    if faults:
        env["SLUICE_FAULTS"] = faults
    return subprocess.run([sys.executable, "-m", "stages.train", str(run_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def make_run(path):
    rd = make_run_dir(path, OVERRIDES)
    for step in (1, 2, 3):
        write_scored_step(rd, step, 2, 8, vocab=VOCAB, k=K)
    return rd


def weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "weights" / f"{step:06d}" / "model.safetensors"))


@pytest.mark.dist
def test_kill_during_checkpoint_save_then_resume(tmp_path):
    build_tiny_models(tiny_models_dir())
    killed = make_run(tmp_path / "killed")
    out = train(killed.root, faults="checkpoint_save:2")
    assert out.returncode == -signal.SIGKILL, out.stdout[-2000:] + out.stderr[-2000:]
    # Step 2's checkpoint data was written but never committed: it must not count.
    assert committed_checkpoints(killed) == [1]
    leftovers = list((killed.root / "checkpoints").glob(".tmp-000002-*"))
    assert leftovers and not any((d / "COMMITTED.json").exists() for d in leftovers)
    assert not (killed.root / "steps" / "000002" / "train.json").exists()

    out = train(killed.root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "resumed from" in out.stdout + out.stderr and "000001" in out.stdout + out.stderr
    assert committed_checkpoints(killed) == [1, 2, 3]
    assert not list((killed.root / "checkpoints").glob(".tmp-*"))

    clean = make_run(tmp_path / "clean")
    out = train(clean.root)
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = weights(killed.root, 3), weights(clean.root, 3)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_keep_top_k_ranks_by_validation_metric():
    steps = [2, 4, 6, 8, 10]
    acc = {2: 0.5, 4: 0.9, 6: 0.1, 8: 0.7}  # step 10 not validated yet
    # keep 3: the newest (10) plus the two best validated (4, 8)
    assert checkpoints_to_drop(steps, acc, 3, higher_is_better=True) == [2, 6]
    # lower is better (e.g. train:loss): 6 and 2 are best
    assert checkpoints_to_drop(steps, acc, 3, higher_is_better=False) == [4, 8]
    # no metric at all: by recency
    assert checkpoints_to_drop(steps, {}, 2, higher_is_better=True) == [2, 4, 6]
    assert checkpoints_to_drop([1, 2], {}, 3, higher_is_better=True) == []

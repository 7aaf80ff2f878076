"""weights/<step> is pruned to what the run still needs (shared.retention.weights_needed).

A full copy of the student per step is 8 GB for Qwen3-4B in bf16: 4 TB over 500 steps. The
coordinator keeps what generation may still load (given max_staleness), what a resume from
the newest checkpoint needs, the versions whose validation is pending, the steps of kept
checkpoints and every checkpointing.keep_weights_period-th step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.retention import weights_needed
from tests.test_e2e import REPO, assert_scored_exactly_once, check_rc, events, inspect, launch

COMMITTED = list(range(1, 13))


@pytest.mark.parametrize("trained, checkpoints, staleness, validations, period, want", [
    # Strictly on-policy: the newest and the one before it (a generation worker may be loading it).
    (12, [], 0, [], None, {11, 12}),
    # max_staleness 2: generation of a step may use weights three steps old.
    (12, [], 2, [], None, {9, 10, 11, 12}),
    # The newest checkpoint (a resume restarts from it) and the window below it; older kept
    # checkpoints' own steps.
    (12, [4, 8], 0, [], None, {4, 7, 8, 11, 12}),
    # Weights written ahead of the trained step (train.json of step 12 not yet written).
    (10, [], 0, [], None, {9, 10, 11, 12}),
    # Pending validations, and the user's period.
    (12, [], 0, [3, 6], 5, {3, 5, 6, 10, 11, 12}),
])
def test_weights_needed(trained, checkpoints, staleness, validations, period, want):
    assert weights_needed(COMMITTED, trained, checkpoints, staleness, validations, period) == want


def test_weights_needed_only_names_committed_versions():
    assert weights_needed([], 5, [4], 1, [2], 1) == set()
    assert weights_needed([5, 6], 6, [4], 1, [2], None) == {5, 6}


def _versions(run_dir: Path) -> list:
    root = run_dir / "weights"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


STEPS = 7
OVERRIDES = (f"distillation.max_num_steps={STEPS}", "checkpointing.save_period=3",
             "checkpointing.keep_top_k=1", "checkpointing.save_consolidated=true",
             "queue.lease_s=20", "queue.heartbeat_s=2")


@pytest.mark.vllm
@pytest.mark.dist
def test_run_keeps_only_needed_weights_and_resumes_after_pruning(tmp_path):
    """7 steps, checkpoints every 3 (only the newest kept), training SIGKILLed once in step 5:
    by then weights 1 is pruned, and the restarted trainer resumes from checkpoint 3 (steps 4
    and 5 redone) while generation starts again from the weights kept for that. At the end: the last step and the one before it (validation
    at the end is collected, the newest checkpoint is the last step)."""
    run_dir = tmp_path / "run"
    res = launch(run_dir, "smoke", *OVERRIDES, timeout_s=900,
                 env={"SLUICE_FAULTS": "optimizer_batch:5", "SLUICE_FAULTS_DIR": str(tmp_path)})
    check_rc(res, run_dir)
    ev = events(run_dir)
    failed = [e for e in ev if e["event"] == "job_failed"]
    assert [e["roles"] for e in failed] == [["training", "generation", "teacher"]] or \
        [e["roles"] for e in failed] == [["training"]], failed
    pruned = sorted(v for e in ev if e["event"] == "weights_pruned" for v in e["versions"])
    assert pruned == [1, 2, 3, 4, 5], pruned
    assert _versions(run_dir) == [STEPS - 1, STEPS]
    assert not list((run_dir / "weights").glob(".pruned-*"))
    assert_scored_exactly_once(run_dir, steps=STEPS)
    ok = inspect(run_dir, "--verify")  # pruned weights are not missing weights
    assert ok.returncode == 0 and "missing_weights" not in ok.stdout, ok.stdout + ok.stderr

    # checkpointing.save_consolidated: the final student in HF format, as the last weights.
    final, last = run_dir / "final", run_dir / "weights" / f"{STEPS:06d}"
    assert json.loads((final / "COMMITTED.json").read_text())["step"] == STEPS
    names = sorted(p.name for p in last.iterdir() if p.name != "COMMITTED.json")
    assert names == sorted(p.name for p in final.iterdir() if p.name != "COMMITTED.json")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    for name in names:
        assert (final / name).read_bytes() == (last / name).read_bytes(), name
    assert [e["step"] for e in ev if e["event"] == "final_published"] == [STEPS]

    # Regenerating a step whose weights are gone is refused with the fix; rescoring is not.
    out = subprocess.run([sys.executable, "-m", "launch.resubmit", str(run_dir), "--stage",
                          "generation", "--step", "3"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "needs the student's weights of step 2" in out.stderr
    assert "--stage teacher" in out.stderr

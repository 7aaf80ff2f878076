"""The learning check (issue 8): on-policy distillation through the real pipeline teaches the
random tiny student. Slow (~15-20 min on 2 CPU cores): `make learn`, or
`python -m pytest -m slow tests/test_learn.py`."""

import pytest

from bench import bench_learn


def test_train_file_matches_heldout_split():
    """conf/learn-train.jsonl is exactly the thinker-range problems minus the held-out ones."""
    bench_learn.check_train_file()
    held = {r["problem"] for r in bench_learn.heldout()}
    train = {r["problem"] for r in bench_learn.train_rows()}
    assert held and train and not held & train


@pytest.mark.slow
def test_distillation_learns(tmp_path):
    out = bench_learn.run({}, run_dir=tmp_path / "run", compare=False)
    by_name = {e["name"].split(";")[0]: e for e in out["entries"]}
    kl = by_name["learn: student reverse KL to teacher (per token, held-out)"]
    acc = by_name["learn: student exact-match accuracy (held-out, greedy)"]
    assert kl["ratio"] <= bench_learn.KL_RATIO_TARGET, out["notes"]
    assert acc["ratio"] >= bench_learn.ACC_GAIN_TARGET, out["notes"]

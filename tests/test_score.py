"""The teacher stage: chunked top-k, alignment, FSDP2 sharding, the shard path, the worker.

    .venv/bin/python -m pytest tests/test_score.py -q

Every expected value comes from a direct full forward of the teacher (``lm(ids).logits``, a
full-vocabulary log-softmax, then top-k), never from the code under test. The 2-rank half is
this file run under torchrun (the test launches it):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_score.py OUT RUN_DIR
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from omegaconf import OmegaConf

from shared import schemas
from shared.queue import StageQueue
from shared.recipe import load
from shared.rundir import RunDir
from stages import score

REPO = Path(__file__).resolve().parents[1]
N_SHARDS = 3
# A teacher temperature != 1, so that a missing or doubled division shows.
OVERRIDES = ["teacher.generation.temperature=0.7"]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny models, built once; ``tiny:teacher`` resolves here (also in subprocesses)."""
    from tinymodels.random_weights import build_tiny_models

    out = tmp_path_factory.mktemp("tiny-models")
    build_tiny_models(out)
    old = os.environ.get("SLUICE_TINY_DIR")
    os.environ["SLUICE_TINY_DIR"] = str(out)
    yield out
    if old is None:
        os.environ.pop("SLUICE_TINY_DIR", None)
    else:
        os.environ["SLUICE_TINY_DIR"] = old


@pytest.fixture(scope="session")
def cfg(tiny_dir):
    return load("smoke", OVERRIDES)[0]


@pytest.fixture(scope="session")
def teacher(cfg):
    return score.load_teacher(cfg, torch.device("cpu"))


@pytest.fixture(scope="session")
def teacher64(teacher):
    """The teacher with float64 weights, for comparisons with a direct forward: in float32,
    CPU matmul kernels round differently for different shapes (one row vs many, padded
    batches), by up to ~1e-5 on this model's logits (|logit| ~ 12), which would hide what the
    tests check. In float64 that noise is ~1e-14; the LM head's output is still cast to
    float32, so the scoring path (fp32 log-softmax and top-k) is the one that runs."""
    return replace(teacher, scorer=score.Scorer(copy.deepcopy(teacher.lm).double()))


# ----------------------------------------------------------------------------- helpers


def random_rows(seed: int, n: int, vocab: int = 500, lo: int = 3, hi: int = 40):
    """(prompts, responses): id lists of varied lengths, deterministic in ``seed``."""
    g = np.random.default_rng(seed)
    prompts = [g.integers(0, vocab, g.integers(lo, hi)).tolist() for _ in range(n)]
    responses = [g.integers(0, vocab, g.integers(lo, hi)).tolist() for _ in range(n)]
    return prompts, responses


@torch.no_grad()
def reference_topk(teacher, prompt, response):
    """Top-k of a direct forward: full logits, full log-softmax, rows predicting the response."""
    logits = teacher.lm(torch.tensor([prompt + response])).logits[0].float()
    logprobs = torch.log_softmax(logits / teacher.temperature, dim=-1)
    positions = len(prompt) - 1 + torch.arange(len(response))
    values, ids = logprobs[positions].topk(teacher.topk, dim=-1)
    return values, ids


def row_slices(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]


def rollouts_table(prompts, responses, tag: str = "") -> pa.Table:
    n = len(prompts)
    return schemas.build_table("rollouts", {
        "sample_id": [f"{tag}s{i}" for i in range(n)],
        "step": [1] * n,
        "problem": [f"problem {i}" for i in range(n)],
        "answer": [None] * n,
        "prompt_ids": prompts,
        "dataset": ["synthetic"] * n,
        "index": list(range(n)),
        "response_ids": responses,
        "response_text": ["text"] * n,
        "finish_reason": ["stop"] * n,
        "policy_version": [0] * n,
        "gen_logprobs": [[-1.0] * len(r) for r in responses],
    })


def shard_rows(index: int):
    """Rollout rows of shard ``index``: varied lengths, one longer than the smoke recipe's
    teacher.max_total_sequence_length (192) and one with an empty response."""
    prompts, responses = random_rows(100 + index, 5)
    prompts[1], responses[1] = prompts[1] + [7] * 150, responses[1] + [9] * 60  # > 192 tokens
    responses[3] = []
    return prompts, responses


def _make_run_dir(path: Path) -> RunDir:
    """A run directory with the smoke config and step 1's rollouts shards committed."""
    path.mkdir(parents=True, exist_ok=True)
    node = load("smoke", OVERRIDES)[1]
    OmegaConf.save(node, path / "config.yaml")
    rd = RunDir(path)
    rollouts = StageQueue(rd, 1, "rollouts")
    rollouts.expect(N_SHARDS)
    StageQueue(rd, 1, "scored").expect(N_SHARDS)
    for k in range(N_SHARDS):
        rollouts.commit(k, rollouts_table(*shard_rows(k), tag=f"k{k}-"))
    return rd


def fp16_close(stored: torch.Tensor, exact: torch.Tensor) -> bool:
    """Within the float16 round-trip bound documented in shared/schemas.py."""
    bound = 2.0**-11 * exact.abs() + 2.0**-25
    return bool(((stored - exact).abs() <= bound).all())


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("mb_tokens", [1, 10_000], ids=["one-row-batches", "padded-batches"])
def test_chunked_topk_equals_full_forward(teacher64, chunk_size, mb_tokens):
    prompts, responses = random_rows(0, 6)
    t = replace(teacher64, chunk_size=chunk_size, mb_tokens=mb_tokens)
    scores = score.score_rows(t, prompts, responses)
    assert scores.mask == [1] * 6
    assert scores.lengths == [len(r) for r in responses]
    assert scores.ids.shape == (sum(map(len, responses)), t.topk)
    for r, sl in enumerate(row_slices(scores.lengths)):
        values, ids = reference_topk(t, prompts[r], responses[r])
        assert torch.equal(scores.ids[sl].long(), ids), f"row {r}"
        torch.testing.assert_close(scores.logprobs[sl], values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides, divisor", [
    (["policy.generation.temperature=0.6"], 1.0),  # teacher.generation null: never scaled
    (["policy.generation.temperature=0.6", "teacher.generation.temperature=0.7"], 0.7),
], ids=["teacher-generation-null", "teacher-generation-set"])
def test_teacher_temperature_is_the_teachers_own_as_in_the_fork(tiny_dir, overrides, divisor):
    """The fork divides the teacher's logits only by teacher.generation.temperature, and not at
    all when the teacher has no generation section; the student's sampling temperature (0.6
    here) never reaches the teacher."""
    t = score.load_teacher(load("smoke", overrides)[0], torch.device("cpu"))
    t = replace(t, scorer=score.Scorer(copy.deepcopy(t.lm).double()))
    prompt, response = [5, 6, 7, 8], [9, 10, 11, 12, 13]
    scores = score.score_rows(t, [prompt], [response])
    with torch.no_grad():
        logits = t.lm(torch.tensor([prompt + response])).logits[0]
    positions = len(prompt) - 1 + torch.arange(len(response))
    values, ids = torch.log_softmax(logits[positions] / divisor, dim=-1).topk(t.topk, dim=-1)
    assert torch.equal(scores.ids.long(), ids)
    torch.testing.assert_close(scores.logprobs, values.float(), rtol=0, atol=1e-5)


def test_sampled_reverse_scores_each_response_token_itself(teacher64):
    """loss_fn.kl_type=sampled_reverse: one log-prob per response token, that of the student's
    own sampled token (no top-k): ids = the response, values = the full-vocabulary log-softmax
    of the teacher (at its temperature) there."""
    t = replace(teacher64, sampled=True, topk=1, chunk_size=3)
    prompts, responses = random_rows(3, 4)
    scores = score.score_rows(t, prompts, responses)
    assert scores.ids.shape == (sum(map(len, responses)), 1)
    for r, sl in enumerate(row_slices(scores.lengths)):
        with torch.no_grad():
            logits = t.lm(torch.tensor([prompts[r] + responses[r]])).logits[0]
        positions = len(prompts[r]) - 1 + torch.arange(len(responses[r]))
        want = torch.log_softmax(logits[positions] / t.temperature, -1)
        resp = torch.tensor(responses[r])
        assert torch.equal(scores.ids[sl, 0].long(), resp), f"row {r}"
        torch.testing.assert_close(scores.logprobs[sl, 0], want[torch.arange(len(resp)), resp].float(),
                                   rtol=0, atol=1e-5)


def test_sampled_reverse_teacher_settings(tiny_dir):
    cfg = load("smoke", ["loss_fn.kl_type=sampled_reverse"])[0]
    t = score.load_teacher(cfg, torch.device("cpu"))
    assert t.sampled and t.topk == 1


def test_response_token_i_is_scored_at_teacher_position(teacher64):
    """Custom teacher prompt (longer than, and different from, the student's): token i's
    top-k equals the teacher's next-token prediction after teacher_prompt + response[:i]."""
    student_prompt = [11, 12, 13]
    teacher_prompt = [21, 22, 23, 24, 25, 26, 27, 28]
    response = [31, 32, 33, 34, 35]
    table = score.score_shard(teacher64, rollouts_table([student_prompt], [response]),
                              teacher_prompts=[teacher_prompt], trace_found=[True],
                              prefix_truncated=[False])
    row = table.to_pylist()[0]
    assert row["alignment_offset"] == len(teacher_prompt) - 1
    assert row["teacher_prompt_ids"] == teacher_prompt
    assert row["prompt_ids"] == student_prompt
    assert (row["trace_found"], row["prefix_truncated"], row["sample_mask"]) == (True, False, 1)
    stored = schemas.topk_from_arrow(table)
    for i in range(len(response)):
        with torch.no_grad():
            logits = teacher64.lm(torch.tensor([teacher_prompt + response[:i]])).logits[0, -1]
        values, ids = torch.log_softmax(logits / teacher64.temperature, -1).topk(teacher64.topk)
        assert torch.equal(stored.ids[i], ids), f"response token {i}"
        assert fp16_close(stored.logprobs[i], values)
    # The student prompt gives other scores: the teacher prompt really was used.
    plain = schemas.topk_from_arrow(score.score_shard(teacher64, rollouts_table([student_prompt], [response])))
    assert not torch.equal(plain.ids, stored.ids)


def test_dropped_rows_and_plain_columns(teacher):
    prompts, responses = shard_rows(0)
    table = score.score_shard(teacher, rollouts_table(prompts, responses), keep=[1, 1, 0, 1, 1])
    rows = table.to_pylist()
    # Row 1: longer than teacher.max_total_sequence_length; row 2: keep=False.
    assert [r["sample_mask"] for r in rows] == [1, 0, 0, 1, 1]
    assert [len(r["teacher_topk_ids"]) for r in rows] == [len(responses[0]), 0, 0, 0, len(responses[4])]
    assert all(r["teacher_prompt_ids"] is None and r["trace_found"] is None
               and r["prefix_truncated"] is None for r in rows)
    assert [r["alignment_offset"] for r in rows] == [len(p) - 1 for p in prompts]
    assert {r["teacher_model"] for r in rows} == {"tiny:teacher"}
    assert score._teacher_tokens(table) == sum(len(prompts[r]) + len(responses[r]) for r in (0, 3, 4))


def test_shard_roundtrip_through_queue(teacher, tmp_path):
    prompts, responses = random_rows(1, 8)
    rollouts = rollouts_table(prompts, responses)
    table = score.score_shard(teacher, rollouts)
    schemas.check_schema(table.schema, "scored")
    assert table.column_names[: rollouts.num_columns] == rollouts.column_names
    assert table.select(rollouts.column_names).equals(rollouts.select(rollouts.column_names))
    q = StageQueue(RunDir(tmp_path), 1, "scored")
    q.expect(1)
    q.commit(0, table, extra_meta={"score_s": 0.1, "tokens": 1})
    back = schemas.topk_from_arrow(q.read(0))
    exact = score.score_rows(teacher, prompts, responses)
    assert torch.equal(back.ids, exact.ids.long())
    assert fp16_close(back.logprobs, exact.logprobs)


def test_worker_commits_every_shard_once(tiny_dir, teacher, tmp_path):
    rd = _make_run_dir(tmp_path / "run")
    assert score.run_worker(rd.root, step=1) == N_SHARDS
    scored = StageQueue(rd, 1, "scored")
    records = scored.committed()
    assert sorted(records) == list(range(N_SHARDS)) and scored.is_complete()
    for k, record in records.items():
        assert set(record["extra"]) == {"score_s", "tokens", "dropped_samples"}
        assert record["extra"]["dropped_samples"] == 1  # the over-long row of shard_rows
        table = scored.read(k)
        expected = score.score_shard(teacher, StageQueue(rd, 1, "rollouts").read(k))
        assert table.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist()
        assert table.equals(expected)
    # A second pass finds nothing to do: nothing is committed twice.
    assert score.run_worker(rd.root, step=1, once=True) == 0
    assert {k: r["commit_id"] for k, r in scored.committed().items()} == \
        {k: r["commit_id"] for k, r in records.items()}
    status = [json.loads(p.read_text()) for p in rd.path("workers", "teacher").glob("*.json")]
    assert status and all(s["status"] == "done" for s in status)


def test_queue_compression_reaches_scored_shards(tiny_dir, teacher, tmp_path):
    rd = _make_run_dir(tmp_path / "run")
    cfg = OmegaConf.load(rd.config_file)
    cfg.queue.compression = "zstd"
    OmegaConf.save(cfg, rd.config_file)
    assert score.run_worker(rd.root, step=1, once=True) == N_SHARDS
    scored = StageQueue(rd, 1, "scored")
    assert {r["compression"] for r in scored.committed().values()} == {"zstd"}
    expected = score.score_shard(teacher, StageQueue(rd, 1, "rollouts").read(0))
    assert scored.read(0).equals(expected)
    plain = StageQueue(RunDir(tmp_path / "plain"), 1, "scored")
    assert scored.record(0)["bytes"] < plain.commit(0, expected)["bytes"]  # really compressed on disk


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_long_lived_worker_waits_for_rollouts_and_stops(tiny_dir, tmp_path):
    """Without --step: every active step, a scored shard only once its rollouts shard is
    committed, and exit on coordinator/STOP."""
    rd = _make_run_dir(tmp_path / "run")
    rollouts2, scored2 = StageQueue(rd, 2, "rollouts"), StageQueue(rd, 2, "scored")
    rollouts2.expect(2)
    scored2.expect(2)
    rollouts2.commit(1, rollouts_table(*shard_rows(1), tag="two-"))
    result: dict = {}

    def target():
        try:
            result["committed"] = score.run_worker(rd.root)
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_for(lambda: "error" in result or (StageQueue(rd, 1, "scored").is_complete()
                                           and 1 in scored2.committed()))
    assert "error" not in result, result
    assert 0 not in scored2.committed()  # its rollouts shard is not committed yet
    rollouts2.commit(0, rollouts_table(*shard_rows(0), tag="two-"))
    wait_for(lambda: "error" in result or scored2.is_complete())
    rd.coordinator_dir.mkdir()
    rd.stop_file.touch()
    thread.join(timeout=60)
    assert not thread.is_alive() and result == {"committed": N_SHARDS + 2}


@pytest.mark.dist
def test_two_rank_fsdp_matches_one_process(tiny_dir, teacher, tmp_path):
    rd = _make_run_dir(tmp_path / "run")
    out = tmp_path / "dist.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__)), str(out), str(rd.root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    sharded = torch.load(out)
    prompts, responses = random_rows(2, 9)
    exact = score.score_rows(replace(teacher, mb_tokens=128), prompts, responses)
    assert sharded["mask"] == exact.mask and sharded["lengths"] == exact.lengths
    assert torch.equal(sharded["ids"], exact.ids)
    torch.testing.assert_close(sharded["logprobs"], exact.logprobs, rtol=0, atol=1e-5)

    # The torchrun worker (rank 0 commits, rank 1 follows) scored every shard like one process.
    scored = StageQueue(rd, 1, "scored")
    assert sorted(scored.committed()) == list(range(N_SHARDS))
    for k in range(N_SHARDS):
        got = schemas.topk_from_arrow(scored.read(k))
        want = score.score_shard(teacher, StageQueue(rd, 1, "rollouts").read(k))
        assert torch.equal(got.ids, schemas.topk_from_arrow(want).ids)
        assert torch.equal(got.offsets, schemas.topk_from_arrow(want).offsets)
        torch.testing.assert_close(got.logprobs, schemas.topk_from_arrow(want).logprobs,
                                   rtol=0, atol=2.0**-11 * 64)  # one float16 ulp at |x| <= 64


def _dist_main(out: str, run_dir: str) -> None:
    """torchrun half of test_two_rank_fsdp_matches_one_process (every rank runs this)."""
    from shared.worker import load_run_config

    rank, world, _ = score.init_distributed()
    assert world == 2
    teacher = score.load_teacher(load_run_config(run_dir), torch.device("cpu"))
    assert teacher.sharded
    # Budget 128: five batches, some padded, 3 on one rank and 2 on the other (a dummy forward).
    prompts, responses = random_rows(2, 9)
    scores = score.score_rows(replace(teacher, mb_tokens=128), prompts, responses)
    if rank == 0:
        torch.save({"ids": scores.ids, "logprobs": scores.logprobs, "mask": scores.mask,
                    "lengths": scores.lengths}, out)
    # The real worker on the same process group: rank 0 leads, rank 1 follows.
    committed = score.run_worker(run_dir, step=1)
    assert committed == (N_SHARDS if rank == 0 else 0)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from shared.distributed import exit_now

    _dist_main(*sys.argv[1:])
    exit_now(0)  # as stages/score.py main

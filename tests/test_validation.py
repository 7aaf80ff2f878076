"""Validation: scheduling, scoring with math-verify, and the generation worker answering
validation prompts with exactly the requested weights.

    .venv/bin/python -m pytest tests/test_validation.py -q
"""

import dataclasses
import json

import pytest
from omegaconf import OmegaConf

from launch.validation import ACCURACY, AVG_LENGTH, Validation, scheduled_versions
from shared.queue import StageQueue
from shared.recipe import load
from shared.rundir import RunDir
from shared.schemas import build_table


def make_run(tmp_path, *overrides):
    cfg, node = load("smoke", ["distillation.max_val_samples=6", "distillation.val_batch_size=4",
                               "distillation.val_at_start=true", "queue.poll_s=0.05", *overrides])
    # smoke.yaml inherits data.validation.repeat=16 (distillation_math's AIME x16); distinct rows
    # here. (Set in code: the override data.validation.repeat=1 is refused as an unknown key.)
    node.data.validation.repeat = 1
    cfg.data.validation = dataclasses.replace(cfg.data.validation, repeat=1)
    OmegaConf.save(node, tmp_path / "config.yaml")
    return RunDir(tmp_path), cfg


def metrics_rows(rd):
    return [json.loads(line) for line in rd.metrics_file.read_text().splitlines()]


def test_scheduled_versions():
    cfg, _ = load("smoke", ["distillation.val_period=2", "distillation.val_at_start=true",
                            "distillation.val_at_end=true"])
    assert scheduled_versions(cfg, 5) == [0, 2, 4, 5]
    cfg, _ = load("smoke", ["distillation.val_period=0", "distillation.val_at_end=false"])
    assert scheduled_versions(cfg, 5) == []
    cfg, _ = load("smoke", ["distillation.val_period=0"])  # the smoke validates at the end
    assert scheduled_versions(cfg, 5) == [5]


def test_collect_scores_known_answers(tmp_path, tiny_models):
    rd, cfg = make_run(tmp_path, "distillation.val_period=2", "distillation.val_at_end=true",
                       "logger.num_val_samples_to_print=3")
    val = Validation(rd, cfg)
    assert val.prepare() == 6
    assert val.versions(3) == [0, 2, 3]
    assert val.poll(trained_step=0, total_steps=3) == []  # v0 requested, nobody answered yet
    vrd = rd.validation
    assert StageQueue(vrd, 0, "prompts").is_complete() and StageQueue(vrd, 0, "prompts").expected() == 2
    assert StageQueue(vrd, 2, "prompts").expected() is None  # not trained yet: not requested

    # Answer version 0 by hand: 4 of 6 right (boxed, or a boxed answer inside prose), two wrong.
    rollouts = StageQueue(vrd, 0, "rollouts")
    prompts = StageQueue(vrd, 0, "prompts")
    answers = []
    lengths = [3, 5, 7, 1, 2, 6]
    i = 0
    for k in range(2):
        rows = prompts.read(k).to_pylist()
        for r in rows:
            answers.append(r["answer"])
            right = i in (0, 2, 4, 5)
            boxed = r["answer"] if right else str(int(r["answer"]) + 1)
            r.update(response_text=(f"So the result is \\boxed{{{boxed}}}." if i % 2 else f"\\boxed{{{boxed}}}"),
                     response_ids=list(range(lengths[i])), finish_reason="stop", policy_version=0,
                     gen_logprobs=[-0.5] * lengths[i])
            i += 1
        rollouts.commit(k, build_table("rollouts", rows))
    # Shards of at most val_batch_size prompts, balanced; seeds keyed by the row, not the version.
    assert [r["sample_id"] for r in prompts.read(1).to_pylist()] == ["val-00003", "val-00004", "val-00005"]

    assert len(set(answers)) > 1
    rows = val.poll(trained_step=1, total_steps=3)
    assert rows == [{"step": 0, ACCURACY: pytest.approx(4 / 6), AVG_LENGTH: pytest.approx(4.0)}]
    assert metrics_rows(rd) == [{"step": 0, ACCURACY: pytest.approx(4 / 6), AVG_LENGTH: 4.0}]
    samples = [json.loads(x) for x in vrd.path("samples-000000.jsonl").read_text().splitlines()]
    assert [(s["answer"], s["correct"], s["response_tokens"]) for s in samples] == \
        [(answers[0], True, 3), (answers[1], False, 5), (answers[2], True, 7)]
    assert set(samples[0]) >= {"problem", "answer", "response_text", "correct"}
    result = json.loads((vrd.step_dir(0) / "result.json").read_text())
    assert result["samples"] == 6 and result["correct"] == 4 and result["policy_version"] == [0]

    # Idempotent across coordinator restarts: nothing collected or appended twice.
    again = Validation(rd, cfg)
    assert again.poll(trained_step=2, total_steps=3) == []  # requests v2
    assert len(metrics_rows(rd)) == 1
    assert StageQueue(vrd, 2, "prompts").is_complete() and not again.done(3)
    with pytest.raises(RuntimeError, match="not complete"):
        again.collect(2)


@pytest.mark.vllm
def test_worker_answers_validation_with_requested_weights(tmp_path, tiny_models):
    rd, cfg = make_run(tmp_path, "distillation.max_val_samples=3", "distillation.val_batch_size=2",
                       "policy.generation.max_new_tokens=8")
    val = Validation(rd, cfg)
    assert val.prepare() == 3
    val.request(0)
    val.request(1)  # weights/000001 does not exist: the worker must leave it alone

    from stages.generate import run_worker

    assert run_worker(rd, once=True) == 2
    vrd = rd.validation
    assert StageQueue(vrd, 1, "rollouts").committed() == {}
    q = StageQueue(vrd, 0, "rollouts")
    assert all(rec["extra"]["validation"] and rec["extra"]["policy_version"] == 0
               for rec in q.committed().values())
    row = val.collect(0)
    assert 0.0 <= row[ACCURACY] <= 1.0 and 0 < row[AVG_LENGTH] <= 8
    assert metrics_rows(rd) == [row]

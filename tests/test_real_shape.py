"""The whole loop at real Qwen3 shapes (conf=smoke-real-shape): vocabulary 151,936, head_dim
128, 16 query / 8 KV heads, tied embeddings, bf16 on disk; 2 layers, hidden 256, on CPU.

One run of 2 steps: generation starts from the tied base and reloads the trainer's tied
export in place for step 2, the teacher's top-k spans the real vocabulary, training loads
per rank into FSDP2 shards (2 ranks) and exports tied weights in the base's dtype.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_e2e import assert_scored_exactly_once, check_rc, launch, sample_ids

pytestmark = [pytest.mark.vllm, pytest.mark.dist]
STEPS = 2
VOCAB = 151_936


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("realshape") / "run"
    res = launch(run_dir, "smoke-real-shape", f"distillation.max_num_steps={STEPS}",
                 "distillation.val_at_end=false", timeout_s=900)
    check_rc(res, run_dir)
    return run_dir


def test_every_sample_scored_once_and_trained(real_run):
    assert_scored_exactly_once(real_run, steps=STEPS)
    for t in range(1, STEPS + 1):
        train = json.loads((real_run / "steps" / f"{t:06d}" / "train.json").read_text())
        assert torch.isfinite(torch.tensor(train["loss"])) and train["world_size"] == 2


def test_teacher_topk_spans_the_real_vocabulary(real_run):
    from shared.queue import StageQueue
    from shared.rundir import RunDir

    q = StageQueue(RunDir(real_run), 1, "scored")
    ids = torch.cat([torch.tensor(q.read(k).column("teacher_topk_ids").combine_chunks()
                                  .flatten().flatten().to_numpy(zero_copy_only=False))
                     for k in sorted(q.committed())])
    assert ids.numel() > 0 and int(ids.min()) >= 0 and int(ids.max()) < VOCAB
    # Random weights spread the teacher's top-k over the whole vocabulary: ids far above the
    # tiny models' 512 must appear (a truncated vocabulary would not have them).
    assert int(ids.max()) > VOCAB // 2


def test_generation_reloads_the_trainers_tied_export(real_run):
    from safetensors import safe_open

    from shared.queue import StageQueue

    from shared.rundir import RunDir

    q = StageQueue(RunDir(real_run), 2, "rollouts")
    versions = {rec["extra"]["policy_version"] for rec in q.committed().values()}
    assert versions == {1}, versions  # step 2 generated with weights/000001, reloaded in place
    assert len(sample_ids(real_run, 2, "rollouts")) == 16
    weights = real_run / "weights" / f"{STEPS:06d}"
    config = json.loads((weights / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == VOCAB
    with safe_open(str(weights / "model.safetensors"), "pt") as f:
        head, emb = f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight")
    assert head.dtype == emb.dtype == torch.bfloat16 and head.shape == (VOCAB, 256)
    assert torch.equal(head, emb)

"""Generation stage: in-place weight reload, rollout shards, the worker loop.

    .venv/bin/python -m pytest tests/test_generate.py -q

The vLLM tests run the engine in this process (CPU, uni executor), on the tiny student and on
a tied-embedding variant of it (the case where an in-place reload on CPU goes stale).
"""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from shared.models import tiny_models_dir
from shared.queue import StageQueue
from shared.recipe import load
from shared.rundir import RunDir, commit_dir, temp_dir_for
from shared.schemas import build_table
from stages.generate import Generator, generate_shard, run_worker, sample_seed
from tinymodels.random_weights import build_tiny_models

LONG_PROMPT = 150  # > the CPU KV block (128 tokens): the prefix cache holds a full block


@pytest.fixture(scope="module")
def student() -> Path:
    return Path(build_tiny_models(tiny_models_dir())["student"])


def smoke_cfg(*overrides):
    cfg, _ = load("smoke", ["policy.max_total_sequence_length=256", *overrides])
    return cfg


def greedy(cfg):
    # Temperature 0 is refused by the config validation (it also scales the loss), not by vLLM.
    cfg.policy.generation = dataclasses.replace(cfg.policy.generation, temperature=0.0)
    return cfg


def tie_embeddings(src: Path, dst: Path) -> Path:
    """A copy of `src` with tied embeddings: no lm_head.weight in the checkpoint."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(config))
    weights = load_file(dst / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def perturbed(src: Path, dst: Path, seed: int, scale: float = 0.1) -> Path:
    """A copy of `src` with seeded noise on every tensor (embeddings and lm_head included)."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    weights = {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
               for k, v in load_file(dst / "model.safetensors").items()}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def prompt_rows(n: int, seed: int = 0, long_every: int = 3):
    rng = random.Random(seed)
    return [{"sample_id": f"s{seed}-{i}",
             "prompt_ids": [rng.randrange(500) for _ in range(LONG_PROMPT if i % long_every == 0 else 12)]}
            for i in range(n)]


def prompts_table(rows, step: int = 1):
    return build_table("prompts", [{"step": step, "problem": f"p{i}", "answer": None, "dataset": "test",
                                    "index": i, **r} for i, r in enumerate(rows)])


def assert_reload_equals_fresh(cfg, base: Path, new: Path, rows, tied: bool) -> None:
    """An engine started on `base` that reloads `new` in place answers as a fresh engine on
    `new` (greedy: the same tokens, log-probs within 1e-3), and not as before the reload."""
    with Generator(cfg, base) as gen:
        before = gen.generate(rows)
        info = gen.load_weights(new, version=1)
        after = gen.generate(rows)
    assert info["tied"] is tied and info["lm_head_rel_err"] < 1e-3
    with Generator(cfg, new) as fresh:
        expected = fresh.generate(rows)

    assert before["response_ids"] != after["response_ids"], "the new weights must change the answers"
    assert after["policy_version"] == [1] * len(rows)
    assert after["response_ids"] == expected["response_ids"]
    for got, want in zip(after["gen_logprobs"], expected["gen_logprobs"]):
        assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.vllm
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_reload_in_place_equals_fresh_engine(student, tmp_path, tied):
    base = tie_embeddings(student, tmp_path / "base") if tied else student
    new = perturbed(base, tmp_path / "new", seed=1)
    cfg = greedy(smoke_cfg())
    rows = prompt_rows(6)

    assert_reload_equals_fresh(cfg, base, new, rows, tied)


# The trainer's export, in a process of its own (a process group of one rank): the real-shape
# student loaded per rank into FSDP2 shards, every tensor moved by seeded noise (as training
# would), exported in bf16 with the base model's files.
EXPORT_AFTER_TRAINING = """
import sys, torch
from pathlib import Path
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from shared.distributed import build_sharded, export_hf, setup_distributed
from stages.student import copy_model_files

base, out = Path(sys.argv[1]), Path(sys.argv[2])
d = setup_distributed(seed=0)
def shard(m):
    mesh = init_device_mesh("cpu", (1,))
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)
model = build_sharded(base, torch.float32, d, shard)
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for p in model.parameters():
        local = p.to_local()
        local.add_(0.05 * torch.randn(local.shape, generator=g))
out.mkdir()
export_hf(model, out, torch.bfloat16, d)
copy_model_files(base, out)
"""


@pytest.mark.vllm
@pytest.mark.dist
def test_reload_of_a_trainer_export_equals_fresh_engine_at_real_shapes(tmp_path):
    """Real Qwen3 shapes (vocabulary 151,936, head_dim 128, 16/8 heads, tied, bf16 on disk):
    after an in-place reload of what the trainer exports, the engine's logprobs equal a
    fresh engine's on the exported weights."""
    import subprocess
    import sys

    from tinymodels.random_weights import build_real_shape_models

    base = Path(build_real_shape_models(tiny_models_dir())["realshape-student"])
    new = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-c", EXPORT_AFTER_TRAINING, str(base), str(new)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(new / "model.safetensors")
    assert exported["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"])
    cfg = greedy(smoke_cfg("policy.model_name=tiny:realshape-student",
                           "policy.generation.max_new_tokens=24"))
    rows = [{"sample_id": f"r{i}", "prompt_ids": [random.Random(i).randrange(151_000) for _ in range(n)]}
            for i, n in enumerate((7, 40, 150))]

    assert_reload_equals_fresh(cfg, base, new, rows, tied=True)


@pytest.fixture(scope="module")
def sampler(student):
    with Generator(smoke_cfg("policy.generation.max_new_tokens=40"), student) as gen:
        yield gen


@pytest.mark.vllm
def test_generate_shard(sampler):
    rows = prompt_rows(8, seed=2)
    # Room for 30 tokens only: max_tokens is capped by max_model_len - len(prompt).
    rows[1]["prompt_ids"] = rows[1]["prompt_ids"][:1] * (256 - 30)
    table = prompts_table(rows)

    out = generate_shard(sampler, table, policy_version=0)

    assert out.num_rows == table.num_rows
    assert out.column("sample_id").to_pylist() == [r["sample_id"] for r in rows]
    assert out.column("prompt_ids").to_pylist() == [r["prompt_ids"] for r in rows]
    assert set(out.column("policy_version").to_pylist()) == {0}
    ids = out.column("response_ids").to_pylist()
    logprobs = out.column("gen_logprobs").to_pylist()
    reasons = out.column("finish_reason").to_pylist()
    assert [len(x) for x in logprobs] == [len(x) for x in ids]
    assert all(lp <= 0 for row in logprobs for lp in row)
    assert set(reasons) <= {"stop", "length"}
    caps = [min(40, 256 - len(r["prompt_ids"])) for r in rows]
    assert caps[1] == 30
    for n, cap, reason in zip(map(len, ids), caps, reasons):
        assert 1 <= n <= cap
        assert (n == cap) == (reason == "length")

    # Reproducible: the per-sample seeds make a rerun draw the same answers, also in another batch.
    assert generate_shard(sampler, table, policy_version=0).column("response_ids").to_pylist() == ids
    assert sampler.generate(rows[2:5])["response_ids"] == ids[2:5]
    assert len({tuple(x) for x in ids}) == len(ids)
    with pytest.raises(ValueError, match="version 0, not 3"):
        generate_shard(sampler, table, policy_version=3)


@pytest.mark.vllm
def test_seeded_call_over_the_token_budget(sampler):
    """More prompt tokens in one call than an engine step holds (4096 on CPU): with chunked
    prefill, CPU vLLM crashed on the seeded request split across steps. Unchunked, each
    sample still draws what its seed gives in a small call."""
    scheduler = sampler.llm.llm_engine.vllm_config.scheduler_config
    assert not scheduler.enable_chunked_prefill and scheduler.max_num_batched_tokens == 4096
    rng = random.Random(5)
    rows = [{"sample_id": f"big-{i}", "prompt_ids": [rng.randrange(500) for _ in range(65)]} for i in range(80)]
    assert sum(len(r["prompt_ids"]) for r in rows) > scheduler.max_num_batched_tokens
    big = sampler.generate(rows, batch_size=len(rows))["response_ids"]
    assert len(big) == 80 and all(big)
    assert sampler.generate(rows[-3:], batch_size=3)["response_ids"] == big[-3:]


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(42, "a") == sample_seed(42, "a")
    assert len({sample_seed(42, f"s{i}") for i in range(1000)} | {sample_seed(43, "s0")}) == 1001
    assert all(0 <= sample_seed(7, f"x{i}") < 2**31 for i in range(100))


def commit_weights(rd: RunDir, step: int, src: Path) -> None:
    final = rd.weights_dir(step)
    tmp = temp_dir_for(final)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    commit_dir(tmp, final, {"step": step})


def make_run(tmp_path: Path) -> RunDir:
    _, node = load("smoke", ["policy.max_total_sequence_length=256", "policy.generation.max_new_tokens=24",
                             "queue.poll_s=0.05"])
    OmegaConf.save(node, tmp_path / "config.yaml")
    return RunDir(tmp_path)


def declare_step(rd: RunDir, step: int, n_shards: int, rows_per_shard: int) -> None:
    for stage in ("prompts", "rollouts", "scored"):
        StageQueue(rd, step, stage).expect(n_shards)
    prompts = StageQueue(rd, step, "prompts")
    for k in range(n_shards):
        rows = [{**r, "sample_id": f"t{step}-k{k}-{i}"} for i, r in enumerate(prompt_rows(rows_per_shard, k))]
        prompts.commit(k, prompts_table(rows, step))


@pytest.mark.vllm
def test_worker_commits_each_shard_once(tmp_path, student):
    rd = make_run(tmp_path)
    declare_step(rd, 1, 3, 4)

    assert run_worker(tmp_path, step=1) == 3
    rollouts = StageQueue(rd, 1, "rollouts")
    records = rollouts.committed()
    assert sorted(records) == [0, 1, 2] and rollouts.is_complete()
    prompts = StageQueue(rd, 1, "prompts")
    for k, record in records.items():
        table = rollouts.read(k)
        assert table.column("sample_id").to_pylist() == prompts.read(k).column("sample_id").to_pylist()
        assert set(table.column("policy_version").to_pylist()) == {0}
        extra = record["extra"]
        assert extra["policy_version"] == 0 and extra["samples"] == 4 and extra["gen_s"] > 0
        assert extra["tokens"] == sum(len(x) for x in table.column("response_ids").to_pylist())
    workers = list(rd.path("workers", "generation").glob("*.json"))
    assert [json.loads(p.read_text())["status"] for p in workers] == ["exited"]

    # Step 2 generates with weights/000001 (max_staleness 0), loaded in place; step 1 is not
    # redone; step 3 waits for weights/000002.
    commit_weights(rd, 1, perturbed(student, tmp_path / "w1", seed=3))
    declare_step(rd, 2, 2, 3)
    declare_step(rd, 3, 1, 2)
    assert run_worker(tmp_path, once=True) == 2
    assert StageQueue(rd, 1, "rollouts").committed() == records
    assert StageQueue(rd, 3, "rollouts").committed() == {}
    step2 = StageQueue(rd, 2, "rollouts")
    assert step2.is_complete()
    assert {v for k in range(2) for v in step2.read(k).column("policy_version").to_pylist()} == {1}

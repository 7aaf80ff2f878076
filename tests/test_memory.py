"""The memory plan (shared/memory.py): the Qwen3 table, each item against hand arithmetic, every
shipped recipe fitting 80 GB, the refusal through launch.run (exit 2, the fix named), warn, off.
"""

import subprocess
import sys

import pytest

from launch import run as launch_run
from shared import memory
from shared.memory import GB, ModelShape, memory_plan
from shared.recipe import REPO_ROOT, load, recipe_names
from shared.config_check import validate

# Qwen3-14B by hand: q/k/v/o projections, MLP, two RMSNorms, q_norm and k_norm per layer; the
# root unit is the untied embeddings and LM head plus the final norm.
LAYER_14B = 2 * 5120 * 5120 + 2 * 5120 * 1024 + 3 * 5120 * 17408 + 2 * 5120 + 2 * 128
ROOT_14B = 2 * 151936 * 5120 + 5120
PARAMS_14B = 40 * LAYER_14B + ROOT_14B
SELF_14B = "context-self-qwen3-14b-16k"


def items(estimate):
    return {i.name: i.size for i in estimate.items}


@pytest.mark.parametrize("name", sorted(n for n in memory.QWEN3 if not n.endswith("-Base")))
def test_qwen3_table_counts_the_real_architecture(name):
    """The table's shapes built as transformers' Qwen3 (on the meta device): same counts."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    s = memory.QWEN3[name]
    config = Qwen3Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                         tie_word_embeddings=s.tied)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == s.params
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == s.layer_params
    assert ModelShape.from_config(config.to_dict()) == s


def test_qwen3_sizes():
    billions = {n: round(s.params / 1e9, 2) for n, s in memory.QWEN3.items() if "Base" not in n}
    assert billions == {"Qwen/Qwen3-0.6B": 0.6, "Qwen/Qwen3-1.7B": 1.72, "Qwen/Qwen3-4B": 4.02,
                        "Qwen/Qwen3-8B": 8.19, "Qwen/Qwen3-14B": 14.77, "Qwen/Qwen3-32B": 32.76}
    assert memory.QWEN3["Qwen/Qwen3-14B"].params == PARAMS_14B == 14_768_307_200


def test_training_items_by_hand():
    """Qwen3-14B on 4 GPUs, bfloat16, 20,480-token micro-batches, activation checkpointing."""
    cfg, _ = load(SELF_14B, ["policy.dtensor_cfg.cpu_offload=false", "cluster.memory_check=off"])
    got = items(memory_plan(cfg, validate(cfg)).roles["training"])
    t, a, f = 20480, 2, 4  # tokens, bfloat16 bytes, RMSNorm's fp32 copy
    per_layer = 5120 * (4 * a + 2 * f) + (5120 + 1024) * (4 + 3 * a) + 4 * a * 17408
    assert got == {
        "parameters": 4 * PARAMS_14B / 4,  # fp32 master weights over 4 GPUs: P bytes
        "gradients": 4 * PARAMS_14B / 4,
        "optimizer": 8 * PARAMS_14B / 4,
        "gathered weights": (ROOT_14B + 2 * LAYER_14B) * a,
        "gathered gradients": (ROOT_14B + LAYER_14B) * a + 4 * LAYER_14B,
        "activations": t * (40 * 5120 * a + per_layer + a * (5120 + 2 * 17408) + 5120 * (2 * a + f)),
        "logits": 2 * t * 151936 * a + t * 64 * 60,
        "runtime": 2 * GB,
    }
    assert got["parameters"] == 14_768_307_200  # 13.75 GB
    offloaded = items(memory_plan(*_planned(SELF_14B)).roles["training"])
    assert offloaded["parameters"] == offloaded["gradients"] == offloaded["optimizer"] == 0
    assert offloaded["activations"] == got["activations"]


def _planned(recipe, overrides=()):
    cfg, _ = load(recipe, list(overrides))
    return cfg, validate(cfg)


def test_teacher_and_generation_items_by_hand():
    cfg, plan = _planned(SELF_14B)  # teacher over 4 GPUs, vLLM over 2, both bfloat16
    mp = memory_plan(cfg, plan)
    t = 20480
    body = t * (2 * (4 * 5120 + max(3 * 17408, 4 * 5120 + 3 * 1024)) + 8 * 128)
    head = t * 5120 * 2 + 1024 * 151936 * (4 + 2) + t * 64 * 12
    assert items(mp.roles["teacher"]) == {
        "weights": PARAMS_14B * 2 / 4, "gathered weights": (ROOT_14B + 2 * LAYER_14B) * 2,
        "forward peak": max(body, head), "runtime": 2 * GB}
    gen = items(mp.roles["generation"])
    assert gen["weights"] == PARAMS_14B * 2 / 2
    assert sum(gen.values()) == pytest.approx(0.8 * 80 * GB)
    per_token = 2 * 40 * (8 // 2) * 128 * 2  # K and V, layers, KV heads per GPU, head_dim, bf16
    assert f"{per_token // 1024} KiB/token: {int(gen['KV cache'] // per_token)} tokens" in \
        mp.roles["generation"].items[-1].note


def test_micro_batch_tokens():
    def tokens(overrides):
        cfg, _ = load("qwen3-32b-4b", overrides)
        return memory.train_micro_batch_tokens(cfg)

    assert tokens([]) == 20480  # dynamic batching: max_total_sequence_length x 1 sequence
    assert tokens(["policy.dynamic_batching.train_mb_tokens=40000"]) == 40000
    assert tokens(["policy.dynamic_batching.train_mb_tokens=4096"]) == 20480  # goes alone
    assert tokens(["policy.dynamic_batching.enabled=false", "policy.train_micro_batch_size=2",
                   "policy.make_sequence_length_divisible_by=1000"]) == 2 * 21000
    cfg, _ = load("qwen3-32b-4b", ["teacher.logprob_batch_size=2",
                                   "teacher.dynamic_batching.enabled=false"])
    assert memory.teacher_batch_tokens(cfg) == 40960


def test_constants_match_the_stages():
    from stages import score, train

    assert memory.TRAIN_LOSS_CHUNK == train.DEFAULT_LOSS_CHUNK
    assert memory.TEACHER_CHUNK == score.DEFAULT_CHUNK


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_dry_run_prints_the_plan_and_fits(recipe, capsys):
    assert launch_run.main([f"conf={recipe}", "launch.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "# memory plan: estimated peak GB per GPU" in out and "# per GPU" in out
    assert "DOES NOT FIT" not in out
    cfg, plan = _planned(recipe)
    mp = memory_plan(cfg, plan)
    assert mp.problems() == []
    for estimate in mp.roles.values():
        if estimate.known:
            assert estimate.total <= 80 * GB, (recipe, estimate.role)
            assert f"{estimate.role}: {estimate.model}, " in out


def _launch(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "launch.run", *args,
                           f"launch.run_dir={tmp_path / 'run'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_refused_with_the_fix(tmp_path):
    out = _launch([f"conf={SELF_14B}", "policy.dtensor_cfg.cpu_offload=false", "launch.dry_run=true"],
                  tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    err = out.stderr
    assert "config error: cluster.gpu_memory_gb=80.0: training (Qwen/Qwen3-14B) needs an estimated " \
           "93.1 GB per GPU (parameters 13.8, gradients 13.8, optimizer 27.5" in err
    for fix in ("policy.dtensor_cfg.cpu_offload=true",
                "distillation.resource_isolation.roles.training.num_nodes or gpus_per_node, now 1 x 4",
                "lower policy.max_total_sequence_length (now 20480",
                "cluster.memory_check=warn"):
        assert fix in err, fix


def test_refused_on_a_real_launch_before_anything_is_written(tmp_path):
    out = _launch(["conf=qwen3-14b-4b", "cluster.gpu_memory_gb=24"], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "training (Qwen/Qwen3-4B) needs an estimated 54.0 GB per GPU" in out.stderr
    assert "over cluster.gpu_memory_gb=24" in out.stderr
    # vLLM's 0.6 x 24 GB leaves less KV cache than one 20,480-token sequence.
    assert "less than one max_model_len=20480 sequence" in out.stderr
    assert "policy.generation.vllm_cfg.gpu_memory_utilization (now 0.6)" in out.stderr
    assert not (tmp_path / "run").exists()


def test_warn_proceeds_and_off_skips(tmp_path):
    args = [f"conf={SELF_14B}", "policy.dtensor_cfg.cpu_offload=false", "launch.dry_run=true"]
    warned = _launch(args + ["cluster.memory_check=warn"], tmp_path)
    assert warned.returncode == 0, warned.stderr
    assert "warning: the memory plan does not fit (cluster.memory_check=warn): training" in warned.stderr
    assert "node 0 GPUs 0-3: training 93.1 of 80 GB, DOES NOT FIT" in warned.stdout
    off = _launch(args + ["cluster.memory_check=off"], tmp_path)
    assert off.returncode == 0 and "warning" not in off.stderr


@pytest.mark.parametrize("override,message", [
    ("cluster.gpu_memory_gb=0", "cluster.gpu_memory_gb=0.0: must be a positive number of GB"),
    ("cluster.gpu_memory_gb=-8", "cluster.gpu_memory_gb=-8.0: must be a positive number of GB"),
    ("cluster.memory_check=maybe", "use one of: refuse, warn, off"),
])
def test_memory_keys_are_validated(override, message, tmp_path):
    out = _launch(["conf=smoke", override, "launch.dry_run=true"], tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_unknown_model_is_not_checked(capsys):
    assert launch_run.main(["conf=smoke", "policy.model_name=acme/not-cached-model",
                            "launch.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "training: acme/not-cached-model: unknown size (not in the built-in Qwen3 table, no " \
           "config.json on local disk): not checked" in out


def test_roles_sharing_a_gpu_add_up():
    cfg, plan = _planned("qwen3-32b-1.7b", ["cluster.gpu_memory_gb=60"])
    alone = memory_plan(cfg, plan)
    assert alone.problems() == []
    plan.roles["teacher"].gpu_ids = [[1, 2]]  # GPU 2 is the trainer's too
    shared = memory_plan(cfg, plan)
    both = next(g for g in shared.groups if g.roles == ("training", "teacher"))
    assert both.gpus == [(0, [2])]
    assert shared.group_total(both) == alone.roles["training"].total + alone.roles["teacher"].total
    (problem, fix), = shared.problems()
    assert problem.startswith("training + teacher share node 0 GPU 2: an estimated")
    assert "distillation.resource_isolation.roles" in fix


def test_local_config_json_is_read(tiny_models):
    shape = memory.model_shape("tiny:teacher")
    assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (256, 4, 4, 2, 64)


def test_estimate_covers_a_measured_cpu_step(tiny_models):
    """bench.bench_memory on the tiny student: torch's CPU allocations of a training
    micro-batch's forward and backward stay within the estimate (+10%)."""
    from bench.bench_memory import measure_train

    entry = measure_train("tiny:student", 1024, False, False)
    assert 0.5 <= entry["ratio"] <= 1.1, entry

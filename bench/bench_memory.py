"""The memory plan's activation and logit figures against what torch allocates, on CPU.

    python -m bench.bench_memory             # prints a table (~5 min on a 2-core box, < 4 GiB)
    python -m bench.bench_memory --quick     # the smaller token counts only

A CPU shows no CUDA memory, so this measures the peak of torch's CPU allocations (the profiler's
allocation events carry the allocator's running total; only what is allocated inside the
profiled call counts) for:

  train   one forward and backward of a training micro-batch as stages/train.py runs it
          (`ResponseGather`, `.logits.squeeze(0)`, `shared.loss.distillation_loss`), float32, without
          FSDP, gradients already allocated by a warm-up step: activations + logits
  score   one teacher forward through `stages.score.score_rows` (chunked LM head, top-k)

and compares each with shared/memory.py's estimate for the same model and token count
(`training_activation_bytes` + `training_logits_bytes`; the teacher's forward peak). Every
sequence has 32 prompt tokens; the estimate counts all T tokens as response tokens.
Models: the built-in tiny student and teacher (vocabulary 512) and the real-shape ones
(vocabulary 151,936, head_dim 128, 16 query / 8 KV heads, hidden 256).

Entries (`out["entries"]`): measured MiB, baseline = estimated MiB, ratio = measured /
estimate; target <= 1.1 (an estimate that undershoots would let a run through that then runs
out of memory).
"""

from __future__ import annotations

import argparse
import dataclasses

PROMPT = 32
TOPK = 64
MiB = 2**20

# (model, tokens, activation checkpointing, loss_fn.zero_outside_topk)
TRAIN_CASES = [
    ("tiny:student", 4096, False, False),
    ("tiny:student", 4096, True, False),
    ("tiny:realshape-student", 1024, False, False),
    ("tiny:realshape-student", 2048, False, False),
    ("tiny:realshape-student", 2048, True, False),
    ("tiny:realshape-student", 2048, False, True),
]
SCORE_CASES = [("tiny:teacher", 4096), ("tiny:realshape-teacher", 1024), ("tiny:realshape-teacher", 4096)]


def peak_allocated(fn) -> int:
    """Peak bytes torch allocates on the CPU while `fn()` runs, above what it held before."""
    import torch
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    totals = [n.extra_fields.total_allocated for n in events if n.tag == _EventType.Allocation]
    return max(totals, default=0)


def measure_train(name: str, tokens: int, checkpointing: bool, zero_outside_topk: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from shared import memory
    from shared.loss import distillation_loss
    from tinymodels.build import ensure_model
    from stages.student import ResponseGather
    from stages.train import DEFAULT_LOSS_CHUNK

    model = AutoModelForCausalLM.from_pretrained(ensure_model(name), dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    gather = ResponseGather(model)
    vocab, n = model.config.vocab_size, tokens - PROMPT
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    rows, cols = torch.zeros(n, dtype=torch.int64), torch.arange(PROMPT - 1, tokens - 1)
    topk_ids = torch.randint(0, vocab, (n, TOPK), generator=g)
    topk_logprobs = torch.log_softmax(torch.randn(n, TOPK, generator=g), -1)

    def step():
        gather.set(rows, cols)
        logits = model(input_ids=ids, use_cache=False).logits.squeeze(0)
        loss, _ = distillation_loss(logits, topk_ids, topk_logprobs, torch.ones(n, dtype=torch.bool), n,
                                    kl_type="mixed", zero_outside_topk=zero_outside_topk,
                                    chunk_size=DEFAULT_LOSS_CHUNK)
        loss.backward()

    step()  # allocates the gradients, as after the trainer's first micro-batch
    measured = peak_allocated(step)
    shape = memory.model_shape(name)
    estimate = (memory.training_activation_bytes(shape, tokens, 4, checkpointing)
                + memory.training_logits_bytes(shape, tokens, 4, TOPK, zero_outside_topk,
                                               DEFAULT_LOSS_CHUNK))
    what = ", ".join(["checkpointing" if checkpointing else "no checkpointing"]
                     + (["zero_outside_topk"] if zero_outside_topk else []))
    return _entry(f"train {name}, {tokens} tokens, {what}: activations + logits", measured, estimate)


def measure_score(name: str, tokens: int) -> dict:
    import torch

    from shared import memory
    from shared.recipe import load
    from stages import score

    cfg, _ = load("smoke", [f"teacher.model_name={name}", f"distillation.topk_logits_k={TOPK}"])
    teacher = dataclasses.replace(score.load_teacher(cfg, torch.device("cpu")), mb_tokens=tokens,
                                  max_seq_len=tokens + 1)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, teacher.lm.config.vocab_size, (tokens + 1,), generator=g).tolist()

    def run():
        score.score_rows(teacher, [seq[:PROMPT]], [seq[PROMPT:]])

    run()
    measured = peak_allocated(run)
    shape = memory.model_shape(name)
    estimate = max(memory.inference_activation_bytes(shape, tokens, 4),
                   memory.teacher_head_bytes(shape, tokens, 4, TOPK, teacher.chunk_size))
    return _entry(f"score {name}, {tokens} tokens: forward peak", measured, estimate)


def _entry(name: str, measured: int, estimate: int) -> dict:
    return {"name": name, "value": round(measured / MiB, 1), "unit": "MiB",
            "baseline": round(estimate / MiB, 1), "ratio": round(measured / estimate, 3),
            "target": "<= 1.1", "better": "lower"}


def run(out: dict, quick: bool = False) -> dict:
    """Measure every case; append the entries to `out["entries"]` and return `out`."""
    train = [c for c in TRAIN_CASES if not quick or c[1] <= 1024 or c[0] == "tiny:student"]
    scores = [c for c in SCORE_CASES if not quick or c[1] <= 1024]
    out.setdefault("entries", [])
    out["entries"] += [measure_train(*c) for c in train] + [measure_score(*c) for c in scores]
    out.setdefault("notes", []).append(
        "Measured: peak of torch's CPU allocations during the call (profiler allocation events), "
        "float32, no FSDP; baseline: shared/memory.py's activations + logits (training) or forward "
        "peak (teacher) for the same model and tokens.")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller token counts only")
    args = parser.parse_args(argv)
    out = run({}, quick=args.quick)
    width = max(len(e["name"]) for e in out["entries"]) + 2
    print(f"{'case':<{width}}{'measured MiB':>14}{'estimate MiB':>14}{'ratio':>8}")
    for e in out["entries"]:
        print(f"{e['name']:<{width}}{e['value']:>14.1f}{e['baseline']:>14.1f}{e['ratio']:>8.3f}")


if __name__ == "__main__":
    main()

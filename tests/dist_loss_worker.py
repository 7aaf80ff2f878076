"""Distributed half of tests/test_loss.py: one optimizer batch split over gloo ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_loss_worker.py OUT.pt

Every rank builds the same tiny problem (a linear "model" from features to logits, teacher
top-k, token and sample masks), takes its share of the samples, runs them as micro-batches of
one sample (loss = distillation_loss(...) with the GLOBAL valid-token count), accumulates
gradients, then all-reduces loss and gradients with SUM. Rank 0 saves, per loss setting, the
summed loss and gradients to OUT.pt; the test compares them with one rank doing the whole
batch at once.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shared.distributed import exit_now  # noqa: E402
from shared.loss import distillation_loss  # noqa: E402

BATCH, SEQ, HIDDEN, VOCAB, TOPK = 4, 6, 8, 40, 5
SETTINGS = [(kl, zero) for kl, zero in itertools.product(("forward", "reverse", "mixed"),
                                                          (False, True))]
MIXED_W, TEMPERATURE = 0.3, 0.7


def make_problem(seed: int = 0) -> dict:
    """The same optimizer batch on every rank: features, teacher top-k, masks, model init."""
    g = torch.Generator().manual_seed(seed)
    teacher_logits = 3 * torch.randn(BATCH, SEQ, VOCAB, generator=g)
    vals, ids = torch.log_softmax(teacher_logits / TEMPERATURE, -1).topk(TOPK, dim=-1)
    token_mask = (torch.rand(BATCH, SEQ, generator=g) > 0.25).float()
    token_mask[:, 0] = 1.0
    sample_mask = torch.tensor([1.0, 0.0, 1.0, 1.0])  # sample 1 is dropped
    return {
        "features": torch.randn(BATCH, SEQ, HIDDEN, generator=g),
        "weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "bias": torch.randn(VOCAB, generator=g),
        "ids": ids, "vals": vals,
        "valid": token_mask * sample_mask[:, None],
    }


def accumulate(problem: dict, samples: list[list[int]], kl_type: str, zero_outside_topk: bool):
    """Run micro-batches (lists of sample indices) through a fresh linear model; return the
    summed loss and the accumulated gradients (weight, bias)."""
    model = torch.nn.Linear(HIDDEN, VOCAB)
    with torch.no_grad():
        model.weight.copy_(problem["weight"])
        model.bias.copy_(problem["bias"])
    n_global = problem["valid"].sum()  # whole optimizer batch, every rank and micro-batch
    total = torch.zeros(())
    for mb in samples:
        logits = model(problem["features"][mb])  # [b, S, V]
        loss, _ = distillation_loss(
            logits, problem["ids"][mb], problem["vals"][mb], problem["valid"][mb], n_global,
            kl_type=kl_type, mixed_kl_weight=MIXED_W, zero_outside_topk=zero_outside_topk,
            temperature=TEMPERATURE, chunk_size=4)
        loss.backward()
        total += loss.detach()
    return total, model.weight.grad.clone(), model.bias.grad.clone()


def main(out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = make_problem()
    mine = [[i] for i in range(BATCH) if i % world == rank]  # one sample per micro-batch
    results = {}
    for kl_type, zero in SETTINGS:
        loss, gw, gb = accumulate(problem, mine, kl_type, zero)
        for t in (loss, gw, gb):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        results[f"{kl_type}-{zero}"] = {"loss": loss, "weight": gw, "bias": gb}
    if rank == 0:
        torch.save({"world": world, "results": results}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: torchrun --nproc_per_node 2 {sys.argv[0]} OUT.pt")
    main(sys.argv[1])
    exit_now(0)  # as the stages' mains: no interpreter teardown after the process group

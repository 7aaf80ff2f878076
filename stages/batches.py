"""One optimizer batch of scored rows, as the trainer runs it (stages.train): rows become
Samples, a rank's share of them is planned into micro-batches, each micro-batch is padded into
one tensor batch.

    samples = samples_from_table(q.read(3))                       # one scored shard
    groups = plan_micro_batches([len(s.input_ids) for s in samples], 4, token_budget=8192)
    mb = collate([samples[i] for i in groups[0]], pad_id)         # [b, L] + response positions
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from shared.schemas import ragged_from_arrow, topk_from_arrow


@dataclass
class Sample:
    """One scored row, ready to train on."""

    sample_id: str
    input_ids: torch.Tensor  # [P + R] int64: prompt then response
    prompt_len: int  # P
    topk_ids: torch.Tensor  # [R, k] int64 (empty for an unscored dropped row)
    topk_logprobs: torch.Tensor  # [R, k] float32
    used: bool  # sample_mask == 1

    @property
    def response_len(self) -> int:
        return self.input_ids.shape[0] - self.prompt_len


def samples_from_table(table) -> list[Sample]:
    """The rows of a scored table as Samples (a loop over rows, none over tokens)."""
    prompt, prompt_off = ragged_from_arrow(table.column("prompt_ids"), torch.int64)
    resp, resp_off = ragged_from_arrow(table.column("response_ids"), torch.int64)
    topk = topk_from_arrow(table)
    mask = table.column("sample_mask").to_pylist()
    ids = table.column("sample_id").to_pylist()
    out = []
    for r in range(table.num_rows):
        p = prompt[prompt_off[r]:prompt_off[r + 1]]
        a, b = int(topk.offsets[r]), int(topk.offsets[r + 1])
        used = mask[r] == 1
        if used and len(p) == 0:
            raise ValueError(f"sample {ids[r]!r}: empty prompt_ids; no position predicts its "
                             "first response token")
        out.append(Sample(ids[r], torch.cat([p, resp[resp_off[r]:resp_off[r + 1]]]), len(p),
                          topk.ids[a:b], topk.logprobs[a:b], used))
    return out


def plan_micro_batches(lengths: list[int], micro_batch_size: int, token_budget: Optional[int] = None,
                       round_to: int = 1) -> list[list[int]]:
    """Micro-batches as lists of indices into `lengths` (sequence lengths).

    Without a token budget: consecutive groups of `micro_batch_size`. With one: longest first,
    each micro-batch grows while (sequences x padded longest length) fits the budget; a
    sequence longer than the budget goes alone."""
    if token_budget is None:
        return [list(range(i, min(i + micro_batch_size, len(lengths))))
                for i in range(0, len(lengths), micro_batch_size)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            longest = _round_up(lengths[batches[-1][0]], round_to)
            if (len(batches[-1]) + 1) * longest <= token_budget:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, L] right-padded
    rows: torch.Tensor  # [N] row of each response token
    cols: torch.Tensor  # [N] position that predicts it
    topk_ids: torch.Tensor  # [N, k]
    topk_logprobs: torch.Tensor  # [N, k]
    tokens: int  # real (unpadded) tokens

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(*(t.to(device, non_blocking=True) for t in
                            (self.input_ids, self.rows, self.cols, self.topk_ids, self.topk_logprobs)),
                          self.tokens)


def collate(samples: list[Sample], pad_id: int, multiple: int = 1) -> MicroBatch:
    """Right-pad into one [b, L] batch. No attention mask: attention is causal, so a real token
    never sees the padding after it, and positions count from 0 in every row."""
    length = _round_up(max(len(s.input_ids) for s in samples), multiple)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.int64)
    rows, cols = [], []
    for i, s in enumerate(samples):
        input_ids[i, :len(s.input_ids)] = s.input_ids
        rows.append(torch.full((s.response_len,), i, dtype=torch.int64))
        cols.append(torch.arange(s.prompt_len - 1, s.prompt_len - 1 + s.response_len))
    return MicroBatch(input_ids, torch.cat(rows), torch.cat(cols),
                      torch.cat([s.topk_ids for s in samples]),
                      torch.cat([s.topk_logprobs for s in samples]),
                      sum(len(s.input_ids) for s in samples))

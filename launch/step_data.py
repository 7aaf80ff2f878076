"""The run's training prompts and each step's prompts shards (the coordinator writes them).

    data = StepData(rd, cfg, plan, events.event)
    data.prepare()            # data/train.arrow, once per run (later starts reuse it)
    data.total_steps()        # distillation.max_num_steps, or the epochs' worth of steps
    data.write_prompts(7)     # steps/000007/prompts/*.arrow and EXPECTED of every stage

Files it writes:

    data/train.arrow            the tokenized training prompts (fixed at the first start):
                                rows of the dataset that fit data.max_input_seq_length
    data/heldout.json           the rows held out for validation (data.train.split_validation_size)
    data/summary.json           {"train_rows", "skipped": {reason: n}, "held_out_for_validation"}
    steps/<t>/prompts/...       one row per sample (num_generations_per_prompt rows per
                                prompt), sample_id "<step>-<prompt>-<generation>", and
                                EXPECTED.json for the step's prompts, rollouts and scored stages

CPU only: the tokenizer is shared.chat's (no transformers, so no torch).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import pyarrow as pa

from launch.events import RunFailed
from shared import schemas
from shared.chat import ChatTokenizer
from shared.config import SluiceConfig
from shared.data import (PromptBuilder, StepLoader, load_prompt_rows, load_rows, save_prompt_rows,
                         split_validation)
from shared.files import atomic_write_json
from shared.models import find_model
from shared.partition import Plan
from shared.pipeline import WORKER_STAGES
from shared.queue import StageQueue
from shared.rundir import DATA_SUMMARY, HELDOUT, TRAIN_DATA, RunDir


class StepData:
    """Where each step's prompts come from."""

    def __init__(self, rd: RunDir, cfg: SluiceConfig, plan: Plan, event: Callable[..., None]):
        self.rd, self.cfg, self.plan, self.event = rd, cfg, plan, event
        self._table: Optional[pa.Table] = None

    def prepare(self) -> None:
        """Tokenize the training prompts once; later starts reuse data/train.arrow."""
        path = self.rd.data_file(TRAIN_DATA)
        if path.exists():
            return
        cfg = self.cfg
        tok_name = cfg.policy.tokenizer.name or cfg.policy.model_name
        tokenizer = ChatTokenizer.from_dir(find_model(tok_name))
        rows, skipped = load_rows(cfg.data.train, cfg, "train")
        rows, held_out = split_validation(rows, cfg.data.train)
        builder = PromptBuilder(cfg, tokenizer, cfg.data.train)
        kept, too_long = [], 0
        limit = min(cfg.data.max_input_seq_length, cfg.policy.max_total_sequence_length - 1)
        for r in rows:
            ids = builder.prompt_ids(r["problem"])
            if len(ids) > limit:
                too_long += 1
                continue
            kept.append({**r, "prompt_ids": ids})
        skipped["prompt_too_long"] = too_long
        if len(kept) < cfg.distillation.num_prompts_per_step:
            raise RunFailed(
                f"only {len(kept)} usable training prompts (skipped: {skipped}) but "
                f"distillation.num_prompts_per_step={cfg.distillation.num_prompts_per_step}; "
                "use a larger dataset or fewer prompts per step")
        save_prompt_rows(path, kept)
        if held_out:
            atomic_write_json(self.rd.data_file(HELDOUT), held_out)
        atomic_write_json(self.rd.data_file(DATA_SUMMARY),
                          {"train_rows": len(kept), "skipped": skipped,
                           "held_out_for_validation": len(held_out)})
        self.event("data_prepared", rows=len(kept), skipped=skipped)

    def table(self) -> pa.Table:
        """data/train.arrow (memory-mapped, read once)."""
        if self._table is None:
            self._table = load_prompt_rows(self.rd.data_file(TRAIN_DATA))
        return self._table

    def loader(self) -> StepLoader:
        d = self.cfg.distillation
        return StepLoader(self.table().num_rows, d.num_prompts_per_step, d.seed, self.cfg.data.shuffle)

    def total_steps(self) -> int:
        d = self.cfg.distillation
        return self.loader().total_steps(d.max_num_steps, d.max_num_epochs)

    def num_shards(self) -> int:
        d, q = self.cfg.distillation, self.cfg.queue
        if q.prompts_per_shard > 0:
            n = -(-d.num_prompts_per_step // q.prompts_per_shard)
        else:
            # Two shards per worker so the teacher can start while generation finishes a step.
            n = 2 * max(self.plan.roles["generation"].num_tasks, self.plan.roles["teacher"].num_tasks)
        return max(1, min(n, d.num_prompts_per_step))

    def write_prompts(self, step: int) -> None:
        """The prompts shards of `step` not yet committed (none once they all are: every poll
        calls this for every step ahead, and then lists nothing)."""
        q = StageQueue(self.rd, step, "prompts", lease_s=self.cfg.queue.lease_s)
        n = self.num_shards()
        if q.expected() is None:
            q.expect(n)
        n = q.expected()
        for stage in WORKER_STAGES:
            sq = StageQueue(self.rd, step, stage)
            if sq.expected() is None:
                sq.expect(n)
        pending = q.pending(fast=True)  # every poll, for every step ahead: never a listing
        if not pending:
            return
        d = self.cfg.distillation
        positions = self.loader().rows_for_step(step)
        picked = self.table().take(pa.array(positions)).to_pylist()
        shards: List[List[dict]] = [[] for _ in range(n)]
        for i, r in enumerate(picked):
            for g in range(d.num_generations_per_prompt):
                shards[i * n // len(picked)].append({
                    "sample_id": f"{step:06d}-{i:05d}-{g:02d}", "step": step,
                    "problem": r["problem"], "answer": r["answer"],
                    "prompt_ids": r["prompt_ids"], "dataset": r["dataset"], "index": r["index"],
                    "static_trace": r["trace"],
                })
        for k in pending:
            q.commit(k, schemas.build_table("prompts", shards[k]))
        self.event("prompts_written", step=step, shards=n,
                   samples=len(picked) * d.num_generations_per_prompt)

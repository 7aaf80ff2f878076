"""Training stage: the student learns the teacher's top-k on its own samples (torchrun + FSDP2).

    torchrun --standalone --nproc_per_node 2 -m stages.train RUN_DIR            # worker loop
    torchrun --standalone --nproc_per_node 2 -m stages.train RUN_DIR --step 3   # exactly step 3
    python -m stages.train RUN_DIR --step 1                                     # one process
    srun torchrun --nnodes 2 --node_rank $SLURM_NODEID --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:PORT -m stages.train RUN_DIR                       # two nodes

The worker loop resumes from the newest committed checkpoint (step s, or the base model: s = 0),
trains steps s+1, s+2, ... until `distillation.max_num_steps`, RUN_DIR/coordinator/STOP, or
SIGTERM, and exits. `--step N` trains exactly step N from the newest checkpoint before N.

One distillation step t:
  1. Rank 0 polls the scored queue of step t (`queue.poll_s`) and, as shards are committed in
     index order, broadcasts which to read; every rank reads them itself from the shared
     filesystem (checksum-verified). Rows keep shard-index-then-row order.
  2. As soon as `policy.train_global_batch_size` rows are buffered (or the step's last shard is
     in), they form one optimizer batch: training starts before the teacher has finished.
     Rank r takes rows r, r+W, r+2W, ... of the batch (W ranks; strided, so a step sorted by
     length still spreads evenly), drops rows with sample_mask 0, and runs them as
     micro-batches of `policy.train_micro_batch_size` sequences, or packed to a token budget
     when `policy.dynamic_batching.enabled`. Ranks with fewer micro-batches run empty ones
     (zero loss): FSDP's collectives need the same count everywhere.
  3. Loss (shared/loss.py) per response token i at student position len(prompt_ids) - 1 + i,
     divided by the valid tokens of the whole optimizer batch over all ranks (every rank holds
     the whole batch, so each counts them itself, as it plans every rank's micro-batches), so
     the summed gradient is the global token mean. Then clip to `policy.max_grad_norm`, AdamW
     step, one LR scheduler step. Metrics are reduced once per step.
  4. After the step: rank 0 publishes weights/<t:06d>/ and steps/<t:06d>/train.json; every
     `checkpointing.save_period` steps and at max_num_steps all ranks write
     checkpoints/<t:06d>/. STOP or SIGTERM while waiting between steps also checkpoints the
     last completed step; one arriving after some of a step's optimizer steps drops them (the
     step is redone from the last checkpoint).

Files this module writes in RUN_DIR (each published atomically):

    weights/<t:06d>/           HF checkpoint of the student after step t, for generation:
                               model.safetensors (or model-0000i-of-0000n.safetensors and
                               model.safetensors.index.json above 5 GiB) in the base model's
                               dtype, every parameter under its HF name (tied models get an
                               explicit lm_head.weight: vLLM's CPU in-place reload needs it),
                               plus config.json, tokenizer and generation config copied from the
                               base model, and COMMITTED.json {"step", "model_name", ...}
    steps/<t:06d>/train.json   {"step", "loss" (token-weighted mean over the step; likewise
                               "forward_kl", "reverse_kl", "student_topk_mass"), "losses" and
                               "grad_norms" and "lrs" (per optimizer batch), "grad_norm" (mean),
                               "lr" (of the step's last optimizer step), "tokens" (prompt +
                               response tokens trained on), "samples", "valid_tokens",
                               "optimizer_steps", "world_size", "timing": {"wait_s" (for
                               shards to land), "read_s" (reading and verifying them),
                               "train_s", "save_s"}, "tokens_per_s_per_gpu" (tokens / train_s /
                               world_size)}; rank 0's worker status is "training" from the
                               first read of a shard until it waits again
    checkpoints/<t:06d>/       torch.distributed.checkpoint of {"train": {"model", "optim",
                               "scheduler", "step", "optimizer_steps", "rng"}} (sharded: loads
                               on any number of ranks), plus COMMITTED.json.
                               `checkpointing.keep_top_k` of them are kept (the newest, and
                               the best by checkpointing.metric_name: shared.retention); null
                               keeps all.
    workers/training/...json   rank 0's worker record (shared/worker.py)

Beside it: stages/student.py builds the sharded student, its optimizer and scheduler;
stages/batches.py turns scored rows into micro-batches; shared/retention.py says which
checkpoints stay.

Precision: master weights and optimizer state are float32; on GPU with policy.precision
bfloat16 (float16) FSDP computes in that dtype and reduces gradients in float32. On CPU
everything is float32.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from transformers.utils import logging as hf_logging

from shared import jobenv
from shared.config import SluiceConfig
from shared.distributed import Dist, broadcast_object, exit_now, export_hf, setup_distributed
from shared.files import atomic_write_json
from shared.loss import distillation_loss
from shared.queue import CorruptShardError, NotCommittedError, StageQueue
from shared.retention import committed_checkpoints, prune_checkpoints
from shared.rundir import RunDir, commit_dir, temp_dir_for
from shared.waiting import Pacer
from shared.worker import Worker, fault_point, load_run_config
from stages.batches import Sample, collate, plan_micro_batches, samples_from_table
from stages.student import (ResponseGather, build_optimizer, build_scheduler, copy_model_files,
                            load_student, stored_dtype)

log = logging.getLogger("sluice.train")

ROLE = "training"
# Rank 0 broadcasts at least this often while it waits for shards: the other ranks sit in that
# broadcast, and a collective that never returns would hit the process-group timeout.
MAX_SILENCE_S = 30.0
# Slurm sends the pre-timeout signal up to this much before the time it was asked for (its
# periodic check): the trainer plans as if it came this early.
SIGNAL_SLACK_S = 60.0
DEFAULT_LOSS_CHUNK = 256
# Per-optimizer-batch sums reduced over ranks (the first five come from distillation_loss).
METRICS = ("loss_sum", "forward_kl_sum", "reverse_kl_sum", "student_topk_mass_sum", "valid_tokens",
           "tokens")


# ------------------------------------------------------------------------------ trainer


class StepStopped(Exception):
    """STOP or SIGTERM arrived during a step; `dirty` if some of its optimizer steps ran."""

    def __init__(self, dirty: bool):
        super().__init__("stopped during the step" + (" after optimizer steps" if dirty else ""))
        self.dirty = dirty


_SIGTERM = {"received": False}


def _on_sigterm(signum, frame):  # Slurm's pre-timeout path (launch/executors/base.py) and scancel
    _SIGTERM["received"] = True


class _TrainState(Stateful):
    """What a checkpoint holds; DCP calls state_dict() to save and to get load targets."""

    def __init__(self, trainer: "Trainer"):
        self.t = trainer

    def state_dict(self):
        model_state, optim_state = get_state_dict(self.t.model, self.t.optimizer)
        return {"model": model_state, "optim": optim_state,
                "scheduler": self.t.scheduler.state_dict() if self.t.scheduler else {},
                "step": self.t.step, "optimizer_steps": self.t.optimizer_steps,
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state):
        set_state_dict(self.t.model, self.t.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if self.t.scheduler is not None:
            self.t.scheduler.load_state_dict(state["scheduler"])
        self.t.step, self.t.optimizer_steps = int(state["step"]), int(state["optimizer_steps"])
        torch.set_rng_state(state["rng"])


class Trainer:
    """The sharded student, its optimizer and scheduler, and what one step does with them."""

    def __init__(self, cfg: SluiceConfig, rd: RunDir, d: Dist, worker: Optional[Worker] = None):
        self.cfg, self.rd, self.d, self.worker = cfg, rd, d, worker
        self.pacer = Pacer(cfg.queue.poll_s, cfg.queue.fast_poll_s)  # rank 0 waits for shards
        self.await_read_s = 0.0
        self.model, self.base_dir = load_student(cfg, d)
        self.gather = ResponseGather(self.model)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(self.optimizer, cfg.policy.scheduler)
        self.step = 0  # last completed step (0: the base model)
        self.optimizer_steps = 0
        self.checkpointed_step = 0
        self.step_s = 0.0  # wall-clock of a recent step (the longest of the last and a decay)
        self.save_s = 0.0  # wall-clock of the last checkpoint save
        self.stop_at: Optional[float] = None  # when the job's pre-timeout signal may come
        config = self.model.config
        self.pad_id = next((i for i in (config.pad_token_id, config.eos_token_id) if isinstance(i, int)), 0)
        self.export_dtype = stored_dtype(self.base_dir)
        gen = cfg.policy.generation
        self.temperature = gen.temperature if gen is not None else 1.0
        p = cfg.policy
        if p.dynamic_batching.enabled:
            self.token_budget = (p.dynamic_batching.train_mb_tokens
                                 or p.max_total_sequence_length * p.train_micro_batch_size)
            self.pad_multiple = p.dynamic_batching.sequence_length_round
        else:
            self.token_budget, self.pad_multiple = None, p.make_sequence_length_divisible_by
        self.state = _TrainState(self)

    # -- one optimizer batch
    def train_optimizer_batch(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Forward/backward over this rank's share of `samples` (the whole optimizer batch, the
        same list on every rank), then clip, optimizer and scheduler step.

        Every rank holds the whole batch, so each computes the global valid-token count and
        every rank's micro-batch plan itself: no collective beyond FSDP's own. Returns this
        rank's metric sums (`METRICS`, on the device, not yet reduced: train_step reduces once
        per step), the total gradient norm (a device scalar) and the LR used."""
        d, p = self.d, self.cfg.policy
        for s in samples:
            if len(s.input_ids) > p.max_total_sequence_length:
                raise ValueError(f"sample {s.sample_id!r}: {len(s.input_ids)} tokens exceed "
                                 f"policy.max_total_sequence_length={p.max_total_sequence_length}")
        shares = [[s for s in samples[r::d.world] if s.used and s.response_len > 0]
                  for r in range(d.world)]
        plans = [plan_micro_batches([len(s.input_ids) for s in share], p.train_micro_batch_size,
                                    self.token_budget, self.pad_multiple) for share in shares]
        n_valid = sum(s.response_len for share in shares for s in share)
        mine, groups = shares[d.rank], plans[d.rank]

        self.model.train()
        sums = torch.zeros(len(METRICS), dtype=torch.float64, device=d.device)
        for i in range(max(len(plan) for plan in plans)):
            if i < len(groups):
                mb = collate([mine[j] for j in groups[i]], self.pad_id, self.pad_multiple).to(d.device)
                self.gather.set(mb.rows, mb.cols)
                # squeeze, not [0]: the backward of an index allocates a zero-filled copy of
                # the whole [1, T, V] logits (GBs at 20k tokens x 151,936), a squeeze's is a view.
                logits = self.model(input_ids=mb.input_ids, use_cache=False).logits.squeeze(0)
                loss, m = distillation_loss(
                    logits, mb.topk_ids, mb.topk_logprobs,
                    torch.ones(mb.rows.shape[0], dtype=torch.bool, device=d.device), n_valid,
                    kl_type=self.cfg.loss_fn.kl_type, mixed_kl_weight=self.cfg.loss_fn.mixed_kl_weight,
                    zero_outside_topk=self.cfg.loss_fn.zero_outside_topk, jsd_beta=self.cfg.loss_fn.jsd_beta,
                    temperature=self.temperature, chunk_size=p.logprob_chunk_size or DEFAULT_LOSS_CHUNK)
                m["tokens"] = torch.tensor(mb.tokens)
                sums += torch.stack([m[k].to(sums) for k in METRICS])
            else:  # this rank has fewer micro-batches: an empty one keeps the collectives paired
                ids = torch.full((1, 1), self.pad_id, dtype=torch.int64, device=d.device)
                zero = torch.zeros(1, dtype=torch.int64, device=d.device)
                self.gather.set(zero, zero)
                loss = self.model(input_ids=ids, use_cache=False).logits.sum() * 0.0
            # FSDP's reduce-scatter averages over ranks; the loss is already a global mean.
            (loss * d.world).backward()

        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), p.max_grad_norm if p.max_grad_norm else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer_steps += 1
        return sums, grad_norm.detach(), lr

    # -- one distillation step
    def _stop_requested(self) -> bool:
        return _SIGTERM["received"] or (self.worker is not None and self.worker.should_stop())

    def _await_shards(self, q: StageQueue, step: int, next_index: int, tables: dict,
                      dirty: bool = False) -> dict:
        """Rank 0 waits for the shards from `next_index` on to be committed and verifies them
        (into `tables`); every rank gets {"stop"} or {"expected", "shards": [(index, checksum)]}
        (possibly empty: a keep-alive).

        On a stop request (SIGTERM, STOP) the step is given up, unless it is `dirty` (some of
        its optimizer steps ran) and all its remaining shards are already committed: then it is
        finished, so that the stop saves a checkpoint of it instead of dropping its updates and
        redoing the steps since the last checkpoint."""
        msg = None
        if self.d.rank == 0:
            deadline = time.monotonic() + MAX_SILENCE_S
            while msg is None:
                expected, committed = q.expected(), q.committed(fast=True)
                if self._stop_requested():
                    finishable = dirty and expected is not None and all(
                        i in committed for i in range(next_index, expected))
                    if not finishable:
                        msg = {"stop": True}
                        break
                    if not getattr(self, "_finishing_logged", False):
                        log.info("stop requested during step %d: its remaining shards are all "
                                 "committed, finishing it first", step)
                        self._finishing_logged = True
                ready, i = [], next_index
                while i in committed and (expected is None or i < expected):
                    if self.worker is not None:
                        self.worker.beat("training", f"step {step}: reading scored shard {i}")
                    started = time.monotonic()
                    try:
                        tables[i] = q.read(i)
                    except (CorruptShardError, NotCommittedError) as e:  # pending again: redone
                        log.warning("step %d: scored shard %d unreadable, waiting for its redo: %s",
                                    step, i, e)
                        break
                    finally:
                        self.await_read_s += time.monotonic() - started
                    ready.append((i, q.record(i)["checksum"]))
                    i += 1
                if ready or time.monotonic() > deadline:
                    msg = {"stop": False, "expected": expected, "shards": ready,
                           "checkpoint_first": next_index == 0 and self._checkpoint_first()}
                elif self._stop_requested():
                    msg = {"stop": True}  # a committed shard turned out unreadable: give up
                else:
                    if self.worker is not None:
                        self.worker.beat("waiting", f"step {step}: {next_index}/{expected or '?'} "
                                                    "scored shards read")
                    self.pacer.sleep(self.pacer.due(q, [next_index], committed))
        return broadcast_object(msg)

    def train_step(self, step: int) -> dict:
        """Train on every scored shard of `step`, streaming; return train.json's content
        (without the save timing). Raises StepStopped on STOP/SIGTERM."""
        d, cfg = self.d, self.cfg
        q = StageQueue(self.rd, step, "scored", lease_s=cfg.queue.lease_s)
        batch_size = cfg.policy.train_global_batch_size
        buffered: list[Sample] = []
        results, tables = [], {}
        next_index, rows_read, wait_s, read_s, train_s = 0, 0, 0.0, 0.0, 0.0
        while True:
            t0 = time.monotonic()
            self.await_read_s = 0.0  # rank 0 reads (and verifies) the shards while awaiting them
            msg = self._await_shards(q, step, next_index, tables, dirty=bool(results))
            wait_s += time.monotonic() - t0 - self.await_read_s
            read_s += self.await_read_s
            if msg["stop"]:
                raise StepStopped(dirty=bool(results))
            if msg.get("checkpoint_first"):
                if d.rank == 0:
                    log.info("the job's time limit is near: checkpointing step %d before step %d",
                             self.step, step)
                self.save_checkpoint()
            t0 = time.monotonic()
            for index, checksum in msg["shards"]:
                table = tables.pop(index, None)
                if table is None:
                    table = q.read(index)
                    if q.record(index)["checksum"] != checksum:
                        raise RuntimeError(f"step {step}: scored shard {index} was recommitted "
                                           "while being read; a shard must be committed once")
                buffered += samples_from_table(table)
                rows_read += table.num_rows
            next_index += len(msg["shards"])
            read_s += time.monotonic() - t0
            last = msg["expected"] is not None and next_index >= msg["expected"]
            while len(buffered) >= batch_size or (last and buffered):
                batch, buffered = buffered[:batch_size], buffered[batch_size:]
                if self.worker is not None:
                    self.worker.beat("training", f"step {step}: optimizer batch {len(results) + 1}")
                fault_point("optimizer_batch", step)  # tests: a batch that takes very long
                t0 = time.monotonic()
                results.append(self.train_optimizer_batch(batch))
                train_s += time.monotonic() - t0
            if last:
                break
        want = cfg.distillation.num_prompts_per_step * cfg.distillation.num_generations_per_prompt
        if rows_read != want and d.rank == 0:
            log.warning("step %d: %d scored rows, expected num_prompts_per_step x "
                        "num_generations_per_prompt = %d", step, rows_read, want)
        t0 = time.monotonic()
        sums, norms, lrs = zip(*results) if results else ((), (), ())
        sums = torch.stack(sums).cpu() if sums else torch.zeros(0, len(METRICS), dtype=torch.float64)
        if results:  # the same count on every rank
            dist.all_reduce(sums)  # [batches, METRICS]: the step's one metrics collective
        grad_norms = [float(n) for n in norms]
        train_s += time.monotonic() - t0
        per = {k: sums[:, i] for i, k in enumerate(METRICS)}
        valid = int(per["valid_tokens"].sum())
        tokens = int(per["tokens"].sum())
        return {
            "step": step,
            "loss": float(per["loss_sum"].sum()) / max(valid, 1),
            "losses": (per["loss_sum"] / per["valid_tokens"].clamp_min(1)).tolist(),
            "forward_kl": float(per["forward_kl_sum"].sum()) / max(valid, 1),
            "reverse_kl": float(per["reverse_kl_sum"].sum()) / max(valid, 1),
            "student_topk_mass": float(per["student_topk_mass_sum"].sum()) / max(valid, 1),
            "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "grad_norms": grad_norms,
            "lr": lrs[-1] if lrs else None,
            "lrs": list(lrs),
            "tokens": tokens, "samples": rows_read, "valid_tokens": valid,
            "optimizer_steps": len(results), "world_size": d.world,
            "timing": {"wait_s": wait_s, "read_s": read_s, "train_s": train_s},
            "tokens_per_s_per_gpu": tokens / train_s / d.world if train_s > 0 else 0.0,
        }

    # -- outputs
    def export_weights(self, step: int) -> Optional[Path]:
        """Publish weights/<step> in HF format, in the base checkpoint's dtype: every rank
        writes its own shards (shared.distributed.export_hf, no rank gathers the model),
        then rank 0 adds the base model's config and tokenizer files and commits."""
        final = self.rd.weights_dir(step)
        tmp = broadcast_object(str(temp_dir_for(final)) if self.d.rank == 0 else None)
        export_hf(self.model, Path(tmp), self.export_dtype, self.d)
        if self.d.rank != 0:
            return None
        copy_model_files(self.base_dir, Path(tmp))
        commit_dir(Path(tmp), final, {"step": step, "model_name": self.cfg.policy.model_name,
                                      "base_dir": str(self.base_dir), "format": "hf-safetensors"})
        return final

    def checkpoint_dir(self, step: int) -> Path:
        return self.rd.checkpoint_dir(step)

    def _checkpoint_first(self) -> bool:
        """Rank 0, before a step: will the job's stop (the pre-timeout signal, expected at
        `self.stop_at`) likely come during it? Then the state of the last completed step is
        saved first, so that a step the stop interrupts costs only itself, never the steps
        since the last periodic checkpoint. Sent to every rank with the step's first message
        (clocks differ between nodes)."""
        return (self.stop_at is not None and self.cfg.checkpointing.enabled
                and self.step > self.checkpointed_step
                and time.time() + 1.5 * self.step_s + self.save_s >= self.stop_at)

    def save_checkpoint(self) -> None:
        """All ranks write their shards of the current state into one temp dir; rank 0
        publishes it once every rank is done."""
        started = time.monotonic()
        final = self.checkpoint_dir(self.step)
        tmp = broadcast_object(str(temp_dir_for(final)) if self.d.rank == 0 else None)
        dcp.save({"train": self.state}, checkpoint_id=tmp)
        fault_point("checkpoint_save", self.step)
        dist.barrier()
        if self.d.rank == 0:
            commit_dir(Path(tmp), final, {"step": self.step, "optimizer_steps": self.optimizer_steps,
                                          "world_size": self.d.world, "format": "torch-dcp"})
            prune_checkpoints(self.rd, self.cfg.checkpointing)
        self.checkpointed_step = self.step
        self.save_s = time.monotonic() - started

    def restore(self, before: Optional[int] = None) -> int:
        """Load the newest committed checkpoint (with step < `before`, if given); return its
        step, or 0 (and keep the base model) if there is none."""
        step = 0
        if self.d.rank == 0:
            steps = [s for s in committed_checkpoints(self.rd) if before is None or s < before]
            step = steps[-1] if steps else 0
        step = broadcast_object(step)
        if step:
            dcp.load({"train": self.state}, checkpoint_id=str(self.checkpoint_dir(step)))
            self.checkpointed_step = self.step
            if self.d.rank == 0:
                log.info("resumed from %s (step %d, %d optimizer steps)",
                         self.checkpoint_dir(step), self.step, self.optimizer_steps)
        return self.step

    def finish_step(self, result: dict) -> dict:
        """After train_step: publish weights and train.json, checkpoint when due."""
        step = result["step"]
        self.step = step
        t0 = time.monotonic()
        if self.worker is not None:
            self.worker.beat("saving", f"step {step}: weights")
        self.export_weights(step)
        ck = self.cfg.checkpointing
        if ck.enabled and (step % ck.save_period == 0 or step >= self.cfg.distillation.max_num_steps):
            self.save_checkpoint()
        result["timing"]["save_s"] = time.monotonic() - t0
        if self.d.rank == 0:
            atomic_write_json(self.rd.train_record(step), result)
            log.info("step %d: loss %.5f, grad norm %.4f, lr %.3g, %d optimizer steps, "
                     "%.0f tokens/s/gpu, wait %.1fs", step, result["loss"], result["grad_norm"],
                     result["lr"] or 0.0, result["optimizer_steps"], result["tokens_per_s_per_gpu"],
                     result["timing"]["wait_s"])
        return result


# ---------------------------------------------------------------------------- entry points


def job_stop_time(cfg: SluiceConfig) -> Optional[float]:
    """When the job's pre-timeout signal may come (its end time, SLUICE_JOB_END_TIME, set by
    the job's task, less cluster.signal_delay_s and Slurm's slack), or None if unknown."""
    end = jobenv.job_end_time()
    if end is None:
        return None
    return end - cfg.cluster.signal_delay_s - SIGNAL_SLACK_S


def run(run_dir, step: Optional[int] = None) -> int:
    """The training worker: resume, train steps until max_num_steps/STOP/SIGTERM (or exactly
    `step`), publish after each. Returns the last completed step."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cfg = load_run_config(rd)
    d = setup_distributed(cfg.distillation.seed)
    worker = Worker(rd, ROLE) if d.rank == 0 else None
    try:
        if worker is not None:
            worker.beat("loading", cfg.policy.model_name)
        trainer = Trainer(cfg, rd, d, worker)
        start = trainer.restore(before=step)
        if step is not None and start != step - 1 and d.rank == 0:
            log.warning("--step %d starts from step %d's state (newest checkpoint before it)",
                        step, start)
        steps = [step] if step is not None else range(start + 1, cfg.distillation.max_num_steps + 1)
        trainer.stop_at = job_stop_time(cfg)
        for t in steps:
            started = time.monotonic()
            try:
                result = trainer.train_step(t)
            except StepStopped as e:
                if d.rank == 0:
                    log.info("stop requested during step %d%s", t,
                             "; its partial updates are dropped" if e.dirty else "")
                if not e.dirty and cfg.checkpointing.enabled and trainer.step > trainer.checkpointed_step:
                    trainer.save_checkpoint()  # final checkpoint of the last completed step
                break
            trainer.finish_step(result)
            trainer.step_s = max(time.monotonic() - started, 0.7 * trainer.step_s)
        if worker is not None:
            worker.finish("stopped" if _SIGTERM["received"] else "exited")
        return trainer.step
    except BaseException as e:
        if worker is not None:
            worker.fail(e)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run directory (holds config.yaml)")
    parser.add_argument("--step", type=int, default=None,
                        help="train exactly this step (from the newest checkpoint before it), then exit")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s train[{rank}] %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    hf_logging.disable_progress_bar()  # one bar per load, in every rank's log
    run(args.run_dir, step=args.step)
    exit_now(0)  # everything is saved and the process group is gone


if __name__ == "__main__":
    main()

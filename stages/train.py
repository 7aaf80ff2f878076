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
                               on any number of ranks), plus COMMITTED.json. The newest
                               `checkpointing.keep_top_k` are kept (by step: training sees no
                               validation metric); null keeps all.
    workers/training/...json   rank 0's worker record (shared/worker.py)

Precision: master weights and optimizer state are float32; on GPU with policy.precision
bfloat16 (float16) FSDP computes in that dtype and reduces gradients in float32. On CPU
everything is float32.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, get_args

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from shared.distributed import (TORCH_DTYPES, Dist, broadcast_object, build_sharded, exit_now,
                                export_hf, setup_distributed)

from shared import jobenv
from shared.config import OptimizerName, SluiceConfig
from shared.files import atomic_write_json
from shared.loss import distillation_loss
from shared.models import ensure_model
from shared.queue import CorruptShardError, NotCommittedError, StageQueue
from shared.rundir import (CHECKPOINTS, COMMITTED, RunDir, commit_dir, committed_steps,
                           read_metrics, temp_dir_for)
from shared.schemas import ragged_from_arrow, topk_from_arrow
from shared.waiting import Pacer
from shared.worker import Worker, fault_point, load_run_config

log = logging.getLogger("sluice.train")

ROLE = "training"
# Rank 0 broadcasts at least this often while it waits for shards: the other ranks sit in that
# broadcast, and a collective that never returns would hit the process-group timeout.
MAX_SILENCE_S = 30.0
# Long enough for rank 0 to gather and write a large model while the others wait.
# Slurm sends the pre-timeout signal up to this much before the time it was asked for (its
# periodic check): the trainer plans as if it came this early.
SIGNAL_SLACK_S = 60.0
DEFAULT_LOSS_CHUNK = 256
# Per-optimizer-batch sums reduced over ranks (the first five come from distillation_loss).
METRICS = ("loss_sum", "forward_kl_sum", "reverse_kl_sum", "student_topk_mass_sum", "valid_tokens",
           "tokens")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


# -------------------------------------------------------------------------------- model


def resolve_model(name: str) -> Path:
    return ensure_model(name, "policy.model_name")


class ResponseGather:
    """Forward hook on the decoder that keeps only the hidden states at response positions, so
    the LM head (the largest matmul of a small model) and the logits exist only there:
    [1, N, vocab] instead of [batch, seq, vocab]. Armed per forward with `set`; disarmed it
    passes everything through (plain HF forward, e.g. for generate)."""

    def __init__(self, model):
        self._index = None
        model.get_decoder().register_forward_hook(self._hook)

    def set(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self._index = (rows, cols)

    def _hook(self, module, args, output):
        if self._index is None:
            return output
        rows, cols = self._index
        self._index = None
        output.last_hidden_state = output.last_hidden_state[rows, cols].unsqueeze(0)
        return output


def load_student(cfg: SluiceConfig, d: Dist):
    """(FSDP2-sharded student, its base directory). Every rank builds the model on the meta
    device, shards it and reads only its own slices of the checkpoint
    (shared.distributed.build_sharded): no rank holds the whole model."""
    path = resolve_model(cfg.policy.model_name)
    offload = cfg.policy.dtensor_cfg.cpu_offload and d.device.type == "cuda"
    if cfg.policy.dtensor_cfg.cpu_offload and not offload:
        log.warning("policy.dtensor_cfg.cpu_offload=true has no effect on CPU")
    shard_kwargs = dict(
        mesh=init_device_mesh(d.device.type, (d.world,)),
        mp_policy=_mixed_precision(cfg, d),
        offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
    )

    def shard(model):
        model.config.use_cache = False
        if cfg.policy.dtensor_cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(f"policy.model_name={cfg.policy.model_name!r}: no decoder layers found "
                             f"(classes {sorted(layer_classes)}); Sluice shards each decoder layer")
        for layer in layers:
            fully_shard(layer, **shard_kwargs)
        fully_shard(model, **shard_kwargs)
        return model

    model = build_sharded(path, torch.float32, d, shard,
                          alloc_device=torch.device("cpu") if offload else d.device)
    return model, path


def _mixed_precision(cfg: SluiceConfig, d: Dist) -> MixedPrecisionPolicy:
    precision = cfg.policy.precision
    # The user's value was checked by shared.config_check.validate before submission.
    assert precision in TORCH_DTYPES, f"policy.precision={precision!r}"
    if d.device.type != "cuda" or precision == "float32":
        return MixedPrecisionPolicy()
    if precision == "float16":
        log.warning("policy.precision=float16: training without loss scaling; bfloat16 is safer")
    return MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[precision], reduce_dtype=torch.float32)


def build_optimizer(cfg: SluiceConfig, model) -> torch.optim.Optimizer:
    name = cfg.policy.optimizer.name
    assert name in get_args(OptimizerName), name  # config_check._check_optimizer
    cls = getattr(torch.optim, name.rsplit(".", 1)[-1])
    kwargs = dict(cfg.policy.optimizer.kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(model.parameters(), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, entries) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """The runbook's scheduler list: {name: torch.optim.lr_scheduler.X, kwargs: {...}} entries,
    chained with SequentialLR at the one {milestones: [...]} entry's steps; a single scheduler
    is used alone; none gives a constant LR (returns None)."""
    schedulers, milestones = [], None
    for i, entry in enumerate(entries or ()):
        entry = dict(entry)
        if "milestones" in entry:
            milestones = list(entry["milestones"])
            continue
        name = str(entry.get("name", ""))
        cls = getattr(torch.optim.lr_scheduler, name.rsplit(".", 1)[-1], None)
        if not name.startswith("torch.optim.lr_scheduler.") or not isinstance(cls, type):
            raise ValueError(f"policy.scheduler[{i}].name={name!r} is not a "
                             "torch.optim.lr_scheduler class (e.g. torch.optim.lr_scheduler.LinearLR)")
        schedulers.append(cls(optimizer, **dict(entry.get("kwargs") or {})))
    if not schedulers:
        return None
    if len(schedulers) == 1:
        return schedulers[0]
    if milestones is None or len(milestones) != len(schedulers) - 1:
        raise ValueError(f"policy.scheduler: {len(schedulers)} schedulers need one "
                         f"{{milestones: [...]}} entry with {len(schedulers) - 1} milestone(s)")
    return torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones=milestones)


# --------------------------------------------------------------------------------- data


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
        self.export_dtype = _stored_dtype(self.base_dir)
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
            self._prune_checkpoints()
        self.checkpointed_step = self.step
        self.save_s = time.monotonic() - started

    def _prune_checkpoints(self) -> None:
        ck = self.cfg.checkpointing
        if ck.keep_top_k is None:
            return
        steps = committed_checkpoints(self.rd)
        for step in checkpoints_to_drop(steps, checkpoint_scores(self.rd, ck.metric_name),
                                        ck.keep_top_k, ck.higher_is_better):
            shutil.rmtree(self.checkpoint_dir(step), ignore_errors=True)

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


def checkpoint_scores(rd: RunDir, metric_name: str) -> dict:
    """step -> value of checkpointing.metric_name ('val:accuracy' -> validation/accuracy,
    'train:loss' -> train/loss) from RUN_DIR/metrics.jsonl, where the run has one."""
    prefix, _, name = metric_name.partition(":")
    key = {"val": "validation", "train": "train"}.get(prefix, prefix) + "/" + name
    return {int(row["step"]): float(row[key]) for row in read_metrics(rd) if key in row}


def checkpoints_to_drop(steps: list, scores: dict, keep: int, higher_is_better: bool) -> list:
    """keep_top_k: the newest checkpoint always stays (it is what a resume needs); of the
    others, those with a score rank by it, unscored ones after them by recency."""
    if len(steps) <= max(keep, 1):
        return []
    newest, rest = steps[-1], steps[:-1]
    sign = -1.0 if higher_is_better else 1.0
    ranked = sorted(rest, key=lambda s: (s not in scores, sign * scores.get(s, 0.0), -s))
    kept = set(ranked[:max(keep, 1) - 1]) | {newest}
    return [s for s in steps if s not in kept]


def committed_checkpoints(rd: RunDir) -> list[int]:
    return committed_steps(rd, CHECKPOINTS)


def _stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint is stored in (exported weights use it too), from its file:
    the loaded model's config says float32, the dtype it was loaded in."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def copy_model_files(base_dir: Path, out_dir: Path) -> None:
    """The base model's config.json as is (architecture and dtype unchanged by training; vLLM
    already loads it), tokenizer files, generation_config.json, chat template: everything
    but its weights."""
    for src in Path(base_dir).iterdir():
        if src.is_file() and not src.name.startswith(".") and src.name != COMMITTED \
                and not src.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(src, out_dir / src.name)


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load, in every rank's log
    run(args.run_dir, step=args.step)
    exit_now(0)  # everything is saved and the process group is gone


if __name__ == "__main__":
    main()

"""The teacher: score every rollout's response tokens with the frozen teacher's top-k log-probs.

    python -m stages.score RUN_DIR                   # long-lived worker over all active steps
    python -m stages.score RUN_DIR --step 3          # every pending scored shard of step 3, then exit
    python -m stages.score RUN_DIR --step 3 --once   # only what is claimable now, then exit
    torchrun --standalone --nproc_per_node 4 -m stages.score RUN_DIR   # one teacher over 4 GPUs

Input ``steps/<t>/rollouts/shard-k.arrow`` -> output ``steps/<t>/scored/shard-k.arrow`` (same
rows, same order; columns in shared/schemas.py). The scored shard is claimed only once its
rollouts shard is committed; the commit record's ``extra`` holds ``{"score_s", "tokens",
"dropped_samples"}`` (seconds spent scoring, teacher tokens forwarded, rows with
``sample_mask == 0``).

What is computed (DESIGN section 4). For each row the teacher reads ``teacher_prompt_ids +
response_ids`` (plain distillation: the teacher prompt is the row's ``prompt_ids``; context
distillation passes its own prompts to ``score_shard``). Response token i is predicted at
teacher position ``len(teacher_prompt_ids) - 1 + i`` (stored as ``alignment_offset``). The
transformer body runs once per batch; the LM head then runs only at response positions, in
chunks of ``teacher.logprob_chunk_size`` positions (default 1024): ``logits / T`` (T =
``teacher.generation.temperature`` when the teacher has a generation section, else 1: no
scaling, as in the fork), log-softmax over the full vocabulary in fp32, top-k
(``distillation.topk_logits_k``). The fp32 chunk is the only ``[positions, vocab]`` tensor and
the log-softmax is done in place on it, so peak memory is ``chunk * vocab * 4`` bytes, never
``sequence * vocab``. A row whose teacher sequence is longer than
``teacher.max_total_sequence_length`` is dropped: ``sample_mask = 0``, empty top-k, counted.

Batching. Sequences are sorted by length and packed greedily into batches whose padded size
(rows * longest) fits ``teacher.dynamic_batching.logprob_mb_tokens`` (when dynamic batching is
enabled) or ``teacher.max_total_sequence_length * teacher.logprob_batch_size``. Padding is on
the right and no attention mask is passed: with causal attention a real token never attends
to a later position, so right padding cannot change any real position's output, and the
attention kernel keeps its fast causal path.

Sharding (a task with G > 1 GPUs, under torchrun). The teacher is sharded with FSDP2
(``fully_shard`` per decoder layer, then the root, both resharding after forward), so each
GPU holds 1/G of the weights plus one layer at a time. Every rank receives the same rows but
forwards its OWN batches (batches are assigned largest-first to the least-loaded rank), with
FSDP all-gathering each layer's weights as it goes: G times the throughput of every rank
forwarding the same batch. FSDP's all-gathers are collectives, so every rank runs the same
number of forwards: a rank with fewer batches runs one-token dummy forwards. The LM head and
embeddings belong to the root, which stays unsharded for the whole forward, so the chunk
loop (whose length differs between ranks) runs no collectives. Results are all-gathered, and
rank 0 alone claims, reads, heartbeats and commits; it broadcasts each unit of work (or
"idle" every ``queue.poll_s``, so followers never sit in a collective long enough to hit a
timeout). Loading: every rank builds the model on the meta device and shards it; rank 0 alone
reads the checkpoint and broadcasts it tensor by tensor (``set_model_state_dict`` with
``broadcast_from_rank0``), so host memory holds one copy of the weights, not G.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import io
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from shared import schemas
from shared.config import SluiceConfig
from shared.context import TeacherPromptBuilder, count
from shared.distributed import (TORCH_DTYPES, Dist, broadcast_object, build_sharded, cuda_available,
                                exit_now, setup_distributed)
from shared.worker import StopRequested, Worker, fault_point, load_run_config
from stages.teacher_queue import TeacherQueue
from tinymodels.build import ensure_model

log = logging.getLogger("sluice.score")

DEFAULT_CHUNK = 1024


# ----------------------------------------------------------------------------- the model


class Scorer(nn.Module):
    """The causal LM wrapped so that one ``forward`` does body + chunked head + top-k.

    Being one module matters under FSDP2: the root's pre-forward hook unshards the
    embeddings and LM head once for the whole forward, so the per-chunk head calls (a number
    that differs between ranks) are plain matmuls, not collectives.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, *,
                temperature: float, k: int, chunk_size: int,
                targets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(logprobs fp32, ids int64)``, ``[len(rows), k]``, at ``input_ids[rows, positions]``.
        With ``targets`` (k = 1; one id per position: the student's sampled token): instead of
        the top-k, the log-prob of that token, with no top-k pass."""
        hidden = self.lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        picked = hidden[rows, positions]  # [N, H]: only the positions that predict response tokens
        del hidden
        head = self.lm.get_output_embeddings()
        n = picked.shape[0]
        values = torch.empty(n, k, dtype=torch.float32, device=picked.device)
        ids = torch.empty(n, k, dtype=torch.int64, device=picked.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            # .float() of a low-precision head output is a fresh fp32 tensor (of an fp32 one,
            # the head's own fresh output), so everything below may work in place on it.
            x = head(picked[start:end]).float()
            x.div_(temperature)
            # log_softmax(x) = (x - max) - log(sum(exp(x - max))), done in place so the chunk
            # costs one [chunk, vocab] fp32 buffer instead of three (x/T, exp, result).
            x.sub_(x.amax(dim=-1, keepdim=True))
            if targets is not None:
                top_ids = targets[start:end, None]
                top_values = x.gather(-1, top_ids)
            else:
                top_values, top_ids = x.topk(k, dim=-1)
            log_norm = x.exp_().sum(dim=-1, keepdim=True).log_()
            values[start:end] = top_values - log_norm
            ids[start:end] = top_ids
            del x
        return values, ids


@dataclasses.dataclass
class Teacher:
    """A loaded, frozen teacher and the scoring settings (``dataclasses.replace`` to vary them)."""

    scorer: Scorer
    name: str
    """cfg.teacher.model_name, recorded in every scored row."""
    device: torch.device
    temperature: float
    topk: int
    chunk_size: int
    """Positions per LM-head chunk."""
    mb_tokens: int
    """Padded tokens (rows * longest sequence) per forward."""
    max_seq_len: int
    """Longer teacher sequences (teacher prompt + response) are dropped."""
    pad_id: int
    sharded: bool = False
    """FSDP2 over the default process group: score_rows is then a collective."""
    sampled: bool = False
    """loss_fn.kl_type=sampled_reverse: score each response token's own log-prob (topk = 1,
    the "top-k" ids are the sampled tokens) instead of the top-k."""

    @property
    def lm(self) -> nn.Module:
        return self.scorer.lm


def resolve_model(name: str) -> Path:
    return ensure_model(name, "teacher.model_name")


def _settings(cfg: SluiceConfig) -> dict:
    """Scoring settings from the config, each checked with the key named in the error."""
    t = cfg.teacher
    chunk = t.logprob_chunk_size if t.logprob_chunk_size is not None else DEFAULT_CHUNK
    batching = t.dynamic_batching
    if batching.enabled and batching.logprob_mb_tokens is not None:
        mb_tokens = batching.logprob_mb_tokens
    else:
        if batching.logprob_mb_tokens is not None:
            log.warning("teacher.dynamic_batching.logprob_mb_tokens=%s is ignored because "
                        "teacher.dynamic_batching.enabled=false; batches hold "
                        "max_total_sequence_length * logprob_batch_size tokens",
                        batching.logprob_mb_tokens)
        mb_tokens = t.max_total_sequence_length * t.logprob_batch_size
    checks = {
        "teacher.logprob_chunk_size": chunk,
        "teacher.max_total_sequence_length": t.max_total_sequence_length,
        "teacher batch token budget (teacher.dynamic_batching.logprob_mb_tokens or "
        "max_total_sequence_length * logprob_batch_size)": mb_tokens,
        "distillation.topk_logits_k": cfg.distillation.topk_logits_k,
    }
    for key, value in checks.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} must be a positive integer")
    return dict(temperature=teacher_temperature(cfg), sampled=cfg.loss_fn.scores_sampled_token,
                topk=cfg.loss_fn.teacher_k(cfg.distillation.topk_logits_k),
                chunk_size=chunk, mb_tokens=mb_tokens, max_seq_len=t.max_total_sequence_length)


def teacher_temperature(cfg: SluiceConfig) -> float:
    """What the teacher divides its logits by, as in the fork: teacher.generation.temperature
    when the teacher has a generation section; none (1.0) when it is null. The student's
    sampling temperature never scales the teacher."""
    gen = cfg.teacher.generation
    t = 1.0 if gen is None else float(gen.temperature)
    assert t > 0, t  # config_check._check_generation
    return t


def compute_dtype(cfg: SluiceConfig, device: torch.device) -> torch.dtype:
    # The user's value was checked by shared.config_check.validate before submission.
    assert cfg.teacher.precision in TORCH_DTYPES, f"teacher.precision={cfg.teacher.precision!r}"
    # CPU runs are tests and smoke runs: float32 keeps them comparable with vLLM's CPU numerics.
    return torch.float32 if device.type == "cpu" else TORCH_DTYPES[cfg.teacher.precision]


def default_device() -> torch.device:
    if cuda_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_teacher(cfg: SluiceConfig, device: Optional[torch.device] = None) -> Teacher:
    """Load ``cfg.teacher.model_name`` once, frozen; FSDP2-sharded when the default process
    group has more than one rank (then every rank must call this)."""
    device = device or default_device()
    dtype = compute_dtype(cfg, device)
    settings = _settings(cfg)
    path = resolve_model(cfg.teacher.model_name)
    sharded = dist.is_initialized() and dist.get_world_size() > 1
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"teacher.model_name={cfg.teacher.model_name!r} soft-caps its logits "
                         "(final_logit_softcapping), which Sluice's chunked LM head does not apply")
    vocab = config.get_text_config().vocab_size
    if settings["topk"] > vocab:
        raise ValueError(f"distillation.topk_logits_k={settings['topk']} exceeds the teacher's "
                         f"vocabulary ({vocab})")
    if not sharded:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        scorer = Scorer(lm)
    else:
        scorer = _load_sharded(path, dtype, device)
    scorer.eval().requires_grad_(False)
    pad = getattr(config.get_text_config(), "pad_token_id", None)
    return Teacher(scorer=scorer, name=cfg.teacher.model_name, device=device,
                   pad_id=int(pad) if pad is not None else 0, sharded=sharded, **settings)


def _load_sharded(path: Path, dtype: torch.dtype, device: torch.device) -> Scorer:
    """Every rank builds the teacher on meta, shards it per decoder layer and reads only its
    own slices of the checkpoint (shared.distributed.build_sharded)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def shard(scorer: Scorer) -> Scorer:
        layers = getattr(scorer.lm.base_model, "layers", None)
        if layers is None:
            raise ValueError(f"{path}: {type(scorer.lm).__name__} has no base_model.layers to "
                             "shard per decoder layer; Sluice's teacher supports decoder-only HF models")
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        # Explicit True: the root's default keeps its weights gathered after forward (useful
        # for training's backward), which here would pin the embeddings and LM head on every rank.
        fully_shard(scorer, mesh=mesh, reshard_after_forward=True)
        return scorer

    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)
    return build_sharded(path, dtype, d, shard, wrap=Scorer, prefix="lm.")


# ------------------------------------------------------------------------------ scoring


@dataclasses.dataclass
class Scores:
    """The top-k of a list of rows, packed: row r is ``ids[offset_r : offset_r + lengths[r]]``."""

    ids: torch.Tensor  # [total_tokens, k] int32 (CPU)
    logprobs: torch.Tensor  # [total_tokens, k] float32 (CPU)
    lengths: list[int]  # response tokens scored per row (0 for a dropped row)
    mask: list[int]  # 1 = scored, 0 = dropped


def _as_ids(seq) -> torch.Tensor:
    return torch.as_tensor(seq, dtype=torch.int64).reshape(-1)


def _pack(lengths: dict[int, int], budget: int) -> list[list[int]]:
    """Rows grouped longest-first into batches whose padded size rows * longest <= budget
    (a row longer than the budget forwards alone)."""
    batches: list[list[int]] = []
    longest = 0
    for row in sorted(lengths, key=lambda r: (-lengths[r], r)):
        if batches and (len(batches[-1]) + 1) * longest <= budget:
            batches[-1].append(row)
        else:
            batches.append([row])
            longest = lengths[row]
    return batches


def _assign(batches: list[list[int]], lengths: dict[int, int], world: int) -> list[list[list[int]]]:
    """Batches per rank, largest first to the least-loaded rank (deterministic: all ranks agree)."""
    per_rank: list[list[list[int]]] = [[] for _ in range(world)]
    loads = [(0, r) for r in range(world)]
    for batch in sorted(batches, key=lambda b: -len(b) * lengths[b[0]]):
        load, rank = heapq.heappop(loads)
        per_rank[rank].append(batch)
        heapq.heappush(loads, (load + len(batch) * lengths[batch[0]], rank))
    return per_rank


@torch.no_grad()
def score_rows(
    teacher: Teacher,
    teacher_prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    keep: Optional[Sequence[bool]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Scores:
    """The teacher's top-k for every response token of every row.

    Row r's teacher sequence is ``teacher_prompt_ids[r] + response_ids[r]``; its response
    token i is scored at teacher position ``len(teacher_prompt_ids[r]) - 1 + i``. Rows with
    ``keep[r]`` false, or longer than ``teacher.max_seq_len``, are dropped (mask 0, no
    tokens). ``progress(done_tokens, total_tokens)`` is called after each forward (on this
    rank's share when sharded). Sharded teachers: every rank calls this with the same rows and
    gets the full result.
    """
    if len(teacher_prompt_ids) != len(response_ids):
        raise ValueError(f"{len(teacher_prompt_ids)} teacher prompts for {len(response_ids)} responses")
    if keep is not None and len(keep) != len(response_ids):
        raise ValueError(f"keep has {len(keep)} entries for {len(response_ids)} rows")
    prompts = [_as_ids(p) for p in teacher_prompt_ids]
    responses = [_as_ids(r) for r in response_ids]
    mask, seq_len = _select_rows(teacher, prompts, responses, keep)
    results = _score_batches(teacher, prompts, responses, seq_len, progress)
    return _assemble(teacher.topk, responses, mask, results)


def _select_rows(teacher: Teacher, prompts: list[torch.Tensor], responses: list[torch.Tensor],
                 keep: Optional[Sequence[bool]]) -> tuple[list[int], dict[int, int]]:
    """(mask, seq_len): mask[r] is 0 for a dropped row (not kept, or too long: warned about);
    seq_len maps each row to forward to its input length."""
    n_rows = len(responses)
    mask = [1] * n_rows
    seq_len: dict[int, int] = {}  # rows to forward -> input length (teacher sequence minus its last token)
    for r in range(n_rows):
        if len(prompts[r]) == 0:
            raise ValueError(f"row {r}: empty teacher prompt; response token 0 would have no "
                             "teacher position predicting it")
        total = len(prompts[r]) + len(responses[r])
        if (keep is not None and not keep[r]) or total > teacher.max_seq_len:
            mask[r] = 0
        elif len(responses[r]):
            seq_len[r] = total - 1  # the last response token predicts nothing we store
    too_long = sum(1 for r in range(n_rows) if mask[r] == 0 and (keep is None or keep[r]))
    if too_long:
        log.warning("%d of %d rows are longer than teacher.max_total_sequence_length=%d and are "
                    "dropped (sample_mask=0)", too_long, n_rows, teacher.max_seq_len)
    return mask, seq_len


def _score_batches(
    teacher: Teacher,
    prompts: list[torch.Tensor],
    responses: list[torch.Tensor],
    seq_len: dict[int, int],
    progress: Optional[Callable[[int, int], None]],
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Row -> (values, ids) of its response tokens, for every row in ``seq_len``: this rank
    forwards its share of the packed batches; sharded, the ranks' results are all-gathered."""
    batches = _pack(seq_len, teacher.mb_tokens)
    world, rank = (dist.get_world_size(), dist.get_rank()) if teacher.sharded else (1, 0)
    mine = _assign(batches, seq_len, world)
    rounds = max(len(b) for b in mine)
    total_tokens = sum(seq_len[r] for b in mine[rank] for r in b)
    done_tokens = 0
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    kwargs = dict(temperature=teacher.temperature, k=teacher.topk, chunk_size=teacher.chunk_size)
    for i in range(rounds):
        if i >= len(mine[rank]):
            # FSDP's per-layer all-gathers are collectives: match the other ranks' forwards.
            dummy = torch.full((1, 1), teacher.pad_id, dtype=torch.int64, device=teacher.device)
            empty = torch.zeros(0, dtype=torch.int64, device=teacher.device)
            teacher.scorer(dummy, empty, empty, **kwargs, targets=empty if teacher.sampled else None)
            continue
        batch = mine[rank][i]
        results.update(_score_batch(teacher, batch, prompts, responses, seq_len[batch[0]], kwargs))
        done_tokens += sum(seq_len[r] for r in batch)
        if progress is not None:
            progress(done_tokens, total_tokens)
    if teacher.sharded:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, results)
        results = {r: v for part in gathered for r, v in part.items()}
    return results


def _score_batch(teacher: Teacher, batch: list[int], prompts: list[torch.Tensor],
                 responses: list[torch.Tensor], width: int,
                 kwargs: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One forward of the padded rows ``batch`` (``width`` the longest input); row -> (values,
    ids) of its response tokens, on the CPU."""
    input_ids = torch.full((len(batch), width), teacher.pad_id, dtype=torch.int64)
    rows_idx, pos_idx = [], []
    for b, r in enumerate(batch):
        seq = torch.cat([prompts[r], responses[r]])[:-1]
        input_ids[b, : len(seq)] = seq
        start = len(prompts[r]) - 1
        rows_idx.append(torch.full((len(responses[r]),), b, dtype=torch.int64))
        pos_idx.append(torch.arange(start, start + len(responses[r])))
    targets = torch.cat([responses[r] for r in batch]).to(teacher.device) if teacher.sampled else None
    values, ids = teacher.scorer(
        input_ids.to(teacher.device), torch.cat(rows_idx).to(teacher.device),
        torch.cat(pos_idx).to(teacher.device), **kwargs, targets=targets)
    values, ids = values.cpu(), ids.to("cpu", torch.int32)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for r in batch:
        n = len(responses[r])
        # Clones, not views: a pickled view (all_gather_object) carries its whole batch.
        out[r] = (values[offset:offset + n].clone(), ids[offset:offset + n].clone())
        offset += n
    return out


def _assemble(k: int, responses: list[torch.Tensor], mask: list[int],
              results: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Scores:
    """The Scores of all rows, in row order (a dropped or empty row contributes no tokens)."""
    n_rows = len(responses)
    lengths = [len(responses[r]) if mask[r] else 0 for r in range(n_rows)]
    empty_v, empty_i = torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int32)
    parts = [results.get(r, (empty_v, empty_i)) for r in range(n_rows)]
    return Scores(
        ids=torch.cat([p[1] for p in parts]) if parts else empty_i,
        logprobs=torch.cat([p[0] for p in parts]) if parts else empty_v,
        lengths=lengths,
        mask=mask,
    )

def score_shard(
    teacher: Teacher,
    rollouts: pa.Table,
    teacher_prompts: Optional[Sequence[Sequence[int]]] = None,
    *,
    keep: Optional[Sequence[bool]] = None,
    trace_found: Optional[Sequence[Optional[bool]]] = None,
    prefix_truncated: Optional[Sequence[Optional[bool]]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> pa.Table:
    """The scored table of a rollouts table: its columns, in order, plus the teacher's.

    ``teacher_prompts`` (one id list per row; default: each row's ``prompt_ids``) is how
    context distillation gives the teacher its privileged prompt; a row whose teacher prompt
    equals its ``prompt_ids`` stores ``teacher_prompt_ids`` as null. ``keep`` (false: drop
    the row, e.g. ``missing_trace_policy=drop_sample``), ``trace_found`` and
    ``prefix_truncated`` are context distillation's; null for plain distillation.
    """
    schemas.check_schema(rollouts.schema, "rollouts", source="rollouts table")
    prompt_ids = rollouts.column("prompt_ids").to_pylist()
    response_ids = rollouts.column("response_ids").to_pylist()
    if teacher_prompts is None:
        teacher_prompts = prompt_ids
    elif len(teacher_prompts) != rollouts.num_rows:
        raise ValueError(f"{len(teacher_prompts)} teacher prompts for {rollouts.num_rows} rollout rows")
    teacher_prompts = [list(map(int, p)) for p in teacher_prompts]
    scores = score_rows(teacher, teacher_prompts, response_ids, keep=keep, progress=progress)
    ids, logprobs = schemas.topk_to_arrow(scores.ids, scores.logprobs, scores.lengths)
    n = rollouts.num_rows
    columns = {name: rollouts.column(name) for name in rollouts.column_names}
    columns.update(
        teacher_topk_ids=ids,
        teacher_topk_logprobs=logprobs,
        sample_mask=pa.array(scores.mask, pa.int8()),
        teacher_model=pa.array([teacher.name] * n, pa.string()),
        alignment_offset=pa.array([len(p) - 1 for p in teacher_prompts], pa.int32()),
        teacher_prompt_ids=pa.array([None if tp == p else tp for tp, p in zip(teacher_prompts, prompt_ids)],
                                    pa.list_(pa.int32())),
        trace_found=pa.array(trace_found if trace_found is not None else [None] * n, pa.bool_()),
        prefix_truncated=pa.array(prefix_truncated if prefix_truncated is not None else [None] * n, pa.bool_()),
    )
    return schemas.build_table("scored", columns, topk_k=teacher.topk)


def context_builder(cfg: SluiceConfig):
    """Context distillation's teacher-prompt builder (None for plain distillation)."""
    if not cfg.distillation.context_distillation.enabled:
        return None
    tokenizer = AutoTokenizer.from_pretrained(
        str(resolve_model(cfg.teacher.tokenizer.name or cfg.teacher.model_name)))
    return TeacherPromptBuilder(cfg, tokenizer)


def score_table(teacher: Teacher, rollouts: pa.Table, builder=None,
                progress: Optional[Callable[[int, int], None]] = None) -> tuple[pa.Table, dict]:
    """Score a rollouts table; with context distillation (``builder``), each row's teacher
    sees its privileged prompt, and the returned counts feed the context_distillation_*
    metrics. Every rank of a sharded teacher calls this with the same table."""
    if builder is None:
        return score_shard(teacher, rollouts, progress=progress), {}

    rows = rollouts.select(["problem", "prompt_ids", "response_ids", "response_text",
                            "static_trace"]).to_pylist()
    tps = [builder.build(r["problem"], r["response_ids"], r["response_text"], r["static_trace"])
           for r in rows]
    table = score_shard(
        teacher, rollouts,
        [tp.ids if tp.ids is not None else r["prompt_ids"] for tp, r in zip(tps, rows)],
        keep=[tp.ids is not None for tp in tps],
        trace_found=[tp.trace_found for tp in tps],
        prefix_truncated=[tp.truncated for tp in tps],
        progress=progress,
    )
    return table, {"context_distillation": count(tps)}


def _teacher_tokens(scored: pa.Table) -> int:
    """Teacher tokens forwarded for a scored table (teacher prompt + response of kept rows)."""
    kept = pc.equal(scored.column("sample_mask"), 1)
    per_row = pc.add(pc.add(scored.column("alignment_offset").cast(pa.int64()), 1),
                     pc.list_value_length(scored.column("response_ids")).cast(pa.int64()))
    return int(pc.sum(pc.if_else(kept, per_row, 0)).as_py() or 0)


# ------------------------------------------------------------------------------- worker


def init_distributed() -> tuple[int, int, bool]:
    """``(rank, world, we_initialised)``: joins torchrun's process group when WORLD_SIZE > 1
    (with the trainer's timeout: shared.distributed)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    d = setup_distributed(always=False)
    return d.rank, d.world, dist.is_initialized()


def _table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def run_worker(run_dir, step: Optional[int] = None, once: bool = False) -> int:
    """The teacher worker; returns the number of shards this worker committed.

    Without ``step``: loop over every active step until RUN_DIR/coordinator/STOP. With
    ``step``: until that step's scored stage is complete (``once``: only what is claimable
    now). Under torchrun every rank calls this; rank 0 alone touches the queue.
    """
    rank, _, we_initialised = init_distributed()
    try:
        if rank == 0:
            worker = Worker(run_dir, "teacher")
            worker.install_stop_handler()
            try:
                return _lead(run_dir, worker, step, once)
            except StopRequested:
                # Mid-shard: its claim was released on the way out; the other ranks, stopped
                # by the same signal, are not waiting for a message.
                log.info("stopped on %s; claims released", worker.stop_signal)
                worker.finish("stopped")
                return 0
            except BaseException as e:
                worker.fail(e)
                raise
        signal.signal(signal.SIGTERM, _raise_stop)
        try:
            _follow(run_dir)
        except StopRequested:
            pass
        return 0
    finally:
        if we_initialised:
            dist.destroy_process_group()


def _raise_stop(signum, frame) -> None:
    """Ranks > 0 on SIGTERM: they hold no claims; stop at once."""
    raise StopRequested(signal.Signals(signum).name)


def _lead(run_dir, worker: Worker, step: Optional[int], once: bool) -> int:
    cfg = worker.cfg
    worker.beat("loading", detail=f"teacher {cfg.teacher.model_name}")
    with worker.interruptible():
        teacher = load_teacher(cfg)
    builder = context_builder(cfg)
    leader = TeacherQueue(run_dir, cfg, worker, step)

    def score(rollouts: pa.Table, step: int, where: str) -> tuple[pa.Table, dict]:
        with worker.interruptible():
            fault_point("score_shard", step)  # tests: a forward that takes very long
            table, extra = score_table(teacher, rollouts, builder, progress=lambda done, total: worker.beat(
                "scoring", detail=f"{where}: {done}/{total} tokens"))
        extra.update({"tokens": _teacher_tokens(table),
                      "dropped_samples": int(pc.sum(pc.equal(table.column("sample_mask"), 0)).as_py())})
        return table, extra

    def announce(message) -> None:  # what the other ranks forward: "stop", "idle" or a shard
        broadcast_object(_table_bytes(message) if isinstance(message, pa.Table) else message)

    leader.serve(score, once=once, announce=announce)
    worker.finish("done" if step is not None else "exited")
    return leader.committed


def _follow(run_dir) -> None:
    """Ranks > 0: load the shard of the teacher, then forward whatever rank 0 broadcasts."""
    cfg = load_run_config(run_dir)
    teacher = load_teacher(cfg)
    builder = context_builder(cfg)
    while True:
        message = broadcast_object(None)
        if message == "stop":
            return
        if message == "idle":
            continue
        rollouts = pa.ipc.open_stream(message).read_all()
        score_table(teacher, rollouts, builder)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.score",
                                     description="Sluice teacher worker (see the module docstring).")
    parser.add_argument("run_dir", help="the run directory (RUN_DIR)")
    parser.add_argument("--step", type=int, default=None, help="score this step only, then exit")
    parser.add_argument("--once", action="store_true",
                        help="with --step: score what is claimable now and exit without waiting")
    args = parser.parse_args(argv)
    if args.once and args.step is None:
        parser.error("--once needs --step N")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hf_logging.disable_progress_bar()  # one bar per checkpoint load clutters the worker log
    n = run_worker(args.run_dir, step=args.step, once=args.once)
    log.info("teacher worker exits after committing %d shard(s)", n)
    exit_now(0)


if __name__ == "__main__":
    sys.exit(main())

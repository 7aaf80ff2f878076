"""The memory plan: each role's estimated peak memory per GPU, itemised, against the GPU's.

    python -m launch.run conf=qwen3-14b-4b launch.dry_run=true     # prints the plan
    from shared.memory import memory_plan
    print(memory_plan(cfg, plan).format())

`shared.config_check.validate` calls `check_memory`: a role that does not fit
`cluster.gpu_memory_gb` is refused (`cluster.memory_check=refuse`, the default) with the
estimate and the keys that fix it, or only warned about (`warn`); `off` skips the check.

Plain Python, no torch or vLLM: a model's shape comes from the built-in table of the Qwen3
family (`QWEN3`, by Hugging Face id), else from the config.json `shared.models.find_model`
finds on local disk; with neither its roles print "unknown size" and are not checked.
GB are 2^30 bytes. P is the parameter count, T the tokens of one forward (padded), a the
bytes of the compute dtype, h/q/kv/i the hidden, query (heads x head_dim), key-value
(kv_heads x head_dim) and MLP widths, V the vocabulary, L the decoder layers.

Training (stages/train.py, FSDP2 over all W training GPUs), per GPU:
  parameters, gradients   4P/W each: fp32 master weights and their fp32 gradients
  optimizer               8P/W: AdamW's exp_avg and exp_avg_sq in fp32
                          (the three: 0 on the GPU with policy.dtensor_cfg.cpu_offload)
  gathered weights        (root + 2 layers) x a: FSDP2 keeps the root unit (embeddings, LM head,
                          final norm) unsharded from forward to backward, and gathers the
                          decoder layers one at a time plus the one it prefetches
  gathered gradients      (root + 1 layer) x a, plus 4 x layer for the fp32 reduce-scatter copy
                          under mixed precision
  activations             saved for backward per token and layer:
                          h(4a + 2f) + (q + kv)(4 + 3a) + 4ai, f = 4 (RMSNorm's fp32 copy) if
                          a < 4 else 0; all L layers, or with activation checkpointing the L
                          layer inputs (a x h) plus one layer recomputed; plus the backward's
                          temporaries a(h + max(q + 2kv, 2i)) and the final norm, per token
  logits                  2 x T x V x a (the LM-head output and its gradient; with
                          loss_fn.zero_outside_topk a third copy, or four fp32 [chunk, V]
                          temporaries if more), plus 60 B per top-k entry
  runtime                 2 GB: CUDA context, NCCL buffers, allocator fragmentation
  T is the micro-batch's padded tokens (the dynamic-batching budget, or train_micro_batch_size
  sequences of max_total_sequence_length), every one counted as a response token.

Teacher (stages/score.py, FSDP2 over the G GPUs of one replica, no gradients), per GPU:
  weights P x a / G; gathered weights (root + 2 layers) x a when G > 1; forward peak: the
  larger of the body's (per token a(4h + max(3i, 4q + 3kv)) + 8 x head_dim for the rotary
  tables) and the LM head's ([chunk, V] in fp32, plus its a-byte output below fp32, plus the
  gathered hidden states and top-k outputs); runtime 2 GB.

Generation (one vLLM engine over TP GPUs), per GPU: vLLM takes gpu_memory_utilization x the
GPU's memory and fills it with weights (P x a / TP), its profiled activations (a forward of
16,384 batched tokens and the sampler's fp32 logits of 1,024 sequences, twice: vLLM's
defaults for the LLM class on 80 GB GPUs), a 2 GB runtime (CUDA context, CUDA graphs) and the
KV cache, 2 x L x max(kv_heads / TP, 1) x head_dim x (kv dtype bytes) per token. Refused when
the KV room cannot hold one max_model_len sequence (vLLM would refuse to start).

Roles that share a GPU add up (the partition plan gives every role GPUs of its own today).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, get_args

from shared.config import MemoryCheck, Precision, SluiceConfig
from shared.errors import config_error
from shared.models import find_model
from shared.partition import Plan
from shared.pipeline import PLACEMENT_ORDER as ROLES

log = logging.getLogger("sluice.memory")

GB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
assert set(DTYPE_BYTES) == set(get_args(Precision)), "DTYPE_BYTES: one size per config Precision"
RUNTIME_BYTES = 2 * GB
TOPK_ENTRY_BYTES = 60  # int64 id + fp32 log-prob, and the loss's fp32 [N, k] intermediates
TRAIN_LOSS_CHUNK = 256  # stages.train.DEFAULT_LOSS_CHUNK
TEACHER_CHUNK = 1024  # stages.score.DEFAULT_CHUNK
VLLM_BATCHED_TOKENS = 16384
VLLM_MAX_SEQS = 1024

# Qwen3 dense models: hidden, layers, heads, kv heads, intermediate, tied embeddings (head_dim
# 128, vocabulary 151,936), from the config.json of each Hugging Face repository.
_QWEN3 = {
    "0.6B": (1024, 28, 16, 8, 3072, True),
    "1.7B": (2048, 28, 16, 8, 6144, True),
    "4B": (2560, 36, 32, 8, 9728, True),
    "8B": (4096, 36, 32, 8, 12288, False),
    "14B": (5120, 40, 40, 8, 17408, False),
    "32B": (5120, 64, 64, 8, 25600, False),
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only model's config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> Optional["ModelShape"]:
        """From a config.json dict (or its text_config); None if a size is missing."""
        c = config.get("text_config", config)
        try:
            heads = int(c["num_attention_heads"])
            return cls(hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
                       kv_heads=int(c.get("num_key_value_heads") or heads),
                       head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
                       intermediate=int(c["intermediate_size"]), vocab=int(c["vocab_size"]),
                       tied=bool(c.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder layer: q/k/v/o projections, the MLP, two RMSNorms, q_norm and k_norm."""
        h = self.hidden
        return (2 * h * self.q_dim + 2 * h * self.kv_dim + 3 * h * self.intermediate
                + 2 * h + 2 * self.head_dim)

    @property
    def root_params(self) -> int:
        """The embeddings, the LM head unless tied, the final norm: FSDP2's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params


QWEN3 = {
    f"Qwen/Qwen3-{size}{suffix}": ModelShape(h, layers, heads, kv, 128, inter, 151936, tied)
    for size, (h, layers, heads, kv, inter, tied) in _QWEN3.items()
    for suffix in ("", "-Base")
}


def model_shape(name: str) -> Optional[ModelShape]:
    """The shape of `name`: the built-in Qwen3 table, else its local config.json, else None."""
    if name in QWEN3:
        return QWEN3[name]
    path = find_model(name)
    if path is None or not (path / "config.json").is_file():
        return None
    return ModelShape.from_config(json.loads((path / "config.json").read_text()))


def _share(params: int, shards: int) -> str:
    """'1/4 of 14.77B parameters'; the count alone when not sharded."""
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    return f"1/{shards} of {count} parameters" if shards > 1 else f"{count} parameters"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // max(multiple, 1)) * max(multiple, 1)


def train_micro_batch_tokens(cfg: SluiceConfig) -> int:
    """Padded tokens of the largest training micro-batch (stages.batches.plan_micro_batches)."""
    p = cfg.policy
    if p.dynamic_batching.enabled:
        budget = p.dynamic_batching.train_mb_tokens or p.max_total_sequence_length * p.train_micro_batch_size
        # A sequence longer than the budget goes alone.
        return max(budget, _round_up(p.max_total_sequence_length, p.dynamic_batching.sequence_length_round))
    return p.train_micro_batch_size * _round_up(p.max_total_sequence_length,
                                                p.make_sequence_length_divisible_by)


def teacher_batch_tokens(cfg: SluiceConfig) -> int:
    """Padded tokens of the largest teacher forward (stages.score._settings and _pack)."""
    t = cfg.teacher
    b = t.dynamic_batching
    budget = b.logprob_mb_tokens if b.enabled and b.logprob_mb_tokens is not None \
        else t.max_total_sequence_length * t.logprob_batch_size
    return max(budget, t.max_total_sequence_length)


def training_activation_bytes(shape: ModelShape, tokens: int, a: int, checkpointing: bool) -> int:
    """Activations one forward/backward of `tokens` tokens keeps (see the module docstring)."""
    f = 4 if a < 4 else 0
    s = shape
    per_layer = (s.hidden * (4 * a + 2 * f) + (s.q_dim + s.kv_dim) * (4 + 3 * a)
                 + 4 * a * s.intermediate)
    if checkpointing:  # every layer's input, and one layer recomputed at a time
        kept = s.layers * s.hidden * a + per_layer
    else:
        kept = s.layers * per_layer
    backward = a * (s.hidden + max(s.q_dim + 2 * s.kv_dim, 2 * s.intermediate))
    final = s.hidden * (2 * a + f)  # the final norm and the response positions' hidden states
    return tokens * (kept + backward + final)


def training_logits_bytes(shape: ModelShape, tokens: int, a: int, topk: int,
                          zero_outside_topk: bool, chunk: int) -> int:
    """The [tokens, V] logits, their gradients and the loss's top-k and chunk temporaries."""
    logits = tokens * shape.vocab * a
    if not zero_outside_topk:
        return 2 * logits + tokens * topk * TOPK_ENTRY_BYTES
    # zero_outside_topk's backward builds one more [tokens, V] tensor, and recomputes fp32
    # [chunk, V] tensors (about four) while the logits and their gradient exist.
    chunks = 4 * min(chunk, tokens) * shape.vocab * 4
    return max(3 * logits, 2 * logits + chunks) + tokens * topk * TOPK_ENTRY_BYTES


def inference_activation_bytes(shape: ModelShape, tokens: int, a: int, shards: int = 1) -> int:
    """Peak of a no-grad forward of the decoder body over `tokens` tokens (q, kv and i split
    over `shards` tensor-parallel GPUs)."""
    s = shape
    inner = max(3 * s.intermediate, 4 * s.q_dim + 3 * s.kv_dim) // shards
    return tokens * (a * (4 * s.hidden + inner) + 8 * s.head_dim)


def teacher_head_bytes(shape: ModelShape, tokens: int, a: int, topk: int, chunk: int) -> int:
    """The teacher's LM-head stage: hidden states at response positions, one fp32 [chunk, V]
    (plus the head's own output below fp32), top-k outputs."""
    per_logit = 4 + (a if a < 4 else 0)
    return tokens * shape.hidden * a + min(chunk, tokens) * shape.vocab * per_logit + tokens * topk * 12


@dataclass
class Item:
    """One line of a role's estimate."""

    name: str
    size: float
    """Bytes."""
    note: str


@dataclass
class RoleEstimate:
    """One role's peak per GPU; `items` empty when the model's size is unknown."""

    role: str
    model: str
    summary: str
    items: List[Item] = field(default_factory=list)
    problem: Optional[str] = None
    """Why the role cannot run even on a GPU of its own (generation's KV cache)."""
    fix: str = ""
    """The keys that make it fit."""

    @property
    def known(self) -> bool:
        return bool(self.items)

    @property
    def total(self) -> float:
        return sum(i.size for i in self.items)

    def itemised(self) -> str:
        return ", ".join(f"{i.name} {i.size / GB:.1f}" for i in self.items)


def _training(cfg: SluiceConfig, plan: Plan, shape: ModelShape) -> RoleEstimate:
    p = cfg.policy
    d = p.dtensor_cfg
    world = plan.roles["training"].total_gpus
    a = DTYPE_BYTES[p.precision]
    tokens = train_micro_batch_tokens(cfg)
    shard = shape.params / world
    kept = 0 if d.cpu_offload else 1
    k = cfg.loss_fn.teacher_k(cfg.distillation.topk_logits_k)

    def where(size: float) -> str:
        return f"on the host: {size / GB:.2f} (cpu_offload)" if d.cpu_offload \
            else _share(shape.params, world)

    reduce_copy = 4 * shape.layer_params if a < 4 else 0
    chunk = p.logprob_chunk_size or TRAIN_LOSS_CHUNK
    items = [
        Item("parameters", kept * 4 * shard, f"fp32 master weights, {where(4 * shard)}"),
        Item("gradients", kept * 4 * shard, f"fp32, {where(4 * shard)}"),
        Item("optimizer", kept * 8 * shard, f"AdamW exp_avg + exp_avg_sq, fp32, {where(8 * shard)}"),
        Item("gathered weights", (shape.root_params + 2 * shape.layer_params) * a,
             f"root unit (embeddings, LM head) + 2 decoder layers, {p.precision}"),
        Item("gathered gradients", (shape.root_params + shape.layer_params) * a + reduce_copy,
             f"root unit + 1 layer, {p.precision}" + (" + fp32 reduce copy" if reduce_copy else "")),
        Item("activations", training_activation_bytes(shape, tokens, a, d.activation_checkpointing),
             f"{tokens} tokens, {shape.layers} layers"
             + (", activation checkpointing" if d.activation_checkpointing else ", all kept")),
        Item("logits", training_logits_bytes(shape, tokens, a, k, cfg.loss_fn.full_vocab_student, chunk),
             f"{3 if cfg.loss_fn.full_vocab_student else 2} x [{tokens}, {shape.vocab}] {p.precision}"
             f" + top-{k}"),
        Item("runtime", RUNTIME_BYTES, "CUDA context, NCCL, allocator"),
    ]
    rp = plan.roles["training"]
    fixes = []
    if not d.cpu_offload:
        fixes.append("set policy.dtensor_cfg.cpu_offload=true (parameters, gradients and AdamW "
                     "states on the host)")
    fixes.append("give training more GPUs (distillation.resource_isolation.roles.training."
                 f"num_nodes or gpus_per_node, now {rp.num_nodes} x {rp.gpus_per_node}, with "
                 "cluster.num_nodes to match)")
    if not d.activation_checkpointing:
        fixes.append("set policy.dtensor_cfg.activation_checkpointing=true")
    if p.dynamic_batching.enabled and tokens > p.max_total_sequence_length:
        fixes.append(f"lower policy.dynamic_batching.train_mb_tokens (now {tokens})")
    elif not p.dynamic_batching.enabled and p.train_micro_batch_size > 1:
        fixes.append(f"lower policy.train_micro_batch_size (now {p.train_micro_batch_size})")
    else:  # the longest sequence is a micro-batch of its own
        fixes.append(f"lower policy.max_total_sequence_length (now {p.max_total_sequence_length}"
                     ": the longest sequence is a micro-batch of its own)")
    return RoleEstimate("training", p.model_name,
                        f"FSDP2 over {world} GPU(s), {p.precision}, micro-batch {tokens} tokens",
                        items, fix="; ".join(fixes))


def _teacher(cfg: SluiceConfig, plan: Plan, shape: ModelShape) -> RoleEstimate:
    t = cfg.teacher
    g = plan.roles["teacher"].gpus_per_task
    a = DTYPE_BYTES[t.precision]
    tokens = teacher_batch_tokens(cfg)
    k = cfg.loss_fn.teacher_k(cfg.distillation.topk_logits_k)
    chunk = t.logprob_chunk_size or TEACHER_CHUNK
    body = inference_activation_bytes(shape, tokens, a)
    head = teacher_head_bytes(shape, tokens, a, k, chunk)
    items = [
        Item("weights", shape.params * a / g, f"{t.precision}, {_share(shape.params, g)}"),
        Item("gathered weights", (shape.root_params + 2 * shape.layer_params) * a if g > 1 else 0,
             "root unit + 2 decoder layers" if g > 1 else "not sharded"),
        Item("forward peak", max(body, head),
             f"{tokens} tokens: max(body {body / GB:.1f}, LM head chunk of {chunk} {head / GB:.1f})"),
        Item("runtime", RUNTIME_BYTES, "CUDA context, NCCL, allocator"),
    ]
    fix = (f"shard the teacher over more GPUs (teacher.dtensor_cfg.tensor_parallel_size, now {g}), "
           "or lower its batch tokens (teacher.dynamic_batching.logprob_mb_tokens, "
           "teacher.logprob_batch_size) or teacher.logprob_chunk_size")
    return RoleEstimate("teacher", t.model_name,
                        f"{g} GPU(s) per replica, {t.precision}, batch {tokens} tokens", items, fix=fix)


def vllm_dtype_bytes(dtype: str) -> int:
    """Bytes per element of a vLLM dtype name (float32/float: 4; bfloat16, float16, half: 2)."""
    return 4 if dtype in ("float32", "float") else 2


def kv_cache_dtype_bytes(kv_cache_dtype: str, weight_bytes: int) -> int:
    """Bytes per KV element: vLLM's `auto` is the weights' dtype; fp8 kinds are one byte."""
    if kv_cache_dtype == "auto":
        return weight_bytes
    return 1 if kv_cache_dtype.startswith("fp8") else vllm_dtype_bytes(kv_cache_dtype)


def _generation(cfg: SluiceConfig, plan: Plan, shape: ModelShape) -> RoleEstimate:
    v = cfg.policy.generation.vllm_cfg
    tp = v.tensor_parallel_size
    a = vllm_dtype_bytes(v.precision)
    share = v.gpu_memory_utilization * cfg.cluster.gpu_memory_gb * GB
    weights = shape.params * a / tp
    activations = (inference_activation_bytes(shape, VLLM_BATCHED_TOKENS, a, tp)
                   + 2 * VLLM_MAX_SEQS * shape.vocab * 4)
    room = share - weights - activations - RUNTIME_BYTES
    per_token = 2 * shape.layers * max(shape.kv_heads // tp, 1) * shape.head_dim \
        * kv_cache_dtype_bytes(v.kv_cache_dtype, a)
    kv_tokens = int(max(room, 0) // per_token)
    seqs = min(cfg.policy.generation_batch_size, VLLM_MAX_SEQS)
    items = [
        Item("weights", weights, f"{v.precision}, {_share(shape.params, tp)}"),
        Item("activations", activations, f"vLLM's profile: {VLLM_BATCHED_TOKENS} tokens, sampler "
             f"of {VLLM_MAX_SEQS} sequences"),
        Item("runtime", RUNTIME_BYTES, "CUDA context, CUDA graphs"),
        Item("KV cache", max(room, 0),
             f"{per_token / 1024:.0f} KiB/token: {kv_tokens} tokens = "
             f"{kv_tokens / v.max_model_len:.1f} x max_model_len {v.max_model_len} "
             f"({seqs} sequences run at once)"),
    ]
    problem = None
    if weights >= share:
        problem = (f"generation ({cfg.policy.model_name}) weights alone ({weights / GB:.1f} GB per "
                   f"GPU) exceed vLLM's share, gpu_memory_utilization {v.gpu_memory_utilization} x "
                   f"cluster.gpu_memory_gb {cfg.cluster.gpu_memory_gb:g} = {share / GB:.1f} GB")
    elif kv_tokens < v.max_model_len:
        problem = (f"generation ({cfg.policy.model_name}) leaves {max(room, 0) / GB:.1f} GB of KV "
                   f"cache per GPU ({share / GB:.1f} GB share - weights {weights / GB:.1f} - "
                   f"activations {activations / GB:.1f} - runtime {RUNTIME_BYTES / GB:.1f}): "
                   f"{kv_tokens} tokens, less than one max_model_len={v.max_model_len} sequence")
    fix = (f"raise policy.generation.vllm_cfg.gpu_memory_utilization (now {v.gpu_memory_utilization})"
           f" or policy.generation.vllm_cfg.tensor_parallel_size (now {tp}), lower "
           "policy.generation.vllm_cfg.max_model_len, or set "
           "policy.generation.vllm_cfg.kv_cache_dtype=fp8")
    return RoleEstimate("generation", cfg.policy.model_name,
                        f"vLLM engine over {tp} GPU(s), {v.precision}, "
                        f"{v.gpu_memory_utilization} x {cfg.cluster.gpu_memory_gb:g} GB",
                        items, problem=problem, fix=fix)


_ESTIMATORS = {"training": _training, "generation": _generation, "teacher": _teacher}


@dataclass
class GpuGroup:
    """GPUs that hold the same roles: (node, GPU ids) pairs."""

    roles: Tuple[str, ...]
    gpus: List[Tuple[int, List[int]]]

    def where(self) -> str:
        return ", ".join(f"node {n} GPU{'s' if len(ids) > 1 else ''} {_span(ids)}"
                         for n, ids in self.gpus)


def _span(ids: List[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)) \
        else ",".join(map(str, ids))


@dataclass
class MemoryPlan:
    budget: float
    """Bytes of one GPU (cluster.gpu_memory_gb)."""
    mode: str
    roles: Dict[str, RoleEstimate]
    groups: List[GpuGroup]

    def group_total(self, group: GpuGroup) -> float:
        return sum(self.roles[r].total for r in group.roles)

    def problems(self) -> List[Tuple[str, str]]:
        """(what does not fit, how to fix it) for every role or shared GPU over budget."""
        out = []
        for group in sorted(self.groups, key=lambda g: ROLES.index(g.roles[0])):
            known = [self.roles[r] for r in group.roles if self.roles[r].known]
            total = self.group_total(group)
            if not known or total <= self.budget:
                continue
            if len(known) == 1:
                e = known[0]
                if not e.problem:  # reported below, with its own reason
                    out.append((f"{e.role} ({e.model}) needs an estimated {total / GB:.1f} GB per "
                                f"GPU ({e.itemised()}), over cluster.gpu_memory_gb="
                                f"{self.budget / GB:g}", e.fix))
            else:
                out.append((f"{' + '.join(e.role for e in known)} share {group.where()}: an "
                            f"estimated {total / GB:.1f} GB per GPU, over cluster.gpu_memory_gb="
                            f"{self.budget / GB:g}", "give the roles GPUs of their own "
                            "(distillation.resource_isolation.roles.*)"))
        out += [(e.problem, e.fix) for e in self.roles.values() if e.problem]
        return out

    def format(self) -> str:
        """The dry run's table: every role's items, then each GPU group's total vs the budget."""
        budget = self.budget / GB
        lines = [f"# memory plan: estimated peak GB per GPU (GB = 2^30 bytes) vs "
                 f"cluster.gpu_memory_gb={budget:g}, cluster.memory_check={self.mode}"]
        for e in self.roles.values():
            if not e.known:
                lines.append(f"{e.role}: {e.model}: unknown size (not in the built-in Qwen3 table, "
                             "no config.json on local disk): not checked")
                continue
            lines.append(f"{e.role}: {e.model}, {e.summary}")
            lines += [f"  {i.name:<20}{i.size / GB:>7.2f}  {i.note}" for i in e.items]
            lines.append(f"  {'total':<20}{e.total / GB:>7.2f}  of {budget:g}")
        lines.append("# per GPU")
        for group in self.groups:
            known = [r for r in group.roles if self.roles[r].known]
            total = self.group_total(group) / GB
            verdict = "unknown size" if not known else "fits" if total <= budget else "DOES NOT FIT"
            lines.append(f"  {group.where()}: {' + '.join(group.roles)} {total:.1f} of {budget:g} GB, "
                         f"{verdict}")
        lines += [f"  DOES NOT FIT: {e.problem}" for e in self.roles.values() if e.problem]
        return "\n".join(lines) + "\n"


def memory_plan(cfg: SluiceConfig, plan: Plan) -> MemoryPlan:
    """Every role's estimate and the GPU groups of the partition plan."""
    roles = {}
    for role in ROLES:
        name = cfg.teacher.model_name if role == "teacher" else cfg.policy.model_name
        shape = model_shape(name)
        roles[role] = _ESTIMATORS[role](cfg, plan, shape) if shape is not None \
            else RoleEstimate(role, name, "unknown size")
    holders: Dict[Tuple[int, int], List[str]] = {}
    for role in ROLES:
        rp = plan.roles[role]
        for node, ids in zip(rp.nodes, rp.gpu_ids):
            for gpu in ids:
                holders.setdefault((node, gpu), []).append(role)
    groups: Dict[Tuple[str, ...], Dict[int, List[int]]] = {}
    for (node, gpu), rs in sorted(holders.items()):
        groups.setdefault(tuple(rs), {}).setdefault(node, []).append(gpu)
    return MemoryPlan(budget=cfg.cluster.gpu_memory_gb * GB, mode=cfg.cluster.memory_check,
                      roles=roles,
                      groups=[GpuGroup(rs, sorted(nodes.items())) for rs, nodes in groups.items()])


def check_memory(cfg: SluiceConfig, plan: Plan) -> None:
    """Refuse (or warn about, per cluster.memory_check) a role that does not fit its GPUs.

    Raises ConfigError."""
    cl = cfg.cluster
    if not cl.gpu_memory_gb > 0:
        raise config_error("cluster.gpu_memory_gb", value=cl.gpu_memory_gb,
                           problem="must be a positive number of GB",
                           fix="set the memory of one GPU, e.g. cluster.gpu_memory_gb=80")
    assert cl.memory_check in get_args(MemoryCheck), cl.memory_check  # config_check._check_cluster
    if cl.memory_check == "off":
        return
    problems = memory_plan(cfg, plan).problems()
    if not problems:
        return
    problem = "; ".join(p for p, _ in problems)
    fix = "; ".join(f for _, f in problems) + ("; or set cluster.memory_check=warn to launch anyway "
                                               "(launch.dry_run=true prints the whole estimate)")
    if cl.memory_check == "refuse":
        raise config_error("cluster.gpu_memory_gb", value=cl.gpu_memory_gb, problem=problem, fix=fix)
    log.warning("warning: the memory plan does not fit (cluster.memory_check=warn): %s", problem)

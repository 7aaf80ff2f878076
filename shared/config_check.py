"""Every check of a config, in one place, run before anything is submitted or written.

    from shared.config_check import validate
    plan = validate(cfg)            # raises shared.errors.ConfigError, returns the partition plan

Also run by `python -m launch.run ... launch.dry_run=true`. Checks that need the model files
(tokenizer compatibility) run only when the models can be found locally; `check_models=True`
(a real launch) makes a missing model an error. The allowed values of fixed-choice keys are
the Literal aliases of shared/config.py; workers assume this check passed.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import List, Optional, get_args

from shared import sbatch
from shared.config import (Alignment, CheckpointingConfig, ClusterConfig, Compression, ContextMode,
                           DataConfig, DistillationConfig, EnvName, ExecutorKind, FrozenTeacherSource,
                           GenerationBackend, KLType, LaunchConfig, LoggerConfig, LossConfig,
                           MemoryCheck, MissingTracePolicy, ModelSaveFormat, OptimizerName,
                           OverflowPolicy, PolicyConfig, Precision, ProblemSource, QueueConfig,
                           SluiceConfig, TraceSelection, TraceSource, TraceType, WandbMode)
from shared.errors import config_error
from shared.memory import check_memory
from shared.models import find_model, tokenizer_fingerprint
from shared.partition import Plan, plan as make_plan
from shared.recipe import REPO_ROOT
from shared.slurm_time import minutes


def resolve_path(p: str) -> Optional[Path]:
    """A user path: absolute, else relative to the working directory, else to the repo root."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for base in (Path.cwd(), REPO_ROOT):
        if (base / path).exists():
            return (base / path).resolve()
    return None


def validate(cfg: SluiceConfig, check_models: bool = False) -> Plan:
    """Check every key of `cfg`, section by section; return the partition plan.

    Raises ConfigError naming the key, its value and the fix, for the first problem found."""
    if cfg.policy.generation is None:
        raise config_error("policy.generation", value=None, problem="the student needs sampling "
                           "settings", fix="remove `generation: null` from policy")
    plan = make_plan(cfg)
    _check_context_distillation(cfg)  # first: its V1 messages are the ones users know
    _check_distillation(cfg.distillation)
    _check_loss(cfg.loss_fn)
    _check_student_and_teacher(cfg)
    _check_optimizer(cfg)
    _check_batch_arithmetic(cfg, plan)
    _check_generation(cfg)
    _check_data(cfg.data)
    _check_template(cfg)
    _check_logger(cfg.logger)
    _check_checkpointing(cfg.checkpointing)
    _check_launch(cfg.launch)
    _check_cluster(cfg.cluster)
    _check_queue(cfg.queue)
    check_memory(cfg, plan)
    _check_models(cfg, required=check_models)
    return plan


def _check_context_distillation(cfg: SluiceConfig) -> None:
    c = cfg.distillation.context_distillation
    if not c.enabled:
        return
    pre = "distillation.context_distillation"
    if cfg.distillation.max_rollout_turns != 1:
        raise config_error("distillation.max_rollout_turns", value=cfg.distillation.max_rollout_turns,
                           problem="context distillation (V1) requires distillation.max_rollout_turns == 1",
                           fix="set distillation.max_rollout_turns=1")
    if cfg.policy.model_name != cfg.teacher.model_name:
        raise config_error("teacher.model_name", value=cfg.teacher.model_name,
                           problem="context self-distillation (V1) requires policy.model_name == "
                           f"teacher.model_name (policy.model_name={cfg.policy.model_name!r})",
                           fix="set teacher.model_name to the same model as policy.model_name")
    for key, val, choice in (
        ("mode", c.mode, ContextMode),
        ("alignment", c.alignment, Alignment),
        ("problem_source", c.problem_source, ProblemSource),
        ("overflow_policy", c.overflow_policy, OverflowPolicy),
        ("frozen_teacher_source", c.frozen_teacher_source, FrozenTeacherSource),
        ("trace_source", c.trace_source, TraceSource),
        ("trace_extractor.type", c.trace_extractor.type, TraceType),
        ("trace_extractor.selection", c.trace_extractor.selection, TraceSelection),
        ("trace_extractor.missing_trace_policy", c.trace_extractor.missing_trace_policy,
         MissingTracePolicy),
    ):
        allowed = get_args(choice)
        if val not in allowed:
            raise config_error(f"{pre}.{key}", value=val,
                               problem=f"context distillation (V1) requires {pre}.{key} to be "
                               f"{' or '.join(allowed)}",
                               fix=f"set {pre}.{key}={allowed[0]}")
    if c.trace_source == "static_dataset" and not c.static_trace.answer_column:
        raise config_error(f"{pre}.static_trace.answer_column", value=None,
                           problem="trace_source=static_dataset needs the dataset column of the trace",
                           fix=f"set {pre}.static_trace.answer_column=<column>")


def _check_distillation(d: DistillationConfig) -> None:
    for key in ("num_prompts_per_step", "num_generations_per_prompt", "max_num_steps",
                "max_num_epochs", "topk_logits_k", "val_batch_size"):
        if getattr(d, key) < 1:
            raise config_error(f"distillation.{key}", value=getattr(d, key),
                               problem="must be at least 1", fix=f"set distillation.{key}>=1")
    if d.max_rollout_turns != 1:
        raise config_error("distillation.max_rollout_turns", value=d.max_rollout_turns,
                           problem="Sluice supports single-turn rollouts only",
                           fix="set distillation.max_rollout_turns=1")
    if d.max_staleness not in (0, 1):
        raise config_error("distillation.max_staleness", value=d.max_staleness,
                           problem="supported values are 0 (on-policy) and 1 (one step ahead)",
                           fix="set distillation.max_staleness=0 or 1")
    if d.val_period < 0:
        raise config_error("distillation.val_period", value=d.val_period,
                           problem="must be >= 0 (0 disables validation)", fix="set val_period>=0")


def _check_loss(loss: LossConfig) -> None:
    _check_choice("loss_fn.kl_type", loss.kl_type, KLType)
    if not 0.0 <= loss.mixed_kl_weight <= 1.0:
        raise config_error("loss_fn.mixed_kl_weight", value=loss.mixed_kl_weight,
                           problem="the weight of the forward KL must be in [0, 1]",
                           fix="set loss_fn.mixed_kl_weight between 0 and 1")
    if not 0.0 < loss.jsd_beta < 1.0:
        raise config_error("loss_fn.jsd_beta", value=loss.jsd_beta,
                           problem="the JSD interpolation must be strictly between 0 and 1",
                           fix="set loss_fn.jsd_beta in (0, 1) (its limits are kl_type=forward "
                           "and kl_type=reverse)")


def _check_model_side(prefix: str, m: PolicyConfig) -> None:
    d = m.dtensor_cfg
    _check_choice(f"{prefix}.precision", m.precision, Precision)
    if not d.enabled:
        raise config_error(f"{prefix}.dtensor_cfg.enabled", value=False,
                           problem="Sluice trains and scores with FSDP2 (DTensor) only",
                           fix=f"set {prefix}.dtensor_cfg.enabled=true")
    for key, val, ok, why in (
        ("sequence_parallel", d.sequence_parallel, False, "sequence parallelism is not implemented"),
        ("context_parallel_size", d.context_parallel_size, 1, "context parallelism is not implemented"),
        ("custom_parallel_plan", d.custom_parallel_plan, None, "custom parallel plans are not supported"),
    ):
        if val != ok:
            raise config_error(f"{prefix}.dtensor_cfg.{key}", value=val, problem=why,
                               fix=f"set {prefix}.dtensor_cfg.{key}={'null' if ok is None else ok}")
    if m.sequence_packing.enabled:
        raise config_error(f"{prefix}.sequence_packing.enabled", value=True,
                           problem="sequence packing is not implemented by Sluice",
                           fix=f"set {prefix}.sequence_packing.enabled=false and use "
                           f"{prefix}.dynamic_batching.enabled=true (token-budget micro-batches)")
    for key in ("train_global_batch_size", "train_micro_batch_size", "logprob_batch_size",
                "max_total_sequence_length", "make_sequence_length_divisible_by"):
        if getattr(m, key) < 1:
            raise config_error(f"{prefix}.{key}", value=getattr(m, key),
                               problem="must be at least 1", fix=f"set {prefix}.{key}>=1")
    if m.logprob_chunk_size is not None and m.logprob_chunk_size < 1:
        raise config_error(f"{prefix}.logprob_chunk_size", value=m.logprob_chunk_size,
                           problem="must be at least 1", fix="set a positive chunk size or null")


def _check_student_and_teacher(cfg: SluiceConfig) -> None:
    _check_model_side("policy", cfg.policy)
    _check_model_side("teacher", cfg.teacher)
    tp = cfg.policy.dtensor_cfg.tensor_parallel_size
    if tp != 1:
        raise config_error("policy.dtensor_cfg.tensor_parallel_size", value=tp,
                           problem="Sluice shards the student with FSDP2 over all training GPUs; "
                           "tensor parallelism in training is not implemented",
                           fix="set policy.dtensor_cfg.tensor_parallel_size=1")


def _check_optimizer(cfg: SluiceConfig) -> None:
    o = cfg.policy.optimizer
    if o.name not in get_args(OptimizerName):
        raise config_error("policy.optimizer.name", value=o.name, problem="unsupported optimizer",
                           fix="use torch.optim.AdamW")
    milestones = [s for s in cfg.policy.scheduler if "milestones" in s]
    scheds = [s for s in cfg.policy.scheduler if "name" in s]
    for s in scheds:
        if not str(s["name"]).startswith("torch.optim.lr_scheduler."):
            raise config_error("policy.scheduler", value=s["name"],
                               problem="schedulers must be torch.optim.lr_scheduler classes",
                               fix="use e.g. torch.optim.lr_scheduler.LinearLR")
    if len(scheds) > 1 and (len(milestones) != 1 or
                            len(milestones[0]["milestones"]) != len(scheds) - 1):
        raise config_error("policy.scheduler", value=None,
                           problem=f"{len(scheds)} schedulers need one {{milestones: [...]}} entry "
                           f"with {len(scheds) - 1} milestone(s)",
                           fix="add e.g. `- milestones: [10]` after the schedulers")


def _check_batch_arithmetic(cfg: SluiceConfig, plan: Plan) -> None:
    """A step's samples split into whole optimizer batches, each into whole micro-batches on
    every training rank."""
    d = cfg.distillation
    samples = d.num_prompts_per_step * d.num_generations_per_prompt
    gbs = cfg.policy.train_global_batch_size
    if samples % gbs:
        raise config_error("policy.train_global_batch_size", value=gbs,
                           problem=f"must divide the samples of a step (num_prompts_per_step x "
                           f"num_generations_per_prompt = {samples})",
                           fix=f"choose a divisor of {samples}")
    ranks = plan.roles["training"].total_gpus
    if gbs % ranks:
        raise config_error("policy.train_global_batch_size", value=gbs,
                           problem=f"must be divisible by the training ranks ({ranks})",
                           fix=f"use a multiple of {ranks}")


def _check_generation(cfg: SluiceConfig) -> None:
    """The student's sampling settings, and sequence lengths against the student's."""
    p, g = cfg.policy, cfg.policy.generation
    _check_choice("policy.generation.backend", g.backend, GenerationBackend)
    v = g.vllm_cfg
    _check_choice("policy.generation.vllm_cfg.precision", v.precision, Precision)
    for key, val, ok in (("pipeline_parallel_size", v.pipeline_parallel_size, 1),
                         ("expert_parallel_size", v.expert_parallel_size, 1),
                         ("use_deep_gemm", v.use_deep_gemm, False),
                         ("num_last_layers_in_bf16", v.num_last_layers_in_bf16, 0),
                         ("num_first_layers_in_bf16", v.num_first_layers_in_bf16, 0),
                         ("async_engine", v.async_engine, False)):
        if val != ok:
            raise config_error(f"policy.generation.vllm_cfg.{key}", value=val,
                               problem="not supported by Sluice's generation worker",
                               fix=f"set policy.generation.vllm_cfg.{key}={ok}")
    if v.max_model_len < p.max_total_sequence_length:
        raise config_error("policy.generation.vllm_cfg.max_model_len", value=v.max_model_len,
                           problem="shorter than policy.max_total_sequence_length "
                           f"({p.max_total_sequence_length}): long answers would be cut by vLLM "
                           "but trained as if complete",
                           fix=f"set policy.generation.vllm_cfg.max_model_len>="
                           f"{p.max_total_sequence_length} or lower policy.max_total_sequence_length")
    if g.max_new_tokens < 1:
        raise config_error("policy.generation.max_new_tokens", value=g.max_new_tokens,
                           problem="must be at least 1", fix="set max_new_tokens>=1")
    if g.temperature <= 0:
        raise config_error("policy.generation.temperature", value=g.temperature,
                           problem="must be > 0: it also divides the student's logits in the loss",
                           fix="set a positive temperature (e.g. 1.0)")
    tg = cfg.teacher.generation
    if tg is not None and not tg.temperature > 0:
        raise config_error("teacher.generation.temperature", value=tg.temperature,
                           problem="must be > 0: the teacher divides its logits by it",
                           fix="set a positive temperature, or teacher.generation=null (no scaling)")
    if not 0 < g.top_p <= 1:
        raise config_error("policy.generation.top_p", value=g.top_p, problem="must be in (0, 1]",
                           fix="set top_p in (0, 1]")
    if not 0 < v.gpu_memory_utilization <= 1:
        raise config_error("policy.generation.vllm_cfg.gpu_memory_utilization",
                           value=v.gpu_memory_utilization, problem="must be in (0, 1]",
                           fix="set a fraction such as 0.6")
    if cfg.teacher.max_total_sequence_length < p.max_total_sequence_length and not \
            cfg.distillation.context_distillation.enabled:
        raise config_error("teacher.max_total_sequence_length",
                           value=cfg.teacher.max_total_sequence_length,
                           problem="shorter than policy.max_total_sequence_length "
                           f"({p.max_total_sequence_length}): the teacher must score the whole "
                           "student sequence", fix="raise teacher.max_total_sequence_length")


def _check_data(data: DataConfig) -> None:
    if data.train.dataset_name is None and data.train.data_path is None:
        raise config_error("data.train.dataset_name", value=None,
                           problem="no training data", fix="set data.train.dataset_name or "
                           "data.train.data_path")
    _check_prompt_file("data.default.prompt_file", data.default.prompt_file, True)
    _check_prompt_file("data.default.system_prompt_file", data.default.system_prompt_file, False)
    for name in ("train", "validation"):
        ds = getattr(data, name)
        _check_prompt_file(f"data.{name}.prompt_file", ds.prompt_file, True)
        _check_prompt_file(f"data.{name}.system_prompt_file", ds.system_prompt_file, False)
    _check_choice("data.default.env_name", data.default.env_name, EnvName)


def _check_template(cfg: SluiceConfig) -> None:
    key = "distillation.context_distillation.teacher_prefix_template"
    t = cfg.distillation.context_distillation.teacher_prefix_template
    try:
        fields = _fields(t)
    except ValueError as e:
        raise config_error(key, value=t, problem=f"not a valid format string ({e})",
                           fix="write literal braces as {{ }}")
    missing = [f for f in ("problem", "trace") if f not in fields]
    extra = sorted(set(fields) - {"problem", "trace"})
    if missing or extra:
        problem = []
        if missing:
            problem.append("missing " + " and ".join("{%s}" % m for m in missing))
        if extra:
            problem.append("unknown placeholders " + ", ".join("{%s}" % e for e in extra))
        raise config_error(key, value=t, problem="the template must contain {problem} and "
                           "{trace} and no other placeholder: " + "; ".join(problem),
                           fix="use {problem} and {trace}; write literal braces as {{ }}")


def _check_logger(logger: LoggerConfig) -> None:
    for key in ("mlflow_enabled", "swanlab_enabled"):
        if getattr(logger, key):
            raise config_error(f"logger.{key}", value=True,
                               problem="Sluice logs to wandb and TensorBoard only",
                               fix=f"set logger.{key}=false")
    _check_choice("logger.wandb.mode", logger.wandb.mode, WandbMode, nullable=True)


def _check_checkpointing(ck: CheckpointingConfig) -> None:
    if ck.checkpoint_dir is not None:
        raise config_error("checkpointing.checkpoint_dir", value=ck.checkpoint_dir,
                           problem="checkpoints are always RUN_DIR/checkpoints: the run directory "
                                   "holds everything a resume, launch.inspect and launch.resubmit read",
                           fix="set checkpointing.checkpoint_dir=null and put the run directory "
                               "where the checkpoints should go (launch.run_dir=...)")
    if ck.checkpoint_must_save_by is not None:
        raise config_error("checkpointing.checkpoint_must_save_by", value=ck.checkpoint_must_save_by,
                           problem="Sluice checkpoints on Slurm's pre-timeout signal instead",
                           fix="set checkpointing.checkpoint_must_save_by=null")
    _check_choice("checkpointing.model_save_format", ck.model_save_format, ModelSaveFormat)
    if ck.save_period < 1:
        raise config_error("checkpointing.save_period", value=ck.save_period,
                           problem="must be at least 1", fix="set checkpointing.save_period>=1")
    if ck.keep_weights_period is not None and ck.keep_weights_period < 1:
        raise config_error("checkpointing.keep_weights_period", value=ck.keep_weights_period,
                           problem="must be at least 1 or null",
                           fix="set checkpointing.keep_weights_period=null (keep only what the run "
                               "needs) or a period >= 1")


def _check_launch(launch: LaunchConfig) -> None:
    _check_choice("launch.executor", launch.executor, ExecutorKind)
    if launch.max_retries < 0:
        raise config_error("launch.max_retries", value=launch.max_retries,
                           problem="must be >= 0", fix="set launch.max_retries>=0")
    if launch.retry_refill_steps < 1:
        raise config_error("launch.retry_refill_steps", value=launch.retry_refill_steps,
                           problem="must be at least 1", fix="set launch.retry_refill_steps>=1")


def _minutes(limit: str) -> int:
    return minutes(limit)


_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
_SLURM_WORD = re.compile(r"[^\s'\"\\]+")


def _check_cluster(cl: ClusterConfig) -> None:
    """The Slurm keys: each value becomes an #SBATCH line, so it must be one word."""
    for key, value in (("cluster.time_limit", cl.time_limit),
                       ("cluster.coordinator.time_limit", cl.coordinator.time_limit)):
        if not _SLURM_TIME.fullmatch(str(value)):
            raise config_error(key, value=value, problem="not a Slurm time",
                               fix=f"write HH:MM:SS or D-HH:MM:SS, e.g. {key}=04:00:00")
    for name in ("partition", "account", "qos", "gpu_type", "reservation", "constraint",
                 "exclude", "nodelist"):
        value = getattr(cl, name)
        if value is not None and not _SLURM_WORD.fullmatch(str(value)):
            raise config_error(f"cluster.{name}", value=value,
                               problem="must be one word (no spaces, quotes or backslashes)",
                               fix=f"give the Slurm value as sbatch takes it, e.g. "
                               f"cluster.{name}=NAME, or null")
    for name in ("partition", "account", "qos"):
        value = getattr(cl.coordinator, name)
        if value is not None and not _SLURM_WORD.fullmatch(str(value)):
            raise config_error(f"cluster.coordinator.{name}", value=value,
                               problem="must be one word (no spaces, quotes or backslashes)",
                               fix=f"cluster.coordinator.{name}=NAME, or null")
    if cl.gpu_type is not None and ":" in cl.gpu_type:
        raise config_error("cluster.gpu_type", value=cl.gpu_type,
                           problem="is the GPU type alone (Sluice adds gpu: and the count)",
                           fix="e.g. cluster.gpu_type=a100 for --gres=gpu:a100:4")
    limit_s = 60 * _minutes(cl.time_limit)
    if not 10 <= cl.signal_delay_s < limit_s:
        raise config_error("cluster.signal_delay_s", value=cl.signal_delay_s,
                           problem=f"must be at least 10 and less than cluster.time_limit "
                           f"({cl.time_limit} = {limit_s}s): it is how long before the limit "
                           "the workers are told to stop",
                           fix="lower cluster.signal_delay_s or raise cluster.time_limit")
    for key, value in (("cluster.cpus_per_gpu", cl.cpus_per_gpu),
                       ("cluster.coordinator.cpus", cl.coordinator.cpus)):
        if value < 1:
            raise config_error(key, value=value, problem="must be at least 1", fix=f"set {key}>=1")
    for key, value in (("cluster.mem_per_gpu_gb", cl.mem_per_gpu_gb),
                       ("cluster.coordinator.mem_gb", cl.coordinator.mem_gb)):
        if value is not None and value < 1:
            raise config_error(key, value=value, problem="must be at least 1 (GB), or null",
                               fix=f"set {key} to a size in GB, or null")
    if not cl.exclusive and cl.mem_per_gpu_gb is None:
        raise config_error("cluster.mem_per_gpu_gb", value=None,
                           problem="cluster.exclusive=false: jobs share their nodes, so each must "
                           "ask for its memory (the partition's default is often far too small "
                           "to load a model)",
                           fix="set cluster.mem_per_gpu_gb (e.g. a node's memory / its GPUs), or "
                           "cluster.exclusive=true")
    for key, items in (("cluster.sbatch_args", cl.sbatch_args),
                       ("cluster.coordinator.sbatch_args", cl.coordinator.sbatch_args)):
        try:
            sbatch.parse(key, list(items))
        except sbatch.SbatchArgError as e:
            raise config_error(key, value=list(items), problem=e.problem, fix=e.fix) from None
    # The GPU memory estimate itself is check_memory's, the last step of validate.
    _check_choice("cluster.memory_check", cl.memory_check, MemoryCheck)


def _check_queue(q: QueueConfig) -> None:
    _check_choice("queue.compression", q.compression, Compression, nullable=True)
    if q.heartbeat_s <= 0 or q.lease_s <= 2 * q.heartbeat_s:
        raise config_error("queue.lease_s", value=q.lease_s,
                           problem=f"must exceed twice queue.heartbeat_s ({q.heartbeat_s}) "
                           "so a live worker's claim is never taken as stale",
                           fix="raise queue.lease_s or lower queue.heartbeat_s")
    if not 0 < q.fast_poll_s <= q.poll_s:
        raise config_error("queue.fast_poll_s", value=q.fast_poll_s,
                           problem=f"must be above 0 and at most queue.poll_s ({q.poll_s})",
                           fix="set queue.fast_poll_s between 0.01 and queue.poll_s")


def _check_models(cfg: SluiceConfig, required: bool) -> None:
    found = {}
    for key, name in (("policy.model_name", cfg.policy.model_name),
                      ("teacher.model_name", cfg.teacher.model_name)):
        path = find_model(name)
        if path is None and required:
            raise config_error(key, value=name, problem="model not found in the Hugging Face "
                               "cache (HF_HOME) or as a local path; Sluice never downloads on "
                               "compute nodes",
                               fix=f"on a login node run `huggingface-cli download {name}`, or "
                               "give a local path")
        found[key] = path
    if all(found.values()):
        a = tokenizer_fingerprint(cfg.policy.tokenizer.name or cfg.policy.model_name)
        b = tokenizer_fingerprint(cfg.teacher.tokenizer.name or cfg.teacher.model_name)
        if a is not None and b is not None and a != b:
            raise config_error("teacher.model_name", value=cfg.teacher.model_name,
                               problem="the teacher's tokenizer differs from the student's, so "
                               "teacher top-k ids would not be the student's tokens",
                               fix="use a teacher of the same model family (same tokenizer)")


# ------------------------------------------------------------------------------------------ helpers


def _check_choice(key: str, value, choice, nullable: bool = False) -> None:
    """`value` must be one of the Literal alias `choice`'s values (or None when nullable)."""
    allowed = ((None,) if nullable else ()) + get_args(choice)
    if value not in allowed:
        raise config_error(key, value=value, problem="unsupported value",
                           fix=f"use one of: {', '.join(map(str, allowed))}")


def _fields(template: str) -> List[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def _check_prompt_file(key: str, value: Optional[str], placeholder: bool) -> None:
    if value is None:
        return
    path = resolve_path(value)
    if path is None or not path.is_file():
        raise config_error(key, value=value, problem="file not found (looked in the working "
                           f"directory and {REPO_ROOT})",
                           fix=f"point {key} to an existing text file, or null")
    if not placeholder:
        return
    text = path.read_text()
    try:
        fields = _fields(text)
    except ValueError as e:
        raise config_error(key, value=value, problem=f"not a valid format string ({e})",
                           fix="write the problem placeholder as {} and literal braces as {{ }}")
    if fields != [""]:
        raise config_error(key, value=value,
                           problem=f"the prompt must contain exactly one {{}} placeholder where "
                           f"the problem goes; found {len(fields)} placeholder(s) {fields}",
                           fix="keep one {} and write literal braces as {{ }} (e.g. \\boxed{{}})")

"""The typed config tree of a Sluice run.

    python -m launch.run conf=qwen3-14b-4b launch.dry_run=true      # print resolved config + plan
    python -m launch.run conf=smoke distillation.max_num_steps=5

One dataclass tree, registered with Hydra's ConfigStore as `sluice_schema`; the YAML recipes in
`conf/` only override it. Key names follow the runbook's (NeMo-RL) configs so that users keep
their vocabulary; Sluice's own settings live under `launch` and `queue`.

This module must stay importable without torch or vLLM: the coordinator and the launcher use
it on login nodes.

Keys the runbook's configs carry that Sluice has no use for are listed in `REFUSED_KEYS` with
the reason; they fail at load time with that reason instead of being silently ignored. Keys
accepted only so that those configs load are listed in `COMPATIBILITY_ONLY`.

A key with a fixed set of values is annotated `Annotated[str, <Literal alias>]`, the alias
defined below: the one list of its values. `shared.config_check.validate` checks the key against
`typing.get_args(alias)` before anything is submitted; workers only assert. (OmegaConf 2.3
refuses `Literal` field types, and an Enum would change the values the code reads and the
error a bad value gives; `typing.get_type_hints` drops the `Annotated` part, so OmegaConf
sees `str`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Literal, Optional

from omegaconf import II, MISSING

# The allowed values of each fixed-choice key (see the module docstring).
Precision = Literal["bfloat16", "float16", "float32"]
"""policy.precision, teacher.precision, policy.generation.vllm_cfg.precision."""
KLType = Literal["forward", "reverse", "mixed", "jsd", "sampled_reverse"]
"""loss_fn.kl_type (README: The loss)."""
GenerationBackend = Literal["vllm"]
"""policy.generation.backend."""
OptimizerName = Literal["torch.optim.AdamW", "AdamW"]
"""policy.optimizer.name."""
EnvName = Literal["math"]
"""data.default.env_name."""
ModelSaveFormat = Literal["safetensors"]
"""checkpointing.model_save_format."""
WandbMode = Literal["online", "offline", "disabled", "shared", "dryrun", "run"]
"""logger.wandb.mode (or null): the modes wandb.init accepts."""
MemoryCheck = Literal["refuse", "warn", "off"]
"""cluster.memory_check."""
ExecutorKind = Literal["auto", "slurm", "local", "allocation"]
"""launch.executor."""
Compression = Literal["zstd"]
"""queue.compression (or null)."""
# distillation.context_distillation.* (V1); checked only when context distillation is enabled.
ContextMode = Literal["self_frozen"]
ProblemSource = Literal["original_user_problem"]
Alignment = Literal["response_token_index"]
OverflowPolicy = Literal["truncate_prefix_only", "truncate_prefix_from_end", "shorten_trace"]
"""distillation.context_distillation.overflow_policy: the fork's two, then Sluice's own."""
FrozenTeacherSource = Literal["base_model"]
TraceSource = Literal["dynamic", "static_dataset"]
TraceType = Literal["think_tag"]
TraceSelection = Literal["first"]
MissingTracePolicy = Literal["empty", "drop_sample"]


@dataclass
class TokenizerConfig:
    name: Optional[str] = None
    """Tokenizer to load (HF id or path). null: the model's own tokenizer."""
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    """Extra keyword arguments for `apply_chat_template`, e.g. {enable_thinking: true}."""


@dataclass
class DTensorConfig:
    enabled: bool = True
    """Must be true: Sluice trains and scores with FSDP2 (DTensor) only."""
    _v2: bool = True
    """Accepted for compatibility with the runbook's configs; Sluice always uses FSDP2."""
    cpu_offload: bool = False
    """Offload parameters and optimizer state to CPU (FSDP2 CPUOffloadPolicy)."""
    sequence_parallel: bool = False
    """Not supported by Sluice; must be false."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass to save memory."""
    tensor_parallel_size: int = 1
    """GPUs per model replica. Training: must divide the training role's GPUs. Teacher: the
    number of GPUs one teacher task shards the model over (the teacher role has
    role GPUs / tensor_parallel_size tasks)."""
    context_parallel_size: int = 1
    """Not supported by Sluice yet; must be 1."""
    custom_parallel_plan: Optional[str] = None
    """Not supported by Sluice; must be null."""


@dataclass
class BatchingConfig:
    enabled: bool = False
    """Pack micro-batches by a token budget instead of a fixed number of sequences."""
    train_mb_tokens: Optional[int] = None
    """Token budget of one training micro-batch. null: max_total_sequence_length * train_micro_batch_size."""
    logprob_mb_tokens: Optional[int] = None
    """Token budget of one teacher scoring batch. null: max_total_sequence_length * logprob_batch_size."""
    sequence_length_round: int = 64
    """Pad each packed batch's length to a multiple of this."""


@dataclass
class SequencePackingConfig(BatchingConfig):
    algorithm: str = "modified_first_fit_decreasing"
    """Accepted for compatibility: Sluice does not implement sequence packing yet (enabled must
    be false)."""


@dataclass
class OptimizerConfig:
    name: Annotated[str, OptimizerName] = "torch.optim.AdamW"
    """Optimizer class. Sluice supports torch.optim.AdamW."""
    kwargs: Dict[str, Any] = field(
        default_factory=lambda: {
            "lr": 2.0e-5,
            "weight_decay": 0.01,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "foreach": False,
            "fused": False,
        }
    )
    """Keyword arguments of the optimizer."""


def _default_scheduler() -> List[Any]:
    return [
        {"name": "torch.optim.lr_scheduler.LinearLR",
         "kwargs": {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 10}},
        {"name": "torch.optim.lr_scheduler.ConstantLR",
         "kwargs": {"factor": 1.0, "total_iters": 10000000000}},
        {"milestones": [10]},
    ]


@dataclass
class ResourcesConfig:
    gpus_per_node: Optional[int] = None
    """GPUs per node for generation when it is not colocated (runbook semantics)."""
    num_nodes: Optional[int] = None
    """Nodes for generation when it is not colocated (runbook semantics)."""


@dataclass
class ColocatedConfig:
    enabled: bool = False
    """Generation shares training's GPUs. Sluice runs generation as its own Slurm job, so this
    must be false."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Generation's resources when not colocated and without resource_isolation; overrides
    distillation.resource_isolation.roles.generation when set."""


@dataclass
class VllmConfig:
    async_engine: bool = False
    """Accepted for compatibility; Sluice's generation worker uses the synchronous LLM engine."""
    precision: Annotated[str, Precision] = II("...precision")
    """Weight dtype of the engine (bfloat16, float16, float32)."""
    kv_cache_dtype: str = "auto"
    """vLLM kv_cache_dtype."""
    tensor_parallel_size: int = 1
    """GPUs per vLLM engine; generation runs role GPUs / tensor_parallel_size engines."""
    pipeline_parallel_size: int = 1
    """Must be 1 in Sluice."""
    expert_parallel_size: int = 1
    """Must be 1 in Sluice (Qwen3 dense models)."""
    gpu_memory_utilization: float = 0.6
    """Fraction of GPU memory vLLM may take."""
    max_model_len: int = II("...max_total_sequence_length")
    """Longest prompt + answer the engine accepts; must be >= max_total_sequence_length."""
    enforce_eager: bool = False
    """Disable CUDA graphs."""
    use_deep_gemm: bool = False
    """Accepted for compatibility; must be false."""
    num_last_layers_in_bf16: int = 0
    """Accepted for compatibility; must be 0."""
    num_first_layers_in_bf16: int = 0
    """Accepted for compatibility; must be 0."""
    distributed_executor_backend: Optional[str] = None
    """vLLM executor backend (null: vLLM's default; 'uni' runs in-process)."""


@dataclass
class GenerationConfig:
    backend: Annotated[str, GenerationBackend] = "vllm"
    """Must be vllm."""
    max_new_tokens: int = II("..max_total_sequence_length")
    """Most tokens sampled per answer."""
    temperature: float = 1.0
    """Sampling temperature. The student's: it also divides the student's logits in the loss.
    The teacher's (teacher.generation, null by default): when set, the teacher's logits are
    divided by it when scoring; when null they are not scaled (the fork's behaviour)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: Optional[int] = None
    """Top-k sampling (null: off)."""
    stop_token_ids: Optional[List[int]] = None
    """Extra stop token ids (the tokenizer's EOS always stops)."""
    stop_strings: Optional[List[str]] = None
    """Stop strings."""
    vllm_cfg: VllmConfig = field(default_factory=VllmConfig)
    """vLLM engine settings."""
    colocated: ColocatedConfig = field(default_factory=ColocatedConfig)
    """Colocation with training (must be disabled in Sluice)."""


@dataclass
class PolicyConfig:
    model_name: str = MISSING
    """Hugging Face id (resolved from the local cache, never downloaded at run time), a local
    path, or `tiny:student` / `tiny:teacher` for the built-in tiny models."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer settings."""
    train_global_batch_size: int = 64
    """Samples per optimizer step, across all training ranks."""
    train_micro_batch_size: int = 1
    """Samples per forward/backward on one rank."""
    generation_batch_size: int = 64
    """Prompts submitted to one vLLM engine at once."""
    logprob_batch_size: int = 1
    """Sequences per teacher forward (when dynamic batching is off)."""
    max_total_sequence_length: int = 8192
    """Longest prompt + response; teacher: longest teacher prompt + response."""
    precision: Annotated[str, Precision] = "bfloat16"
    """Compute dtype on GPU: bfloat16, float16 or float32 (CPU runs always use float32)."""
    logprob_chunk_size: Optional[int] = None
    """Positions per chunk when computing full-vocabulary log-softmax and top-k (null: 1024)."""
    dtensor_cfg: DTensorConfig = field(default_factory=DTensorConfig)
    """FSDP2 settings."""
    dynamic_batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Token-budget micro-batching."""
    sequence_packing: SequencePackingConfig = field(default_factory=SequencePackingConfig)
    """Sequence packing (not implemented by Sluice: must stay disabled)."""
    max_grad_norm: Optional[float] = 1.0
    """Gradient clipping norm (null: no clipping)."""
    make_sequence_length_divisible_by: int = 1
    """Pad sequence lengths to a multiple of this."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    scheduler: List[Any] = field(default_factory=_default_scheduler)
    """LR schedulers run in sequence (runbook format: a list of {name, kwargs} and one
    {milestones: [...]} entry)."""
    generation: Optional[GenerationConfig] = field(default_factory=GenerationConfig)
    """Sampling settings (the student's; null for the teacher)."""


@dataclass
class TraceExtractorConfig:
    type: Annotated[str, TraceType] = "think_tag"
    """Only think_tag: the trace is a <think>...</think> span."""
    selection: Annotated[str, TraceSelection] = "first"
    """Only first: the first span."""
    missing_trace_policy: Annotated[str, MissingTracePolicy] = "empty"
    """empty: the trace is ''; drop_sample: the sample gets no loss."""


@dataclass
class StaticTraceConfig:
    answer_column: Optional[str] = None
    """Dataset column holding the trace text when trace_source=static_dataset."""


@dataclass
class ContextMetricsConfig:
    enabled: bool = True
    """Log the context_distillation_* metrics each step."""


@dataclass
class ContextDistillationConfig:
    enabled: bool = False
    """Turn on context/self-distillation: the teacher is a frozen copy of the student that sees
    a privileged prefix."""
    mode: Annotated[str, ContextMode] = "self_frozen"
    """Only self_frozen (V1)."""
    problem_source: Annotated[str, ProblemSource] = "original_user_problem"
    """Only original_user_problem (V1): {problem} is the dataset's raw problem text."""
    teacher_prefix_template: str = (
        "You are given a problem and a trace: {problem} + {trace}. Solve it on your own."
    )
    """The teacher's single user message; must contain {problem} and {trace}."""
    alignment: Annotated[str, Alignment] = "response_token_index"
    """Only response_token_index (V1)."""
    overflow_policy: Annotated[str, OverflowPolicy] = "truncate_prefix_only"
    """What to do when the rendered teacher prompt + response exceed
    teacher.max_total_sequence_length (the prompt's budget is that length minus the
    response's). truncate_prefix_only (the fork's default): keep the prompt's last budget
    tokens; truncate_prefix_from_end (the fork's): keep its first budget tokens;
    shorten_trace (Sluice's): cut the trace from its end and re-render, so the chat template
    stays whole (a sample that does not fit with an empty trace is dropped). A response
    that fills the whole length is dropped under every policy."""
    frozen_teacher_source: Annotated[str, FrozenTeacherSource] = "base_model"
    """Only base_model: the teacher is the student's initial weights."""
    trace_source: Annotated[str, TraceSource] = "dynamic"
    """dynamic: the student's own response; static_dataset: a dataset column."""
    static_trace: StaticTraceConfig = field(default_factory=StaticTraceConfig)
    """Where a static trace comes from."""
    trace_extractor: TraceExtractorConfig = field(default_factory=TraceExtractorConfig)
    """How the trace is taken from its source text."""
    metrics: ContextMetricsConfig = field(default_factory=ContextMetricsConfig)
    """Metrics switch."""


@dataclass
class RoleResources:
    num_nodes: int = 1
    """Nodes of this role."""
    gpus_per_node: int = 8
    """GPUs per node of this role."""


@dataclass
class RolesConfig:
    training: RoleResources = field(default_factory=RoleResources)
    """The training job (one torchrun job over its nodes)."""
    generation: RoleResources = field(default_factory=RoleResources)
    """Generation (one vLLM engine per vllm_cfg.tensor_parallel_size GPUs)."""
    teacher: RoleResources = field(default_factory=RoleResources)
    """The teacher (one replica per teacher.dtensor_cfg.tensor_parallel_size GPUs)."""


@dataclass
class ResourceIsolationConfig:
    enabled: bool = False
    """Each role gets whole nodes of its own (roles' nodes must add up to cluster.num_nodes)."""
    teacher_resident_on_gpu: bool = True
    """Keep the teacher loaded between steps (Sluice's teacher workers always do: must be true)."""
    roles: RolesConfig = field(default_factory=RolesConfig)
    """Resources of each role. Also used without isolation, where roles may share nodes."""


@dataclass
class DistillationConfig:
    num_prompts_per_step: int = 128
    """Prompts per distillation step."""
    num_generations_per_prompt: int = 1
    """Answers sampled per prompt."""
    max_rollout_turns: int = 1
    """Only 1 (single-turn math)."""
    max_num_steps: int = 1000
    """Stop after this many steps."""
    max_num_epochs: int = 10
    """Stop after this many passes over the training data."""
    val_batch_size: int = 64
    """Validation prompts per generation call."""
    val_period: int = 20
    """Validate every this many steps (0: never)."""
    val_at_start: bool = False
    """Validate before the first step."""
    val_at_end: bool = False
    """Validate after the last step."""
    max_val_samples: int = 512
    """Most validation prompts used."""
    topk_logits_k: int = 64
    """Teacher top-k stored per response token."""
    seed: int = 42
    """Seed of data order and sampling."""
    max_staleness: int = 0
    """0: generation of step t uses weights of step t-1 (on-policy). 1: generation may run one
    step ahead, overlapping teacher scoring and training."""
    context_distillation: ContextDistillationConfig = field(default_factory=ContextDistillationConfig)
    """Context/self-distillation."""
    resource_isolation: ResourceIsolationConfig = field(default_factory=ResourceIsolationConfig)
    """How roles are placed on nodes."""


@dataclass
class LossConfig:
    kl_type: Annotated[str, KLType] = "mixed"
    """forward, reverse, mixed (NeMo-RL's, over the teacher's top-k); jsd (GKD's generalized
    Jensen-Shannon divergence over the top-k); sampled_reverse (the sampled-token reverse KL
    of on-policy distillation: no top-k, the teacher scores only the sampled token)."""
    mixed_kl_weight: float = 0.5
    """Weight of the forward KL when kl_type=mixed."""
    jsd_beta: float = 0.5
    """kl_type=jsd: the interpolation beta in (0, 1); the mixture is beta * teacher +
    (1 - beta) * student (GKD's convention; near 0 it behaves like forward KL, near 1 like
    reverse KL)."""
    zero_outside_topk: bool = False
    """Normalise the student over the full vocabulary; reverse/mixed add the tail term, jsd its
    exact tail (the teacher is zero outside its top-k). Not used by sampled_reverse, which
    always normalises over the full vocabulary."""

    @property
    def scores_sampled_token(self) -> bool:
        """The teacher scores only each sampled token (one log-prob per token, no top-k)."""
        return self.kl_type == "sampled_reverse"

    @property
    def full_vocab_student(self) -> bool:
        """The loss needs the student's full-vocabulary normaliser."""
        return self.zero_outside_topk or self.scores_sampled_token

    def teacher_k(self, topk_logits_k: int) -> int:
        """Entries the teacher stores per response token."""
        return 1 if self.scores_sampled_token else topk_logits_k


@dataclass
class CheckpointingConfig:
    enabled: bool = True
    """Write full training checkpoints."""
    checkpoint_dir: Optional[str] = None
    """Must be null: checkpoints are RUN_DIR/checkpoints (a run directory holds everything a
    resume, launch.inspect and launch.resubmit need)."""
    metric_name: str = "val:accuracy"
    """Metric that ranks checkpoints for keep_top_k ('val:' or 'train:' + metric)."""
    higher_is_better: bool = True
    """Direction of metric_name."""
    keep_top_k: Optional[int] = 3
    """Checkpoints kept (the latest is always kept). null: all."""
    save_period: int = 10
    """Checkpoint every this many steps (and at the end)."""
    keep_weights_period: Optional[int] = None
    """weights/<step> (the student in HF format after each step, for generation) is pruned to
    what generation, validation and a resume still need, plus the steps of kept checkpoints
    and the last step. Set N to also keep every N-th step's weights; null: no others."""
    checkpoint_must_save_by: Optional[str] = None
    """Not supported: Sluice handles Slurm's pre-timeout signal instead; must be null."""
    model_save_format: Annotated[str, ModelSaveFormat] = "safetensors"
    """Only safetensors."""
    save_consolidated: bool = False
    """At the end of the run, publish the final student in Hugging Face format (safetensors in
    the base model's dtype, config and tokenizer) as RUN_DIR/final."""


@dataclass
class DatasetConfig:
    dataset_name: Optional[str] = None
    """A known dataset name (DeepScaler, OpenMathInstruct-2, AIME2024, OpenThoughts-114k,
    ResponseDataset, synthetic_arithmetic) or null."""
    data_path: Optional[str] = None
    """A local json/jsonl/parquet file or HF dataset directory (overrides the name's default)."""
    subset: Optional[str] = None
    """HF dataset configuration name, e.g. metadata for OpenThoughts-114k."""
    split: Optional[str] = None
    """Split to read (null: the dataset's default)."""
    input_key: Optional[str] = None
    """Column holding the problem (null: the dataset's default)."""
    output_key: Optional[str] = None
    """Column holding the ground-truth answer (null: the dataset's default)."""
    filter_column: Optional[str] = None
    """Keep only rows where this column equals filter_value."""
    filter_value: Optional[str] = None
    """Value kept by filter_column."""
    split_validation_size: int = 0
    """Rows held out of train for validation when no validation dataset is given."""
    seed: int = 42
    """Seed of the held-out split."""
    repeat: int = 1
    """Repeat each row this many times (validation)."""
    prompt_file: Optional[str] = None
    """Overrides data.default.prompt_file for this dataset."""
    system_prompt_file: Optional[str] = None
    """Overrides data.default.system_prompt_file for this dataset."""
    processor: Optional[str] = None
    """Accepted for compatibility: Sluice has one math processor."""
    env_name: Optional[str] = None
    """Accepted for compatibility: Sluice's only environment is math."""


@dataclass
class DataDefaults:
    prompt_file: Optional[str] = "prompts/cot.txt"
    """Student prompt wrapper with one {} where the problem goes (null: the raw problem)."""
    system_prompt_file: Optional[str] = None
    """System prompt text file (null: no system message)."""
    env_name: Annotated[str, EnvName] = "math"
    """Only math."""
    processor: str = "math_hf_data_processor"
    """Accepted for compatibility: Sluice has one math processor."""


@dataclass
class DataConfig:
    max_input_seq_length: int = II("policy.max_total_sequence_length")
    """Prompts longer than this (tokens) are skipped and counted."""
    shuffle: bool = True
    """Shuffle the training data each epoch (seeded by distillation.seed)."""
    train: DatasetConfig = field(default_factory=DatasetConfig)
    """Training dataset."""
    validation: DatasetConfig = field(default_factory=DatasetConfig)
    """Validation dataset. dataset_name and data_path both null: none (then the rows held out
    of train by data.train.split_validation_size, if any)."""
    default: DataDefaults = field(default_factory=DataDefaults)
    """Settings shared by the datasets."""


@dataclass
class WandbConfig:
    project: str = "sluice"
    """wandb project."""
    name: Optional[str] = None
    """Run name (null: the run directory's name)."""
    entity: Optional[str] = None
    """wandb entity."""
    mode: Optional[Annotated[str, WandbMode]] = None
    """online, offline, disabled or shared (null: wandb's default / WANDB_MODE)."""


@dataclass
class TensorboardConfig:
    log_dir: Optional[str] = None
    """null: RUN_DIR/tensorboard."""


@dataclass
class GpuMonitoringConfig:
    collection_interval: int = 10
    """Accepted for compatibility (see logger.monitor_gpus)."""
    flush_interval: int = 10
    """Accepted for compatibility (see logger.monitor_gpus)."""


@dataclass
class LoggerConfig:
    log_dir: Optional[str] = None
    """null: RUN_DIR/logs. Accepted for compatibility."""
    num_val_samples_to_print: int = 5
    """Validation answers printed per validation."""
    wandb_enabled: bool = False
    """Log metrics to wandb (WANDB_API_KEY comes from the environment, never the config)."""
    tensorboard_enabled: bool = False
    """Log metrics to TensorBoard."""
    mlflow_enabled: bool = False
    """Not supported: must be false."""
    swanlab_enabled: bool = False
    """Not supported: must be false."""
    monitor_gpus: bool = True
    """Accepted for compatibility: Sluice does not yet sample GPU utilisation and memory per
    worker (launch.dry_run prints the memory plan; make gpu-check measures peak memory)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb settings."""
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    """TensorBoard settings."""
    gpu_monitoring: GpuMonitoringConfig = field(default_factory=GpuMonitoringConfig)
    """GPU monitoring settings."""


@dataclass
class CoordinatorJobConfig:
    """The coordinator's own Slurm job: a small CPU job that runs for the whole run."""

    partition: Optional[str] = None
    """Slurm partition of the coordinator job. null: the cluster's default partition (usually
    a CPU partition; cluster.partition is not used, since it is normally a GPU partition)."""
    account: Optional[str] = None
    """Slurm account. null: cluster.account."""
    qos: Optional[str] = None
    """Slurm QOS. null: none (cluster.qos usually belongs to the GPU partition)."""
    time_limit: str = "04:00:00"
    """Time limit of the coordinator job (HH:MM:SS or D-HH:MM:SS). Before it, the coordinator
    requeues its own job and carries on from RUN_DIR, so any limit works; 4 hours fits the
    partitions of most clusters."""
    cpus: int = 2
    """CPUs of the coordinator job (it tokenizes the data and checks answers)."""
    mem_gb: Optional[int] = 16
    """Memory of the coordinator job in GB (null: the partition's default)."""
    sbatch_args: List[str] = field(default_factory=list)
    """Extra sbatch options for the coordinator job, e.g. ["--comment=sluice"]."""


@dataclass
class ClusterConfig:
    num_nodes: int = 1
    """Nodes of the whole run (all roles). The role jobs together hold exactly this many
    nodes (see README: what Sluice submits)."""
    gpus_per_node: int = 8
    """GPUs per node."""
    partition: Optional[str] = None
    """Slurm partition of the role jobs (null: the cluster's default)."""
    account: Optional[str] = None
    """Slurm account of the role jobs (and of the coordinator unless cluster.coordinator.account)."""
    qos: Optional[str] = None
    """Slurm QOS of the role jobs."""
    time_limit: str = "04:00:00"
    """Time limit of each role job (HH:MM:SS or D-HH:MM:SS). A run outlives any number of
    them: before the limit the job's workers stop cleanly and the coordinator submits its
    replacement (README: time limits and preemption)."""
    signal_delay_s: int = 300
    """Seconds before a job's time limit at which Slurm signals it to stop (--signal=USR2@N):
    enough for the trainer to finish or drop its step and save a checkpoint."""
    cpus_per_gpu: int = 8
    """CPUs requested per GPU; a job's CPUs on a node are split evenly between its tasks
    (and passed to srun explicitly)."""
    mem_per_gpu_gb: Optional[int] = None
    """Memory requested per GPU in GB. null: a job that holds whole nodes (cluster.exclusive)
    asks for all of each node's memory (--mem=0); a shared-node job must set this."""
    exclusive: bool = True
    """Role jobs hold their nodes whole (--exclusive): the run holds exactly
    cluster.num_nodes nodes and no other job shares them. false: jobs ask only for the GPUs,
    CPUs and memory they use (for sites that share nodes between jobs); then
    cluster.mem_per_gpu_gb is required."""
    gpu_type: Optional[str] = None
    """GPU type in the GRES request, e.g. a100 gives --gres=gpu:a100:4 (null: --gres=gpu:4)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GB (2^30 bytes). Each role's estimated peak per GPU is checked
    against it before anything is submitted (shared/memory.py; launch.dry_run prints it)."""
    memory_check: Annotated[str, MemoryCheck] = "refuse"
    """A role whose estimated peak exceeds cluster.gpu_memory_gb: refuse (exit 2 naming the
    keys that fix it), warn (launch anyway), or off (no check)."""
    reservation: Optional[str] = None
    """Slurm reservation of the role jobs."""
    constraint: Optional[str] = None
    """Slurm node feature constraint of the role jobs, e.g. "a100&ib"."""
    exclude: Optional[str] = None
    """Nodes the role jobs must not use (Slurm node list syntax, e.g. "gpu[07,12]")."""
    nodelist: Optional[str] = None
    """Nodes the role jobs must use (Slurm node list syntax). Each role job holds only some of
    the run's nodes, so prefer cluster.exclude or cluster.constraint."""
    sbatch_args: List[str] = field(default_factory=list)
    """Extra sbatch options of every role job for site quirks, e.g. ["--switches=1",
    "--comment=sluice"]. Long form only; options Sluice sets itself are refused."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run before each worker (e.g. module load ...)."""
    coordinator: CoordinatorJobConfig = field(default_factory=CoordinatorJobConfig)
    """The coordinator's own job (partition, account, QOS, time limit, CPUs, memory)."""


@dataclass
class LaunchConfig:
    executor: Annotated[str, ExecutorKind] = "auto"
    """slurm (one Slurm job per role and node group), allocation (the whole run inside one
    allocation: sbatch -N<cluster.num_nodes>, roles as job steps on their own nodes), local, or
    auto (slurm when sbatch is on PATH, else local)."""
    run_dir: Optional[str] = None
    """Run directory (null: runs/<name>-<timestamp>). An existing run directory is resumed."""
    name: Optional[str] = None
    """Run name (null: the recipe name)."""
    dry_run: bool = False
    """Validate, print the resolved config, the partition plan and what would be submitted,
    and exit."""
    detach: bool = True
    """Run the coordinator as its own job (Slurm) or background process (local)."""
    max_retries: int = 3
    """Failures allowed per job before the run stops. Time limits, preemption and requeues
    never count; the count starts again after launch.retry_refill_steps trained steps without
    a failure of that job."""
    retry_refill_steps: int = 10
    """Trained steps after a job's last failure that give it back its full launch.max_retries."""
    share_group: Optional[str] = None
    """Unix group that may read (never write) the run directory. null: the run directory is
    private to its owner (mode 700). Whoever can write to it can run code as you (submitit
    executes the job pickles in logs/), so it is never made group-writable."""


@dataclass
class QueueConfig:
    lease_s: float = 120.0
    """A claim whose heartbeat is older than this is stale and may be broken."""
    heartbeat_s: float = 15.0
    """How often a worker refreshes its claims."""
    poll_s: float = 0.5
    """The longest pause between a waiting worker's (or the coordinator's) looks for new
    shards or weights."""
    fast_poll_s: float = 0.02
    """The shortest pause between looks, used while what a worker waits for is due (its
    producer's claim plus the producer's typical time per shard): hand-offs then take about
    this long without every waiter looking this often (shared/waiting.py)."""
    prompts_per_shard: int = 0
    """Prompts per prompts shard (0: one shard per generation engine)."""
    compression: Optional[Annotated[str, Compression]] = None
    """Compression of the shards workers write: null (default: fastest, a scored shard costs
    6 B per top-k entry) or zstd (whole scored file ~4.6 B per entry at k=64, at about half
    the commit speed on a 2-core node; for filesystems slower than the CPUs). Readers read
    either."""


@dataclass
class SyntheticConfig:
    """Synthetic role workers (bench/synthetic.py), for benchmarks and tests of the pipeline at
    any scale: the real queue protocol (claims, heartbeats, commits, weights versions, STOP)
    around sleeps, with shards of the real schemas and made-up contents. Never for science."""

    enabled: bool = False
    """Start bench/synthetic.py instead of the stages (no torch, no vLLM, no model)."""
    generate_s: float = 0.1
    """Seconds a generation worker spends per rollouts shard."""
    score_s: float = 0.1
    """Seconds a teacher spends per scored shard."""
    train_s: float = 0.1
    """Seconds the trainer spends per scored shard it trains on."""
    export_s: float = 0.05
    """Seconds the trainer spends publishing a weights version (and again per checkpoint)."""
    reload_s: float = 0.05
    """Seconds a generation worker spends loading a weights version."""
    load_s: float = 0.0
    """Seconds every worker spends starting up (loading its model)."""
    response_tokens: int = 8
    """Tokens of every synthetic response."""
    workers_per_task: int = 1
    """Generation and teacher workers per planned task (forked processes, each a worker of its
    own): many workers from a small plan. The trainer is always one."""


@dataclass
class SluiceConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The student."""
    teacher: PolicyConfig = field(default_factory=lambda: PolicyConfig(generation=None))
    """The teacher. Its generation section only sets the teacher's temperature (null: the
    teacher's logits are not scaled; set: divided by teacher.generation.temperature)."""
    loss_fn: LossConfig = field(default_factory=LossConfig)
    """Distillation loss."""
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    """The algorithm."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and prompts."""
    env: Dict[str, Any] = field(default_factory=lambda: {"math": {"num_workers": 8}})
    """Accepted for compatibility (math verification runs in the coordinator)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metrics and logs."""
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    """Checkpoints."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The Slurm allocation."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Sluice: how the run is started."""
    queue: QueueConfig = field(default_factory=QueueConfig)
    """Sluice: the run directory queue."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Benchmarks and tests only: role workers that sleep instead of computing."""


# Keys found in the runbook's configs that Sluice deliberately does not have, with the reason
# given to the user. Matched on the dotted path (also under teacher.* for policy.* keys).
REFUSED_KEYS: Dict[str, str] = {
    "policy.megatron_cfg": "Sluice trains with FSDP2 only (policy.dtensor_cfg); remove megatron_cfg",
    "policy.offload_optimizer_for_logprob": "the teacher runs in its own job, so there is no "
    "optimizer to offload while scoring; remove the key",
    "distillation.val_track_train_metrics": "Sluice always logs train metrics; remove the key",
    "logger.mlflow": "Sluice logs to wandb and TensorBoard only; remove the key",
    "logger.swanlab": "Sluice logs to wandb and TensorBoard only; remove the key",
    "cluster.ray": "Sluice does not use Ray; remove the key",
    "launch.coordinator_time_limit": "the coordinator job's resources moved to "
    "cluster.coordinator.*; use cluster.coordinator.time_limit",
}


# Keys Sluice accepts so that the runbook's configs load unchanged, and does nothing with
# (each field's docstring says so). Every other field is read by the code
# (tests/test_config.py checks both). "*" stands for any one key.
COMPATIBILITY_ONLY = (
    "policy.dtensor_cfg._v2", "teacher.dtensor_cfg._v2",
    "policy.sequence_packing.algorithm", "teacher.sequence_packing.algorithm",
    "data.*.processor",
    "logger.monitor_gpus", "logger.gpu_monitoring.collection_interval",
    "logger.gpu_monitoring.flush_interval",
)


def register() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    # lazy: Hydra only where recipes are composed (launch.run); workers read config.yaml
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sluice_schema", node=SluiceConfig)

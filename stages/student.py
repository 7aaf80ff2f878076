"""What the trainer builds (stages.train): the FSDP2-sharded student, its optimizer and LR
scheduler, and the files of the base model its exported weights carry.

    model, base_dir = load_student(cfg, d)        # every rank reads only its own shards
    gather = ResponseGather(model)                 # logits only at response positions
    optimizer = build_optimizer(cfg, model)        # policy.optimizer
    scheduler = build_scheduler(optimizer, cfg.policy.scheduler)   # or None: constant LR
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional, get_args

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from transformers import AutoConfig

from shared.config import OptimizerName, SluiceConfig
from shared.distributed import TORCH_DTYPES, Dist, build_sharded
from shared.rundir import COMMITTED
from tinymodels.build import ensure_model

log = logging.getLogger("sluice.train")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


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
        mp_policy=mixed_precision(cfg, d),
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


def mixed_precision(cfg: SluiceConfig, d: Dist) -> MixedPrecisionPolicy:
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


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint is stored in (exported weights use it too), from its file:
    the loaded model's config says float32, the dtype it was loaded in."""
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

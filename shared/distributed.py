"""Process groups and sharded model I/O, shared by the trainer and the teacher (torch only).

    d = setup_distributed(seed=42)                 # torchrun's group, or a group of one process
    model = build_sharded(path, torch.float32, d, shard)   # meta init -> FSDP2 -> per-rank read
    export_hf(model, out_dir, torch.bfloat16, d)    # per-rank write, then HF safetensors files

No rank ever holds the whole model in host memory:

- loading builds the model on the meta device, shards it (FSDP2), allocates each rank's
  shards, and fills them straight from the Hugging Face safetensors files with
  torch.distributed.checkpoint's HuggingFaceStorageReader: each rank reads only the slices of
  each tensor that it owns, converted to the parameters' dtype on the way;
- exporting casts each rank's shards to the export dtype (a shard-sized copy), writes them
  with HuggingFaceStorageWriter (one file per rank), then every rank consolidates a share of
  the output files (byte ranges copied from the shard files, not tensors loaded whole).

Tied embeddings (Qwen3 0.6B/1.7B/4B): the checkpoint may have no lm_head.weight; the model's
lm_head shares the embedding parameter, so loading the embedding fills both. Exports always
write lm_head.weight too (vLLM's in-place reload on CPU needs it: notes/platform.md).
Non-persistent buffers (rotary inverse frequencies) are in no checkpoint and are left
uninitialised by meta init: they are recomputed on every rank from the config.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, get_args

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM

from shared.config import Precision

# Collectives wait this long: a rank may be busy for minutes (a checkpoint save on a slow
# filesystem, the first CUDA kernel compilations) while the others wait in a collective.
PG_TIMEOUT = datetime.timedelta(minutes=30)
# Output files of an export: at most this many bytes each, as Hugging Face does.
MAX_FILE_BYTES = 5 * 1024**3


# The torch dtype of each config Precision ("bfloat16" -> torch.bfloat16).
TORCH_DTYPES: Dict[str, torch.dtype] = {p: getattr(torch, p) for p in get_args(Precision)}


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def cuda_available() -> bool:
    """Whether CUDA devices exist, asked through NVML: a plain torch.cuda.is_available()
    initialises the CUDA driver in this process, after which a forked child (vLLM forks its
    engine unless told otherwise) cannot use CUDA."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def setup_distributed(seed: Optional[int] = None, always: bool = True) -> Dist:
    """This rank's process group (nccl for CUDA tensors plus gloo for CPU ones on GPU; gloo on
    CPU), device, and seed. Without torchrun's environment: a group of one process with
    `always` (FSDP2 needs a group), else none."""
    cuda = cuda_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(backend, timeout=PG_TIMEOUT)
        elif always:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=PG_TIMEOUT)
    if seed is not None:
        torch.manual_seed(seed)
    if not dist.is_initialized():
        return Dist(0, 1, local_rank, device)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def broadcast_object(obj, d: Optional[Dist] = None):
    """Rank 0's `obj` on every rank (as is without a process group of several ranks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def exit_now(code: int = 0) -> None:
    """End a torchrun rank without the interpreter's teardown, once its work is saved and
    its process group destroyed. Under load a rank sometimes aborted in that teardown
    ("terminate called without an active exception", after destroy_process_group had
    returned on every rank), which torchrun reports as a failed run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------------------ loading


def _safetensors_keys(path: Path) -> set:
    """Tensor names stored in a model directory's safetensors files (headers only)."""
    keys = set()
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        keys.update(k for k in header if k != "__metadata__")
    return keys


def reset_non_persistent_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute the buffers no checkpoint holds (rotary frequencies), after a meta init:
    each module that owns some is built again from its config, on CPU, and its values copied."""
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if not names or not hasattr(module, "config"):
            continue
        fresh = type(module)(config=module.config)
        for name in names:
            value = getattr(fresh, name)
            module._buffers[name] = value.to(device)
        if hasattr(fresh, "original_inv_freq"):
            module.original_inv_freq = fresh.original_inv_freq.to(device)


def load_sharded_weights(model: torch.nn.Module, path: Path, device: torch.device,
                         prefix: str = "") -> None:
    """Fill an FSDP2-sharded model whose parameters are allocated (to_empty) from the HF
    safetensors in `path`, each rank reading only its slices (every rank calls this).
    `prefix`: what the model's state dict adds before the checkpoint's names."""
    stored = _safetensors_keys(path)
    if not stored:
        raise FileNotFoundError(f"{path}: no *.safetensors files; Sluice loads HF safetensors "
                                "checkpoints (convert .bin checkpoints with transformers first)")
    state = get_model_state_dict(model)
    wanted = {}
    for key, value in state.items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if name in stored:
            wanted[name] = value
        elif name == "lm_head.weight" and _tied(model):
            continue  # the embedding, loaded under its own name
        else:
            raise KeyError(f"{path}: the checkpoint has no tensor {name!r} that the model "
                           f"{type(model).__name__} needs")
    dcp.load(wanted, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    reset_non_persistent_buffers(model, device)


def _tied(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        inner = [m for m in model.modules() if hasattr(m, "config")]
        config = inner[0].config if inner else None
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


# ------------------------------------------------------------------------------ exporting


def _file_index(state: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, int]:
    """Tensor name -> output file number (1-based), files of at most MAX_FILE_BYTES, in state
    order: every rank computes the same from shapes alone."""
    index, size, current = {}, 0, 1
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for name, value in state.items():
        nbytes = value.numel() * itemsize
        if size and size + nbytes > MAX_FILE_BYTES:
            current, size = current + 1, 0
        index[name] = current
        size += nbytes
    return index


def export_hf(model: torch.nn.Module, out_dir: Path, dtype: torch.dtype, d: Dist,
              prefix: str = "") -> None:
    """Write the model's weights as HF safetensors into `out_dir`, in `dtype` (model.safetensors,
    or model-0000i-of-0000n.safetensors and model.safetensors.index.json above
    MAX_FILE_BYTES); every rank calls this. Host memory per rank: its own shards in `dtype`,
    plus the largest tensor while files are consolidated."""
    # lazy: a private torch module (it may move between releases): only the export needs it
    from torch.distributed.checkpoint._consolidate_hf_safetensors import (
        consolidate_safetensors_files_on_every_rank,
    )

    state, seen = {}, set()
    for key, value in get_model_state_dict(model).items():
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        value = value.detach().to(dtype)
        local = value.to_local() if hasattr(value, "to_local") else value
        if local.numel() and local.data_ptr() in seen:
            value = value.clone()  # tied: safetensors stores each name's own copy
        seen.add(local.data_ptr())
        state[name] = value
    index = _file_index(state, dtype)
    shards = Path(out_dir) / ".shards"
    writer = dcp.HuggingFaceStorageWriter(str(shards), fqn_to_index_mapping=index,
                                          save_distributed=True, enable_consolidation=False)
    dcp.save(state, storage_writer=writer)
    del state
    consolidate_safetensors_files_on_every_rank(str(shards / "sharded") if (shards / "sharded").is_dir()
                                                else str(shards), str(out_dir), index)
    if dist.is_initialized():
        dist.barrier()
    if d.rank == 0:
        shutil.rmtree(shards, ignore_errors=True)
        if max(index.values()) == 1:  # one file: Hugging Face's name for it, no index
            os.replace(Path(out_dir) / "model-00001-of-00001.safetensors",
                       Path(out_dir) / "model.safetensors")
            (Path(out_dir) / "model.safetensors.index.json").unlink(missing_ok=True)


def build_sharded(path: Path, dtype: torch.dtype, d: Dist,
                  shard: Callable[[torch.nn.Module], torch.nn.Module],
                  wrap: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
                  prefix: str = "", alloc_device: Optional[torch.device] = None):
    """The HF causal LM in `path`, built on meta (then `wrap(model)`, if given), sharded by
    `shard(model)` (which applies fully_shard), allocated on `alloc_device` (default this
    rank's device; CPU for offloaded parameters) and filled per rank."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if wrap is not None:
            model = wrap(model)
    model = shard(model)
    model.to_empty(device=alloc_device or d.device)
    load_sharded_weights(model, Path(path), d.device, prefix=prefix)
    return model

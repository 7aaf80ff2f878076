"""Distributed half of tests/test_distributed.py: per-rank loading and export of a model.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_sharded_worker.py MODEL_DIR OUT_DIR MODE

MODE "sharded": every rank builds the model on meta, shards it with FSDP2 and fills its shards
from MODEL_DIR's safetensors (shared.distributed.build_sharded), then exports it in bfloat16
(shared.distributed.export_hf) into OUT_DIR/export. MODE "rank0": the way Sluice loaded before:
rank 0 reads the whole checkpoint and broadcasts it, and gathers the full state for export.
Each rank writes OUT_DIR/rank<r>.json: its peak RSS (MB) after the phase of interest, and the
full (gathered) parameters' checksum.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions, get_model_state_dict, set_model_state_dict)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from shared.distributed import build_sharded, exit_now, export_hf, setup_distributed  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard(model, d):
    mesh = init_device_mesh("cpu", (d.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(model_dir: str, out_dir: str, mode: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    d = setup_distributed(seed=0)
    out = Path(out_dir)
    baseline = peak_rss_mb()
    if mode == "sharded":
        model = build_sharded(Path(model_dir), torch.float32, d, lambda m: shard(m, d))
    else:
        if d.rank == 0:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            full = model.state_dict()
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                         dtype=torch.float32)
            full = {}
        shard(model, d)
        if d.rank != 0:
            model.to_empty(device="cpu")
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                                   broadcast_from_rank0=True))
        del full
    load_rss = peak_rss_mb()
    if mode == "sharded":
        export_hf(model, out / "export", torch.bfloat16, d)
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if d.rank == 0:
            from safetensors.torch import save_file

            (out / "export").mkdir(parents=True, exist_ok=True)
            save_file({k: v.to(torch.bfloat16).contiguous().clone() for k, v in state.items()},
                      str(out / "export" / "model.safetensors"))
        del state
    export_rss = peak_rss_mb()
    # Gathered parameters and buffers for the comparison (after the measurements).
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.rank == 0:
        torch.save({k: v.clone() for k, v in full.items()}, out / f"state-{mode}.pt")
        torch.save({k: v.clone() for k, v in model.named_buffers()}, out / f"buffers-{mode}.pt")
    (out / f"rank{d.rank}-{mode}.json").write_text(json.dumps(
        {"baseline_mb": baseline, "load_mb": load_rss, "export_mb": export_rss}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    exit_now(0)  # as the stages' mains: no interpreter teardown after the process group

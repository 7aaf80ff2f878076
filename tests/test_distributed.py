"""Sharded loading and export (shared.distributed) with real torchrun ranks, at real shapes.

The real-shape student (vocabulary 151,936, head_dim 128, tied embeddings, bf16 on disk) is
loaded into fp32 FSDP2 shards by 2 ranks in two ways: per rank (each rank reads only its
slices) and the way Sluice loaded before (rank 0 reads everything and broadcasts). Both must
give the same parameters bit for bit, and the per-rank way must hold no more host memory per
rank than its shard plus a fixed margin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.models import tiny_models_dir
from tinymodels.random_weights import build_real_shape_models

REPO = Path(__file__).resolve().parents[1]
# Host memory a rank may hold above its own shards while loading: the reader's buffers for
# one tensor slice, the fp32 staging of a bf16 slice, allocator slack. The whole model in
# fp32 (what rank 0 held before) is 156 MB for the real-shape student.
LOAD_MARGIN_MB = 96


@pytest.fixture(scope="module")
def real_shape():
    return build_real_shape_models(tiny_models_dir())


@pytest.fixture(scope="module")
def loaded(real_shape, tmp_path_factory):
    """Run the 2-rank worker in both modes; {mode: [rank0 figures, rank1 figures]}."""
    out = tmp_path_factory.mktemp("sharded")
    figures = {}
    for mode in ("sharded", "rank0"):
        (out / mode).mkdir()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(REPO / "tests" / "dist_sharded_worker.py"), real_shape["realshape-student"],
             str(out / mode), mode],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        figures[mode] = [json.loads((out / mode / f"rank{r}-{mode}.json").read_text()) for r in (0, 1)]
    return out, figures


def _shard_mb(model_dir: str) -> float:
    """One rank's share (of 2) of the student's parameters in fp32, tied embedding once."""
    from safetensors import safe_open

    numel = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key != "lm_head.weight":
                numel += torch.Size(f.get_slice(key).get_shape()).numel()
    return numel * 4 / 2 / 2**20


def test_per_rank_loading_equals_rank0_loading_bit_for_bit(real_shape, loaded):
    from transformers import AutoModelForCausalLM

    out, _ = loaded
    sharded = torch.load(out / "sharded" / "state-sharded.pt")
    rank0 = torch.load(out / "rank0" / "state-rank0.pt")
    assert sharded.keys() == rank0.keys()
    for key in sharded:
        assert sharded[key].dtype == torch.float32, key
        assert torch.equal(sharded[key], rank0[key]), key
    # Both equal what transformers loads by itself, and lm_head is the embedding (tied).
    ref = AutoModelForCausalLM.from_pretrained(real_shape["realshape-student"], dtype=torch.float32)
    assert ref.config.tie_word_embeddings and ref.config.vocab_size == 151_936
    for key, value in ref.state_dict().items():
        assert torch.equal(sharded[key], value), key
    assert torch.equal(sharded["lm_head.weight"], sharded["model.embed_tokens.weight"])
    # Rotary frequencies (in no checkpoint) recomputed after the meta init.
    buffers = torch.load(out / "sharded" / "buffers-sharded.pt")
    for key, value in ref.named_buffers():
        assert torch.equal(buffers[key], value), key


def test_export_writes_the_weights_in_bf16_with_lm_head(real_shape, loaded):
    from safetensors.torch import load_file

    out, _ = loaded
    exported = load_file(str(out / "sharded" / "export" / "model.safetensors"))
    original = load_file(str(Path(real_shape["realshape-student"]) / "model.safetensors"))
    assert not list((out / "sharded" / "export").glob(".shards"))
    for key, value in original.items():
        assert exported[key].dtype == torch.bfloat16, key
        assert torch.equal(exported[key], value.to(torch.bfloat16)), key
    assert torch.equal(exported["lm_head.weight"], original["model.embed_tokens.weight"])


def test_peak_host_memory_per_rank_is_its_shard_plus_a_margin(real_shape, loaded):
    _, figures = loaded
    shard = _shard_mb(real_shape["realshape-student"])
    for rank, fig in enumerate(figures["sharded"]):
        grown = fig["load_mb"] - fig["baseline_mb"]
        assert grown <= shard + LOAD_MARGIN_MB, (rank, grown, shard)
    # Rank 0 held the whole model the old way: the per-rank way saves at least half of it.
    old = figures["rank0"][0]["load_mb"] - figures["rank0"][0]["baseline_mb"]
    new = figures["sharded"][0]["load_mb"] - figures["sharded"][0]["baseline_mb"]
    assert new < old - shard / 2, (new, old, shard)
    print(f"\nload, MB above baseline per rank: sharded {[round(f['load_mb'] - f['baseline_mb']) for f in figures['sharded']]}"
          f", rank-0 {[round(f['load_mb'] - f['baseline_mb']) for f in figures['rank0']]}; shard {shard:.0f}")


def test_no_module_asks_cuda_in_a_way_that_initialises_it():
    """vLLM forks its engine processes unless CUDA is initialised in the parent; a plain
    torch.cuda.is_available() initialises it (cuInit) and the forked engine cannot use CUDA.
    Roles ask shared.distributed.cuda_available(), which asks NVML."""
    import ast

    offenders = []
    for folder in ("stages", "shared", "launch"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("is_available", "device_count", "init")
                        and ast.unparse(node.func.value) == "torch.cuda"):
                    owner = path.relative_to(REPO).as_posix()
                    if owner != "shared/distributed.py":
                        offenders.append(f"{owner}:{node.lineno}")
    assert not offenders, offenders


def test_process_groups_are_created_in_one_place():
    """Trainer and teacher get their process group from shared.distributed.setup_distributed
    (30-minute collective timeout: the default 10 minutes is less than a slow rank's reading
    or checkpoint save on a shared filesystem)."""
    import ast

    from shared.distributed import PG_TIMEOUT

    assert PG_TIMEOUT.total_seconds() >= 1800
    callers = []
    for folder in ("stages", "shared", "launch", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "init_process_group":
                    callers.append(path.relative_to(REPO).as_posix())
    assert set(callers) == {"shared/distributed.py"}, callers
    for stage in ("train", "score"):
        assert "setup_distributed(" in (REPO / "stages" / f"{stage}.py").read_text(), stage


def test_cuda_available_does_not_initialise_cuda_and_engine_spawns_on_gpu(monkeypatch):
    """On a GPU, the engine's worker processes are spawned (no fork after any CUDA call)."""
    import stages.generate as generate
    from shared import distributed
    from shared.recipe import load

    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    distributed.cuda_available()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert not torch.cuda.is_initialized()

    cfg, _ = load("smoke")
    monkeypatch.setattr(distributed, "cuda_available", lambda: True)
    kwargs = generate.engine_kwargs(cfg, "/models/x")
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert kwargs["dtype"] == cfg.policy.generation.vllm_cfg.precision
    assert "enable_chunked_prefill" not in kwargs  # the CPU engine's work-around only

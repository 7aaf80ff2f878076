"""`make gpu-check` (bench/gpu_check.py) without a GPU: its dry run, its refusal, its report.

    python -m pytest tests/test_gpu_check.py -q

The GPU parts themselves run only on a CUDA machine (`make gpu-check`); here the dry run
validates on CPU every model config, recipe and command line they use.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import SECTION, replace_section

ROOT = Path(__file__).resolve().parent.parent


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the test means the same on a GPU machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def qwen3_parameters(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                     intermediate: int) -> int:
    """Qwen3 with tied embeddings: the embedding (also the LM head); per decoder layer the q, k,
    v, o projections (no biases), the q/k RMSNorms over head_dim, the gated MLP (gate, up,
    down) and two RMSNorms; the final RMSNorm."""
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 2 * head_dim
    mlp = 3 * hidden * intermediate
    return vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden


def test_dry_run_validates_the_plan_on_cpu():
    res = gpu_check("--dry-run")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    params = qwen3_parameters(vocab=151_936, hidden=2048, layers=28, heads=16, kv_heads=8,
                              head_dim=128, intermediate=6144)
    assert params == 1_720_574_976
    assert f"parameters: {params} " in out, out
    assert "tokenizer: 151936 ids" in out
    for part in ("build", "vllm", "score", "train", "smoke"):
        assert f"\n  {part} " in out, part
    assert "gpu_memory_utilization 0.3" in out and "enforce_eager False" in out
    assert "max_total_sequence_length 16384" in out
    assert "python -m launch.run conf=smoke-real-shape launch.detach=false" in out
    for role in ("training", "generation", "teacher"):  # the three roles share the one GPU
        assert f"{role} CUDA_VISIBLE_DEVICES=0" in out
    assert "vllm not imported, CUDA not initialised" in out
    assert out.rstrip().endswith("dry run OK")


def test_without_cuda_it_says_so_and_writes_nothing():
    benchmarks = (ROOT / "BENCHMARKS.md").read_bytes()
    res = gpu_check()
    assert res.returncode != 0
    assert "no CUDA device" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert (ROOT / "BENCHMARKS.md").read_bytes() == benchmarks


def test_unknown_part_is_refused():
    res = gpu_check("--dry-run", "--only", "vllm,nope")
    assert res.returncode == 2 and "unknown part(s) ['nope']" in res.stderr


def test_section_replaced_in_place_and_the_rest_kept_byte_for_byte():
    new = f"{SECTION}\n\nnew figures\n"
    head = "# Benchmarks\r\n\nintro\n\n## Queue\n\n| a |\n\n"
    tail = "## GPU benchmarks\n\n- skipped\n"
    old = f"{SECTION}\n\nold figures\n\n### vllm: passed\n\n"
    assert replace_section(head + old + tail, new) == head + new + "\n" + tail
    assert replace_section(head + old, new) == head + new  # the last section
    assert replace_section(head + tail, new) == head + tail + "\n" + new  # appended
    assert replace_section("x", new) == "x\n\n" + new
    assert replace_section("", new) == new


def _index_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=15).close()
        return True
    except OSError:
        return False


def test_gpu_install_resolves():
    """`make setup EXTRAS=gpu,dev` can be satisfied: pip resolves the gpu extra's pins (vLLM's
    CUDA wheel and the torch it pins, transformers, ...) against the package index, in a
    throwaway venv (`make check-gpu-deps`). Needs the package index; without it, skipped."""
    import pytest

    if not _index_reachable():
        pytest.skip("pypi.org unreachable: cannot resolve the gpu extra here")
    res = subprocess.run(["make", "--no-print-directory", "check-gpu-deps"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    import re

    versions = dict(m.groups() for m in re.finditer(r"(?m)^([A-Za-z_]+)-(\d[^\s]*)$", res.stdout))
    major, minor = (int(x) for x in versions["vllm"].split(".")[:2])
    assert (0, 16) <= (major, minor) < (0, 33), versions
    assert int(versions["transformers"].split(".")[0]) >= 4 and "torch" in versions, versions

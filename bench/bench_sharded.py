"""Host memory per rank while loading and exporting a model (issue 14): per-rank sharded
loading and export (shared.distributed) against the way Sluice loaded before (rank 0 reads
the whole checkpoint and broadcasts; the export gathers the full model on rank 0).

    python -m bench.bench_sharded

Two torchrun ranks on the real-shape student (vocabulary 151,936, tied embeddings, bf16 on
disk, fp32 in training); each rank's peak RSS above its RSS before loading. At 14B the same
ratio decides whether a node's host memory holds the load (fp32 14B: 56 GB on rank 0 before).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(model_dir: str, out: Path) -> dict:
    """{mode: [per-rank figures]} for modes sharded and rank0."""
    figures = {}
    for mode in ("sharded", "rank0"):
        (out / mode).mkdir(parents=True)
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(REPO / "tests" / "dist_sharded_worker.py"), model_dir, str(out / mode), mode],
            cwd=REPO, capture_output=True, text=True, timeout=900,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"dist_sharded_worker {mode} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        figures[mode] = [json.loads((out / mode / f"rank{r}-{mode}.json").read_text()) for r in (0, 1)]
    return figures


def entries(figures: dict) -> list:
    out = []
    for phase, key in (("load", "load_mb"), ("export", "export_mb")):
        for rank in (0, 1):
            new = figures["sharded"][rank][key] - figures["sharded"][rank]["baseline_mb"]
            old = figures["rank0"][rank][key] - figures["rank0"][rank]["baseline_mb"]
            out.append({"name": f"peak_rss_{phase}_rank{rank}", "value": round(new), "baseline": round(old),
                        "ratio": round(new / old, 3) if old > 0 else None, "target": None,
                        "unit": "MB", "better": "lower",
                        "note": "real-shape student, 2 ranks; peak RSS above the rank's RSS before "
                                "loading; baseline: rank 0 reads and broadcasts, export gathers on rank 0"
                                + (" (export: cumulative peak, load included)" if phase == "export" else "")})
    return out


def run(out: dict) -> dict:
    from shared.models import tiny_models_dir
    from tinymodels.random_weights import build_real_shape_models

    model = build_real_shape_models(tiny_models_dir())["realshape-student"]
    with tempfile.TemporaryDirectory(prefix="sluice-bench-sharded-") as tmp:
        figures = measure(model, Path(tmp))
    out.setdefault("entries", []).extend(entries(figures))
    out["sharded_figures"] = figures
    return out


if __name__ == "__main__":
    result = run({})
    for e in result["entries"]:
        print(f"{e['name']:28s} {e['value']:>6} MB   before: {e['baseline']:>6} MB   ratio {e['ratio']}")

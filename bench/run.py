"""`make bench`: every benchmark the issues ask for, each against its baseline measured in the
same run, written to BENCHMARKS.md (a table) and BENCHMARKS.json next to it.

    python -m bench.run                      # all benchmarks (about 10-15 min on a 2-core CPU box)
    python -m bench.run --only queue,train   # a subset

Each benchmark module runs in its own subprocess (vLLM and torch set process-wide state) and
fills entries {name, value, unit, baseline, ratio, target, better}; the ratio is always the
candidate over its baseline from the same run, so figures from a loaded or a fast machine
stay comparable. Benchmarks that need CUDA report themselves skipped on CPU machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ["queue", "generate", "score", "train", "coordinator", "pipeline", "learn", "memory", "sharded"]
TITLES = {
    "queue": "Run-directory queue (issue 3)",
    "generate": "Generation stage (issue 4)",
    "score": "Teacher scoring (issue 4)",
    "train": "Training stage (issue 4)",
    "coordinator": "Coordinator (issue 5; hand-offs and step time on the smoke recipe, issue 17)",
    "pipeline": "Pipeline efficiency and scale with synthetic workers (issue 17)",
    "learn": "Learning check (issue 8, also `make learn`)",
    "memory": "Memory plan vs measured CPU allocations (issue 14)",
    "sharded": "Host memory per rank: per-rank sharded load and export vs rank 0 (issue 14)",
}


# Modules that need longer than the default (minutes of synthetic runs at scale).
TIMEOUT_S = {"learn": 3600, "pipeline": 3600}


def run_module(name: str, timeout_s: int = 1500) -> dict:
    """Run bench.bench_<name>.run(out) in a fresh process; returns its `out` (or an error)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    code = ("import json, sys\n"
            f"from bench import bench_{name} as m\n"
            "out = {}\n"
            "m.run(out)\n"
            "json.dump(out, open(sys.argv[1], 'w'), default=str)\n")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code, path], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)
    elapsed = time.time() - started
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"error": f"exit {proc.returncode}", "log": tail, "elapsed_s": elapsed}
    out = json.loads(Path(path).read_text())
    os.unlink(path)
    out["elapsed_s"] = elapsed
    out["measured_at"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(started))
    return out


def _target(entry: dict) -> str:
    t = entry.get("target")
    if isinstance(t, str):
        return t
    if t is None:
        return "report"
    return f"{'<=' if entry.get('better') == 'lower' else '>='} {t}"


def _met(entry: dict):
    target = _target(entry)
    if target == "report" or entry.get("ratio") is None:
        return None
    op, bound = target.split()
    value = entry.get("compare", entry["ratio"])
    return value <= float(bound) if op == "<=" else value >= float(bound)


def queue_entries(out: dict) -> list:
    """bench_queue reports a flat dict of figures; turn it into table entries."""
    if "bytes_per_topk_entry" not in out:
        return []
    zstd = out.get("zstd", {})
    return [
        # The "bytes on disk per top-k entry" against the Ray system's 12 B (int64 id
        # + fp32 value): the bytes the two top-k columns add to the file. 6 B per entry plus
        # ~0.9 KB per shard (their schema and row offsets), compared to 0.01 B.
        {"name": "top-k bytes on disk per entry (int32 id + float16 log-prob), k=64, vocab 151,936",
         "value": round(out["topk_bytes_per_entry"], 4), "unit": "B", "baseline": 12.0,
         "ratio": round(out["topk_bytes_per_entry"], 4), "compare": round(out["topk_bytes_per_entry"], 2),
         "target": "<= 6", "note": "baseline: Ray system's int64 id + fp32 value"},
        {"name": "whole scored-shard file per top-k entry (adds response ids, text, student log-probs, prompt)",
         "value": out["bytes_per_topk_entry"], "unit": "B", "baseline": 12.0,
         "ratio": out["bytes_per_topk_entry"], "target": "report"},
        {"name": "scored-shard commit throughput vs plain copy+fsync",
         "value": out["commit_MBps"], "unit": "MB/s", "baseline": out["copy_MBps"],
         "ratio": out["commit_vs_copy"], "target": ">= 0.8"},
        {"name": "scored-shard read (verified) to tensors vs plain copy",
         "value": out["read_MBps"], "unit": "MB/s", "baseline": out["copy_MBps"],
         "ratio": out["read_vs_copy"], "target": ">= 0.8"},
        {"name": "scored-shard table built from GPU-cast tensors (int32, float16) and committed, vs copy+fsync",
         "value": out["copy_MBps"] * out["write_gpu_dtypes_vs_copy"], "unit": "MB/s", "baseline": out["copy_MBps"],
         "ratio": out["write_gpu_dtypes_vs_copy"], "target": "report"},
        {"name": "the same from CPU int64/float32 tensors (casts on the CPU)",
         "value": out["write_MBps"], "unit": "MB/s", "baseline": out["copy_MBps"],
         "ratio": out["write_vs_copy"], "target": "report"},
        {"name": "queue.compression=zstd: whole file per top-k entry",
         "value": zstd.get("bytes_per_topk_entry"), "unit": "B", "baseline": 12.0,
         "ratio": zstd.get("bytes_per_topk_entry"), "target": "report"},
        {"name": "queue.compression=zstd: commit vs copy+fsync (time per shard)",
         "value": zstd.get("commit_vs_copy"), "unit": "x", "baseline": 1.0,
         "ratio": zstd.get("commit_vs_copy"), "target": "report"},
    ]


def entries_of(name: str, out: dict) -> list:
    if name == "queue":
        return queue_entries(out)
    found = list(out.get("entries", []))
    found += [v for v in out.values() if isinstance(v, dict) and "name" in v and "value" in v]
    return found


def machine() -> str:
    gpu = "no CUDA"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, {gpu})"


def fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def gpu_check_section(text: str) -> str:
    """The "## GPU check" section of a BENCHMARKS.md text (up to the next "## "), or ""."""
    from bench.gpu_check import SECTION

    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\r\n") == SECTION), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[start:end])


def write_reports(results: dict, md_path: Path) -> None:
    mach = machine()
    lines = ["# Benchmarks", "",
             f"Written by `make bench` (`python -m bench.run`) on {time.strftime('%Y-%m-%d %H:%M')} "
             f"on {mach}. Each ratio is the candidate over its baseline measured in the same run; "
             "'met' compares the ratio with the target.", ""]
    all_entries = []
    for name in MODULES:
        if name not in results:
            continue
        out = results[name]
        lines += [f"## {TITLES[name]}", ""]
        if "error" in out:
            lines += [f"Failed ({out['error']}):", "", "```", out.get("log", ""), "```", ""]
            continue
        for skip in out.get("skipped", []):
            lines.append(f"- skipped: {skip}")
        ents = entries_of(name, out)
        if ents:
            lines += ["| figure | value | unit | baseline | ratio | target | met | machine |",
                      "|---|---|---|---|---|---|---|---|"]
            for e in ents:
                met = _met(e)
                e = {**e, "met": met, "target": _target(e), "machine": mach, "bench": name}
                all_entries.append(e)
                mark = {True: "yes", False: "**no**", None: "-"}[met]
                lines.append(f"| {e['name']} | {fmt(e['value'])} | {e.get('unit', '')} | "
                             f"{fmt(e.get('baseline'))} | {fmt(e.get('ratio'))} | {e['target']} | {mark} | {mach} |")
        for note in out.get("notes", []):
            lines.append(f"\n{note}")
        when = f", measured {out['measured_at']}" if out.get("measured_at") else ""
        lines += ["", f"({out.get('elapsed_s', 0):.0f} s{when})", ""]
    if "no CUDA" in mach:
        lines += ["## GPU benchmarks", "",
                  "- skipped: no CUDA on this machine. On a CUDA machine bench_score and bench_train "
                  "run their GPU variants (bf16, CUDA memory statistics); generation, training and "
                  "scoring at Qwen3-0.6B/1.7B scale and the recipes' sequence lengths are not "
                  "benchmarked yet.", ""]
    met = [e for e in all_entries if e["met"] is not None]
    lines.insert(4, f"Targets met: {sum(e['met'] for e in met)} of {len(met)}.\n")
    text = "\n".join(lines) + "\n"
    # `make gpu-check` writes its own section, on a GPU machine: kept as it is.
    old = md_path.read_text() if md_path.exists() else ""
    gpu = gpu_check_section(old)
    if gpu:
        from bench.gpu_check import replace_section

        text = replace_section(text, gpu)
    md_path.write_text(text)
    md_path.with_suffix(".json").write_text(json.dumps(
        {"machine": mach, "time": time.time(), "entries": all_entries, "raw": results},
        indent=1, default=str) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(MODULES))
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    wanted = [m for m in args.only.split(",") if m]
    unknown = set(wanted) - set(MODULES)
    if unknown:
        print(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    out_path = Path(args.out)
    previous = {}
    if out_path.with_suffix(".json").exists() and len(wanted) < len(MODULES):
        previous = json.loads(out_path.with_suffix(".json").read_text()).get("raw", {})
    results = dict(previous)
    for name in wanted:
        if not (REPO / "bench" / f"bench_{name}.py").exists():
            continue
        print(f"[bench] {name} ...", flush=True)
        results[name] = run_module(name, timeout_s=TIMEOUT_S.get(name, 1500))
        print(f"[bench] {name}: {'failed: ' + results[name]['error'] if 'error' in results[name] else 'done'} "
              f"({results[name].get('elapsed_s', 0):.0f}s)", flush=True)
    write_reports(results, out_path)
    print(f"wrote {out_path} and {out_path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scored-shard size and queue throughput against a plain file copy on the same filesystem.

    .venv/bin/python -m bench.bench_queue [--dir DIR] [--reps 21]

Prints one JSON object. The shard is realistic for Qwen3 (vocab 151,936) at k=64: 8
responses of ~3,000 tokens, a ~300-token prompt, ~4 characters of text per token, top-k
ids drawn uniformly from the vocabulary (real top-k ids repeat across positions, so this
is the incompressible worst case) and top-k log-probs shaped like an LLM's (a sorted,
temperature-scaled Gumbel sample holding 95% of the mass: top-1 about -0.5, tail to -60).

Figures (best of ``reps`` rounds, candidates and baselines interleaved; MBps is file bytes):
  bytes_per_topk_entry        whole file bytes / (response tokens * k), target <= 6
  topk_bytes_per_entry        on-disk bytes the two top-k columns add to the file (the file
                              minus the same file written without them), per entry: the
                              like-for-like figure for the Ray system's 12 B (int64 id +
                              fp32 value per entry)
  commit_vs_copy              StageQueue.commit of a built table (serialize + hash + write +
                              fsync + record + manifest) vs shutil.copyfile + fsync of a
                              file of the same size; target >= 0.8
  write_vs_copy               the same from CPU torch tensors (int64 ids, float32 log-probs):
                              topk_to_arrow -> build_table -> commit (adds the float16 cast,
                              the int32 cast and validation)
  write_gpu_dtypes_vs_copy    the same from int32 ids + float16 log-probs, as a teacher that
                              casts on the GPU before the copy hands them over
  read_vs_copy                StageQueue.read (checksum-verified) -> topk_from_arrow (int64
                              ids, float32 log-probs) vs the same copy; target >= 0.8
  read_views_vs_copy          the same with zero-copy int32/float16 views (for a GPU trainer)
  read_vs_plain_read          the same read against open().read() of the file, for scale
  zstd.*                      commit and read with compression="zstd" (level 1) of the same
                              shard, timed against the same copy: why the default is
                              uncompressed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from shared import schemas
from shared.queue import StageQueue

VOCAB = 151_936
K = 64
REPO = Path(__file__).resolve().parents[1]


def _best_interleaved(fns: dict, reps: int) -> dict:
    """Best time of each ``fn(i)`` over ``reps`` rounds, run round-robin.

    Interleaving puts every candidate and the copy baseline under the same background load
    (shared machines, fsync latency drifting over seconds).
    """
    best = {name: float("inf") for name in fns}
    for i in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def make_shard(seed: int = 0, n_responses: int = 8, context_distillation: bool = False):
    """Columns of a realistic scored shard plus its top-k as torch tensors."""
    import torch

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(3000, 300, n_responses), 500, 6000).astype(int)
    total = int(lengths.sum())
    ids = rng.integers(0, VOCAB, (total, K), dtype=np.int64)
    logits = np.sort(rng.gumbel(size=(total, K)).astype(np.float32), axis=1)[:, ::-1]
    logits *= rng.uniform(1.0, 4.0, (total, 1)).astype(np.float32)
    # Leave ~5% of the mass outside the top-k, as a real teacher does.
    lse = np.log(np.exp(logits - logits[:, :1]).sum(1, keepdims=True)) + logits[:, :1]
    logprobs = logits - lse + np.log(0.95)
    prompt_len = 300
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    cols = {
        "sample_id": [f"step7-p{i // 4}-g{i % 4}" for i in range(n_responses)],
        "step": [7] * n_responses,
        "problem": ["Solve: " + "x" * 600] * n_responses,
        "answer": ["42"] * n_responses,
        "prompt_ids": [rng.integers(0, VOCAB, prompt_len, dtype=np.int32)] * n_responses,
        "dataset": ["openmathinstruct2"] * n_responses,
        "index": list(range(n_responses)),
        "response_ids": [rng.integers(0, VOCAB, m, dtype=np.int32) for m in lengths],
        "response_text": [rng.choice(letters, 4 * m).tobytes().decode() for m in lengths],
        "finish_reason": ["stop"] * n_responses,
        "policy_version": [6] * n_responses,
        "gen_logprobs": [-rng.exponential(0.3, m).astype(np.float32) for m in lengths],
        "sample_mask": [1] * n_responses,
        "teacher_model": ["Qwen/Qwen3-14B"] * n_responses,
        "alignment_offset": [prompt_len - 1] * n_responses,
    }
    if context_distillation:
        teacher_len = prompt_len + 2000  # problem + the student's <think> trace
        cols["teacher_prompt_ids"] = [rng.integers(0, VOCAB, teacher_len, dtype=np.int32)] * n_responses
        cols["alignment_offset"] = [teacher_len - 1] * n_responses
        cols["trace_found"] = [True] * n_responses
        cols["prefix_truncated"] = [False] * n_responses
    return cols, torch.from_numpy(ids), torch.from_numpy(np.ascontiguousarray(logprobs)), lengths


def _scored_table(cols, ids, logprobs, lengths):
    ids_arr, lps_arr = schemas.topk_to_arrow(ids, logprobs, lengths)
    return schemas.build_table("scored", {**cols, "teacher_topk_ids": ids_arr, "teacher_topk_logprobs": lps_arr})


def _file_bytes(table) -> int:
    """Size of ``table`` as an uncompressed Arrow IPC file, the queue's on-disk format."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().size


def run(out: dict, path: str | os.PathLike | None = None, reps: int = 21) -> dict:
    """Fill ``out`` with the figures described in the module docstring; returns it."""
    import torch

    base = Path(path) if path is not None else REPO / ".cache" / "bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_queue-", dir=base))
    try:
        cols, ids, logprobs, lengths = make_shard()
        tokens = int(sum(lengths))
        table = _scored_table(cols, ids, logprobs, lengths)
        topk_bytes = _file_bytes(table) - _file_bytes(table.drop_columns(["teacher_topk_ids", "teacher_topk_logprobs"]))
        plain = StageQueue(work / "plain", 7, "scored")
        zstd = StageQueue(work / "zstd", 7, "scored", compression="zstd")
        for q in (plain, zstd):
            q.expect(3 * reps)
        plain.commit(0, table)
        size = plain.record(0)["bytes"]
        src = work / "copy-src"
        with open(src, "wb") as f:
            f.write(os.urandom(size))

        def copy(i: int) -> None:
            dst = work / f"copy-dst-{i}"
            shutil.copyfile(src, dst)
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        def plain_read(i: int) -> None:
            with open(src, "rb") as f:
                f.read()

        def reader(q: StageQueue, **dtypes):
            def read(i: int) -> None:
                topk = schemas.topk_from_arrow(q.read(i % reps), **dtypes)
                assert topk.ids.shape == ids.shape

            return read

        ids32, logprobs16 = ids.int(), logprobs.half()  # as a teacher casting on the GPU hands them over

        best = _best_interleaved(
            {
                "copy": copy,
                "commit": lambda i: plain.commit(i, table),
                "write": lambda i: plain.commit(reps + i, _scored_table(cols, ids, logprobs, lengths)),
                "write_gpu_dtypes": lambda i: plain.commit(2 * reps + i, _scored_table(cols, ids32, logprobs16, lengths)),
                "read": reader(plain),
                "read_views": reader(plain, ids_dtype=torch.int32, logprobs_dtype=torch.float16),
                "plain_read": plain_read,
                "zstd_commit": lambda i: zstd.commit(i, table),
                "zstd_read": reader(zstd),
            },
            reps,
        )
        context = StageQueue(work / "context", 7, "scored")
        cd_cols = make_shard(context_distillation=True)[0]
        context.commit(0, _scored_table(cd_cols, ids, logprobs, lengths))
        mb = size / 1e6
        out.update(
            {
                "filesystem_dir": str(base),
                "tokens": tokens,
                "k": K,
                "vocab": VOCAB,
                "file_MB": mb,
                "bytes_per_topk_entry": size / (tokens * K),
                "topk_bytes_per_entry": topk_bytes / (tokens * K),
                "bytes_per_topk_entry_context_distillation": context.record(0)["bytes"] / (tokens * K),
                "copy_MBps": mb / best["copy"],
                "commit_MBps": mb / best["commit"],
                "write_MBps": mb / best["write"],
                "read_MBps": mb / best["read"],
                "plain_read_MBps": mb / best["plain_read"],
                "commit_vs_copy": best["copy"] / best["commit"],
                "write_vs_copy": best["copy"] / best["write"],
                "write_gpu_dtypes_vs_copy": best["copy"] / best["write_gpu_dtypes"],
                "read_vs_copy": best["copy"] / best["read"],
                "read_views_vs_copy": best["copy"] / best["read_views"],
                "read_vs_plain_read": best["plain_read"] / best["read"],
                # zstd: the same logical shard, so compared by time per shard.
                "zstd": {
                    "bytes_per_topk_entry": zstd.record(0)["bytes"] / (tokens * K),
                    "commit_vs_copy": best["copy"] / best["zstd_commit"],
                    "read_vs_copy": best["copy"] / best["zstd_read"],
                },
                "targets": {"bytes_per_topk_entry_max": 6.0, "throughput_vs_copy_min": 0.8},
                "reps": reps,
            }
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="directory on the run directory's filesystem (default .cache/bench)")
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    print(json.dumps(run({}, args.dir, args.reps), indent=1))


if __name__ == "__main__":
    main()

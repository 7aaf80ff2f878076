"""Generation stage: sample the student's answers to each step's prompts with vLLM.

    python -m stages.generate RUN_DIR            # long-lived worker: every active step, until STOP
    python -m stages.generate RUN_DIR --step 3   # every pending rollouts shard of step 3, then exit
    python -m stages.generate RUN_DIR --once     # one pass over what is claimable now, then exit

From Python (tests, benchmarks):

    gen = Generator(cfg, resolve_model(cfg.policy.model_name))   # version 0 = the base model
    gen.load_weights(RUN_DIR / "weights/000001", version=1)       # in place, no engine restart
    rollouts = generate_shard(gen, prompts_table, policy_version=1)
    gen.close()

One vLLM `LLM` engine per worker (tensor parallel inside the task). For step t the worker
uses the newest committed weights version v with t-1-max_staleness <= v <= t-1 (v = 0: the
base model, cfg.policy.model_name) and waits while there is none. It loads v in place,
then claims rollouts shard k once prompts shard k is committed, keeps the claim alive with a
heartbeat while generating, and commits with the shard timings in the commit record's
`extra`: {"policy_version", "gen_s", "samples", "prompt_tokens", "tokens", "truncated"}
(tokens = response tokens; truncated = answers that hit max_tokens).

What each rollout row records (DESIGN section 3): `response_ids` (every sampled token, the
stop token or the tokens of a matched stop string included), `response_text` (vLLM's decoding
with skip_special_tokens=False, so `<think>` spans stay visible; it leaves out the stop token
and ends before a matched stop string), `finish_reason` ("stop" / "length"),
`policy_version`, and `gen_logprobs`: the log-probability of each sampled token under the
distribution it was actually drawn from, i.e. vLLM's `processed_logprobs`: after temperature,
top-k and top-p (with temperature 0 the plain log-softmax).

Sampling is reproducible: each sample gets its own seed derived from
(cfg.distillation.seed, sample_id), so a redone shard draws the same answers on the same
weights, whichever worker redoes it and whatever else is in the batch (up to kernel noise).

Validation (launch/validation.py writes the requests): the coordinator puts the validation
prompts of weights version v in a second queue rooted at RUN_DIR/validation/, i.e.
RUN_DIR/validation/steps/<v:06d>/{prompts,rollouts}/ (same shard files, claims and commit
records as the training queue). A worker answers them with exactly weights v (v = 0: the base
model), one shard (`distillation.val_batch_size` prompts) per pass of its loop, after the
training shards claimable in that pass, so training keeps priority. It takes a version its
engine already holds at once (with max_staleness=0: right after generating step v+1, while
the teacher and training work on it) and loads another version only in a pass that found no
training work, so validation never starves (the end of the run is all idle). Before any
training shard the worker loads that step's weights, so a validation never leaves training
on older weights. Validation samples get their seed from their sample_id "val-<row>" like
training samples: the same row draws the same answer on the same weights in every rerun.
A validation shard's commit record `extra` holds {"validation": true, "policy_version",
"weights_committed_at" (COMMITTED.json of weights/<v>; null for v0), "gen_s", "samples",
"prompt_tokens", "tokens", "truncated"}.

In-place reload (vLLM's `reload_weights` worker method) has one trap on CPU: with tied
embeddings, `lm_head` keeps its own packed copy of the old embedding matrix, so the engine
would mix old and new weights. `SluiceWorkerExtension.sluice_reload_weights` repacks it and
then checks that `lm_head` computes with the weights it holds (see notes/platform.md).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import pyarrow as pa

from shared.config import SluiceConfig
from shared.files import read_json
from shared.queue import ClaimLostError, CorruptShardError, StageQueue
from shared.rundir import COMMITTED, RunDir, active_steps, is_committed_dir, pick_weights, weights_window
from shared.schemas import build_table
from shared.waiting import Pacer
from shared.worker import StopRequested, Worker, fault_point
from tinymodels.build import ensure_model

log = logging.getLogger("sluice.generate")

ROLE = "generation"
# Seeds are kept to 31 bits: every sampler backend takes them as a (signed) int.
_SEED_MASK = 0x7FFF_FFFF
# The first generate call with logprobs is several times slower than later ones: paid once at
# start-up, not inside the first shard's timing.
_WARMUP_PROMPT = [0, 1, 2, 3]

def resolve_model(name: str) -> Path:
    return ensure_model(name, "policy.model_name")


CPU_BATCHED_TOKENS = 4096  # vLLM's CPU default budget of tokens per engine step


def sample_seed(run_seed: int, sample_id: str) -> int:
    """The sampling seed of one sample: stable across reruns, distinct between samples."""
    digest = hashlib.blake2b(f"{run_seed}\0{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


# ---------------------------------------------------------------- the vLLM worker side


class SluiceWorkerExtension:
    """Mixed into vLLM's worker class (`LLM(worker_extension_cls=...)`), so that
    `LLM.collective_rpc("sluice_reload_weights", ...)` runs it on every tensor-parallel rank."""

    def sluice_reload_weights(self, weights_path: str) -> dict:
        # lazy: runs in vLLM's worker process; this module's own process (and bench.synthetic) need not load torch
        import torch

        t0 = time.perf_counter()
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        model = self.model_runner.get_model()
        lm_head = model.lm_head
        tied = bool(getattr(self.model_runner.model_config.hf_text_config, "tie_word_embeddings", False))
        if tied:
            # The checkpoint has no lm_head.weight, so the reload leaves lm_head alone: on CPU
            # its packed GEMM weight is still the old embedding matrix. Repack from the
            # (shared, freshly loaded) embedding tensor. A no-op on GPU.
            embed = model.model.embed_tokens
            if lm_head.weight is not embed.weight:
                lm_head.weight = embed.weight
            lm_head.quant_method.process_weights_after_loading(lm_head)
        weight = lm_head.weight
        with torch.no_grad():
            probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0))
            probe = probe.to(device=weight.device, dtype=weight.dtype)
            got = lm_head.quant_method.apply(lm_head, probe).float()
            want = torch.nn.functional.linear(probe, weight).float()
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        # A correct GEMM differs from F.linear by rounding only (~1e-2 in 16 bit); a stale packed
        # copy by however far the weights moved. That catches a broken mechanism (the tests move
        # the weights by O(1)), not a nearly unchanged step, which is harmless by the same token.
        tolerance = 1e-3 if weight.dtype == torch.float32 else 3e-2
        if not err <= tolerance:
            raise RuntimeError(
                f"after reloading {weights_path} in place, lm_head computes with other weights than "
                f"it holds (relative error {err:.3g} > {tolerance}; tied embeddings: {tied}); this vLLM "
                "version packs lm_head differently than stages/generate.py expects"
            )
        return {"reload_s": time.perf_counter() - t0, "tied": tied, "lm_head_rel_err": err}


# ------------------------------------------------------------------------ the engine


def engine_kwargs(cfg: SluiceConfig, model_path: str | os.PathLike) -> dict:
    """`vllm.LLM(**kwargs)` for the student's generation config on this machine.

    GPUs are counted through NVML (shared.distributed.cuda_available): a plain
    torch.cuda.is_available() would initialise CUDA in this process, and vLLM, which forks its
    engine processes unless CUDA is initialised, would then fork children that cannot use
    CUDA. Spawning is asked for explicitly as well."""
    # lazy: shared.distributed imports torch, and bench.synthetic runs this module without it
    from shared.distributed import cuda_available

    v = cfg.policy.generation.vllm_cfg
    on_gpu = cuda_available()
    if on_gpu:
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    backend = v.distributed_executor_backend
    if not on_gpu and backend is None and v.tensor_parallel_size == 1:
        backend = "uni"  # the engine in this process: starts in ~2 s instead of ~15 s
    if not on_gpu and v.precision != "float32":
        log.warning("policy.generation.vllm_cfg.precision=%s is used on GPU only; the CPU engine "
                    "runs float32", v.precision)
    kwargs = dict(
        model=str(model_path),
        dtype=v.precision if on_gpu else "float32",
        tensor_parallel_size=v.tensor_parallel_size,
        gpu_memory_utilization=v.gpu_memory_utilization,
        max_model_len=v.max_model_len,
        enforce_eager=v.enforce_eager,
        kv_cache_dtype=v.kv_cache_dtype,
        seed=cfg.distillation.seed,
        enable_prefix_caching=True,
        logprobs_mode="processed_logprobs",
        # By import path, not __name__: under `python -m stages.generate` that is "__main__",
        # which names another module in spawned engine processes.
        worker_extension_cls="stages.generate.SluiceWorkerExtension",
    )
    if not on_gpu:
        # vLLM on CPU crashes ("CPU Generator does not use offset") when a seeded request's
        # prefill is split across engine steps, which chunked prefill does as soon as one
        # call's prompts exceed the batched-token budget. Unchunked, a prompt waits for the
        # next step instead; the budget must then hold the longest prompt.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(v.max_model_len, CPU_BATCHED_TOKENS)
    if backend is not None:
        kwargs["distributed_executor_backend"] = backend
    return kwargs


class Generator:
    """One vLLM engine holding one weights version of the student; generates rollouts."""

    def __init__(self, cfg: SluiceConfig, model_path: str | os.PathLike, version: int = 0):
        kwargs = engine_kwargs(cfg, model_path)
        if kwargs.get("distributed_executor_backend") == "uni":
            # With the uni executor the worker runs in-process anyway; keeping the engine core
            # in-process too saves a process spawn and an IPC hop per step.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # lazy: bench.synthetic runs this module's loop without vLLM
        from vllm import LLM, SamplingParams

        self._SamplingParams = SamplingParams
        self.cfg = cfg
        self.version = version
        self.max_model_len = cfg.policy.generation.vllm_cfg.max_model_len
        self.batch_size = cfg.policy.generation_batch_size
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": _WARMUP_PROMPT}],
                          SamplingParams(max_tokens=4, logprobs=0, seed=0), use_tqdm=False)
        self.warmup_s = time.perf_counter() - t0
        log.info("vLLM engine on %s up in %.1f s (+%.1f s warm-up)", model_path, self.startup_s, self.warmup_s)

    def load_weights(self, weights_dir: str | os.PathLike, version: int) -> dict:
        """Load HF safetensors from `weights_dir` into the running engine (no restart)."""
        t0 = time.perf_counter()
        infos = self.llm.collective_rpc("sluice_reload_weights", kwargs={"weights_path": str(weights_dir)})
        # Prefix-cache blocks hold KV computed with the old weights; a hit would reuse them.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset the prefix cache after a weight reload "
                               "(requests still running?); generating now would reuse stale KV")
        self.version = version
        info = {"version": version, "path": str(weights_dir), "reload_s": time.perf_counter() - t0,
                "tied": infos[0]["tied"], "lm_head_rel_err": max(i["lm_head_rel_err"] for i in infos)}
        log.info("loaded weights version %d from %s in place in %.3f s", version, weights_dir, info["reload_s"])
        return info

    def sampling_params(self, sample_id: str, prompt_len: int):
        """The vLLM SamplingParams of one sample (its own seed; max_tokens fits max_model_len)."""
        g = self.cfg.policy.generation
        max_tokens = min(g.max_new_tokens, self.max_model_len - prompt_len)
        if max_tokens < 1:
            raise ValueError(
                f"sample {sample_id!r}: prompt of {prompt_len} tokens leaves no room to answer within "
                f"policy.generation.vllm_cfg.max_model_len={self.max_model_len}; lower "
                "data.max_input_seq_length below it (the prompts stage should drop such prompts)"
            )
        return self._SamplingParams(
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=0 if g.top_k is None else g.top_k,  # vLLM: 0 disables top-k
            max_tokens=max_tokens,
            stop_token_ids=list(g.stop_token_ids or []),
            stop=list(g.stop_strings or []) or None,
            logprobs=0,  # the sampled token's own logprob
            seed=sample_seed(self.cfg.distillation.seed, sample_id),
            skip_special_tokens=False,
        )

    def generate(self, prompt_rows: Sequence[Mapping[str, Any]], batch_size: Optional[int] = None
                 ) -> dict[str, list]:
        """Answer each row (`sample_id`, `prompt_ids`); returns the rollout columns, row-aligned:
        response_ids, response_text, finish_reason, policy_version, gen_logprobs.
        `batch_size`: prompts per vLLM call (default policy.generation_batch_size)."""
        batch_size = batch_size or self.batch_size
        prompts = [{"prompt_token_ids": list(r["prompt_ids"])} for r in prompt_rows]
        params = [self.sampling_params(r["sample_id"], len(p["prompt_token_ids"]))
                  for r, p in zip(prompt_rows, prompts)]
        cols: dict[str, list] = {"response_ids": [], "response_text": [], "finish_reason": [],
                                 "gen_logprobs": []}
        # One call per generation_batch_size prompts: vLLM schedules them together.
        for start in range(0, len(prompts), batch_size):
            stop = start + batch_size
            for out in self.llm.generate(prompts[start:stop], params[start:stop], use_tqdm=False):
                c = out.outputs[0]
                ids = list(c.token_ids)
                cols["response_ids"].append(ids)
                cols["response_text"].append(c.text)
                cols["finish_reason"].append(c.finish_reason)
                cols["gen_logprobs"].append([lp[t].logprob for t, lp in zip(ids, c.logprobs)])
        cols["policy_version"] = [self.version] * len(prompts)
        return cols

    def close(self) -> None:
        """Stop the engine (and its worker processes); a new one can be started afterwards."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_shard(generator: Generator, prompts: pa.Table, policy_version: int,
                   batch_size: Optional[int] = None) -> pa.Table:
    """The rollouts table of a prompts shard: one row per prompt row, in the same order."""
    if generator.version != policy_version:
        raise ValueError(f"the engine holds weights version {generator.version}, not {policy_version}; "
                         "call Generator.load_weights first")
    rows = [{"sample_id": s, "prompt_ids": p}
            for s, p in zip(prompts.column("sample_id").to_pylist(), prompts.column("prompt_ids").to_pylist())]
    columns: dict[str, Any] = {name: prompts.column(name) for name in prompts.column_names}
    columns.update(generator.generate(rows, batch_size=batch_size))
    return build_table("rollouts", columns)


# ------------------------------------------------------------------------ the worker


@contextmanager
def _beating(worker: Worker, status: str, detail: str):
    """Say what a long call does (one generate can take minutes; the worker's own thread keeps
    the heartbeat fresh), and let a graceful stop abandon it."""
    worker.beat(status, detail, force=True)
    with worker.interruptible():
        yield


class _GenerationWorker:
    """The claim/generate/commit loop around one Generator."""

    def __init__(self, rd: RunDir, worker: Worker, generator: Generator, base_path: Path):
        self.rd, self.worker, self.gen, self.base_path = rd, worker, generator, base_path
        self.cfg = worker.cfg
        self.loaded: tuple = (0, None)  # (version, commit time of its weights dir)
        self.committed = 0
        self.vrd = rd.validation
        self.complete_validations: dict[int, float] = {}
        # step -> when it was seen complete. Rechecked only every lease_s: a long run has many
        # steps, but a reader may still quarantine a committed shard, making it pending again.
        self.complete_steps: dict[int, float] = {}
        self.pacer = Pacer(self.cfg.queue.poll_s, self.cfg.queue.fast_poll_s)
        self.due_at: Optional[float] = None  # when what this pass waits for may land

    @staticmethod
    def _stamp(path: Optional[Path]):
        # The commit time tells a redone weights/<v> (a retried training step) from the old one.
        return None if path is None else (read_json(path / COMMITTED) or {}).get("committed_at")

    def holds(self, version: int, path: Optional[Path]) -> bool:
        return self.loaded == (version, self._stamp(path))

    def ensure_weights(self, version: int, path: Optional[Path]) -> None:
        stamp = self._stamp(path)
        if (version, stamp) == self.loaded:
            return
        if stamp is not None:
            self._learn_weights_lag(version, stamp)
        with _beating(self.worker, "loading", f"weights version {version}"):
            self.gen.load_weights(self.base_path if path is None else path, version)
        self.loaded = (version, stamp)

    def _last_scored_at(self, version: int) -> Optional[float]:
        """When step `version`'s last scored shard landed (None while it is incomplete): the
        trainer publishes weights `version` some time after that."""
        scored = StageQueue(self.rd, version, "scored", lease_s=self.cfg.queue.lease_s)
        expected, records = scored.expected(), scored.committed(fast=True)
        if expected is None or len(records) < expected:
            return None
        return max((r.get("committed_at", 0.0) for r in records.values()), default=None)

    def _learn_weights_lag(self, version: int, committed_at: float) -> None:
        scored_at = self._last_scored_at(version)
        if scored_at is not None:
            self.pacer.learn("weights", committed_at - scored_at, key=(version, committed_at))

    def _weights_due(self, version: int) -> Optional[float]:
        """When weights `version` may be published: its step's last scored shard plus the
        trainer's typical time from there (0 before it was seen once: looks tighten at once)."""
        scored_at = self._last_scored_at(version) if version >= 1 else None
        return None if scored_at is None else scored_at + (self.pacer.typical("weights") or 0.0)

    def work_step(self, step: int) -> Tuple[str, str]:
        """Do what is claimable in `step`. Returns (outcome, detail), outcome one of
        'complete', 'worked', 'no_weights' (no allowed weights version yet), 'idle'."""
        q = self.cfg.queue
        if time.monotonic() - self.complete_steps.get(step, -float("inf")) < q.lease_s:
            return "complete", f"step {step} complete"
        rollouts = StageQueue(self.rd, step, "rollouts", lease_s=q.lease_s, compression=q.compression)
        if rollouts.expected() is None:
            return "idle", f"step {step}: rollouts not declared yet"
        pending = rollouts.pending(fast=True)
        if not pending:
            self.complete_steps[step] = time.monotonic()
            return "complete", f"step {step} complete"
        picked = pick_weights(self.rd, step, self.cfg.distillation.max_staleness)
        if picked is None:
            lowest = weights_window(step, self.cfg.distillation.max_staleness).start
            self.due_at = self.pacer.earliest(self.due_at, self._weights_due(lowest))
            return "no_weights", f"step {step}: waiting for weights version >= {lowest}"
        prompts = StageQueue(self.rd, step, "prompts", lease_s=q.lease_s)
        committed = prompts.committed(fast=True)
        ready = [i for i in pending if i in committed]
        if not ready:
            return "idle", f"step {step}: waiting for prompts shards {pending}"
        self.ensure_weights(*picked)
        worked = False
        for index in ready:
            if self.worker.should_stop():
                break
            claim = rollouts.claim(index)
            if claim is None:
                continue  # another worker has it
            with claim.start_heartbeat(q.heartbeat_s):
                worked |= self.do_shard(step, index, prompts, rollouts, claim)
        if worked:
            self.pacer.won()
            return "worked", f"step {step}: generated"
        self.pacer.lost()
        return "idle", f"step {step}: shards {ready} claimed by other workers"

    def work_validation(self, may_load: bool) -> Tuple[str, str]:
        """Answer one claimable validation shard. Versions the engine holds come first (no
        reload); another version is loaded only when `may_load` (no training work waits).
        Returns (outcome, detail), outcome 'worked' or 'idle'."""
        q = self.cfg.queue
        candidates = []
        for v in active_steps(self.vrd, "rollouts"):
            if time.monotonic() - self.complete_validations.get(v, -float("inf")) < q.lease_s:
                continue
            rollouts = StageQueue(self.vrd, v, "rollouts", lease_s=q.lease_s, compression=q.compression)
            pending = rollouts.pending(fast=True)
            if not pending:
                self.complete_validations[v] = time.monotonic()
                continue
            path = None if v == 0 else self.rd.weights_dir(v)
            if path is not None and not is_committed_dir(path):
                continue  # requested before its training step ended: not yet
            prompts = StageQueue(self.vrd, v, "prompts", lease_s=q.lease_s)
            done = prompts.committed(fast=True)
            ready = [i for i in pending if i in done]
            if ready:
                candidates.append((not self.holds(v, path), v, path, ready, rollouts, prompts))
        for needs_load, v, path, ready, rollouts, prompts in sorted(candidates, key=lambda c: c[:2]):
            if needs_load and not may_load:
                continue
            for index in ready:
                if self.worker.should_stop():
                    return "idle", "stopping"
                claim = rollouts.claim(index)
                if claim is None:
                    continue  # another worker has it
                with claim.start_heartbeat(q.heartbeat_s):
                    self.ensure_weights(v, path)
                    if self.do_shard(v, index, prompts, rollouts, claim, validation=True):
                        return "worked", f"validation of weights v{v}: shard {index}"
        return "idle", "no claimable validation shards"

    def do_shard(self, step: int, index: int, prompts: StageQueue, rollouts: StageQueue, claim,
                 validation: bool = False) -> bool:
        version = self.gen.version
        what = f"validation v{step}" if validation else f"step {step}"
        try:
            table = prompts.read(index)
        except CorruptShardError as e:
            log.error("%s", e)  # quarantined: the coordinator rewrites it, we come back then
            return False
        with _beating(self.worker, "validating" if validation else "generating",
                      f"{what} shard {index} ({table.num_rows} prompts, weights v{version})"):
            fault_point("generate_shard", step)  # tests: a generate that takes very long
            t0 = time.perf_counter()
            out = generate_shard(self.gen, table, version,
                                 batch_size=self.cfg.distillation.val_batch_size if validation else None)
            gen_s = time.perf_counter() - t0
        self.worker.beat("committing", f"{what} shard {index}")
        lengths = [len(ids) for ids in out.column("response_ids").to_pylist()]
        extra = {
            **({"validation": True, "weights_committed_at": self.loaded[1]} if validation else {}),
            "policy_version": version,
            "gen_s": round(gen_s, 4),
            "samples": out.num_rows,
            "prompt_tokens": sum(len(p) for p in table.column("prompt_ids").to_pylist()),
            "tokens": sum(lengths),
            "truncated": out.column("finish_reason").to_pylist().count("length"),
        }
        try:
            rollouts.commit(index, out, extra_meta=extra, claim=claim)
        except ClaimLostError as e:
            log.warning("%s", e)
            return False
        self.committed += 1
        log.info("%s shard %d: %d samples, %d tokens in %.2f s (%.0f tok/s), weights v%d", what, index,
                 out.num_rows, extra["tokens"], gen_s, extra["tokens"] / max(gen_s, 1e-9), version)
        return True


def run_worker(run_dir, step: Optional[int] = None, once: bool = False,
               make_engine: Optional[Callable[[SluiceConfig], Any]] = None) -> int:
    """The generation worker; returns how many rollouts shards it committed.

    step=N: every pending shard of step N (waiting for its weights and prompts), then return.
    Otherwise every active step in ascending order, then validation shards (see the module
    docstring), until coordinator/STOP; once=True: a single pass over what is claimable now
    (all claimable validation shards included). Validation shards count in the return value.
    `make_engine(cfg)` replaces the vLLM Generator (bench/synthetic.py: the same loop around
    a sleep).
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    worker = Worker(rd, ROLE)
    worker.install_stop_handler()
    cfg = worker.cfg
    loop = None
    try:
        base_path = resolve_model(cfg.policy.model_name) if make_engine is None else Path(cfg.policy.model_name)
        worker.beat("starting", f"vLLM engine on {base_path}", force=True)
        with _beating(worker, "starting", f"vLLM engine on {base_path}"):
            # Tens of seconds on a large model: keep beating.
            gen = Generator(cfg, base_path) if make_engine is None else make_engine(cfg)
        with gen:
            loop = _GenerationWorker(rd, worker, gen, base_path)
            while not worker.should_stop():
                steps = [step] if step is not None else active_steps(rd, "rollouts")
                worked, outcome, detail = False, "idle", "no active steps"
                loop.due_at = None
                for t in steps:
                    outcome, detail = loop.work_step(t)
                    worked |= outcome == "worked"
                    if outcome == "no_weights":
                        break  # later steps need even newer weights
                if step is not None and outcome == "complete":
                    break
                if step is None:
                    # After this pass's training shards; with `once`, every claimable one.
                    may_load = not worked
                    while not worker.should_stop():
                        v_outcome, v_detail = loop.work_validation(may_load)
                        if v_outcome != "worked":
                            break
                        worked, detail = True, v_detail
                        if not once:
                            break
                if once:
                    break
                if not worked:
                    worker.beat("waiting", detail)
                    loop.pacer.sleep(loop.due_at)
    except StopRequested:
        log.info("stopped on %s; claims released", worker.stop_signal)
    except BaseException as e:
        worker.fail(e)
        raise
    worker.finish()
    return loop.committed if loop is not None else 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m stages.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the run directory (holds config.yaml)")
    p.add_argument("--step", type=int, default=None, help="do every pending shard of this step, then exit")
    p.add_argument("--once", action="store_true", help="one pass over the active steps, then exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    n = run_worker(args.run_dir, step=args.step, once=args.once)
    log.info("committed %d rollouts shards", n)


if __name__ == "__main__":
    main()

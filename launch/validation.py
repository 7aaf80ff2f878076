"""Validation: the coordinator's side. Requests answers to the validation prompts from the
generation workers for one weights version, then scores them with math-verify.

    from launch.validation import Validation
    val = Validation(RunDir(path), cfg)
    val.prepare()                     # once, after the training data: data/validation.arrow
    val.versions(total_steps)         # [0 if val_at_start, every val_period, total if val_at_end]
    for row in val.poll(trained_step, total_steps):   # each coordinator tick
        logger.log(row, step=row["step"])             # {"step", "validation/accuracy", ...}
    val.done(total_steps)             # every scheduled validation collected: the run may end
    val.collect(3)                    # score version 3 now (its rollouts must be complete)

When: version 0 (the base model) before step 1 with `distillation.val_at_start`; every
`distillation.val_period` steps (0: never); the last step with `distillation.val_at_end`.
Version v's prompts are written once training step v is done (weights/<v> committed), and the
generation workers answer them with exactly those weights (stages/generate.py: between
training work, training first).

Data: `data.validation` if set, else the rows held out of train
(`data.train.split_validation_size`, in data/heldout.json), capped at
`distillation.max_val_samples` (the first rows, after `repeat`), prompts built with the same
PromptBuilder as training (the dataset's prompt_file, else data.default's). Rows without a
ground-truth answer and prompts that leave no room to answer are skipped and counted. One
answer per prompt, sampled with the policy's generation config (temperature, top-p, top-k,
max_new_tokens); each row's seed comes from its sample_id "val-<row:05d>", the same for every
version, so reruns draw identical answers and versions are compared on the same seeds.

Files (a second queue rooted at RUN_DIR/validation, same formats as RUN_DIR/steps):

    data/validation.arrow                       tokenized validation prompts (fixed at first start)
    validation/summary.json                     {"rows", "source", "skipped"}
    validation/steps/<v:06d>/prompts/           shards of val_batch_size prompts, step column = v
    validation/steps/<v:06d>/rollouts/          the answers (policy_version = v)
    validation/steps/<v:06d>/result.json        {"step", "validation/accuracy",
                                                 "validation/avg_length", "samples", "correct",
                                                 "truncated", "policy_version", "collected_at"}
    validation/samples-<v:06d>.jsonl            the first logger.num_val_samples_to_print answers
                                                (negative: all): {"sample_id", "problem",
                                                "answer", "response_text", "response_tokens",
                                                "finish_reason", "correct"}
    metrics.jsonl                               + {"step": v, "validation/accuracy": a,
                                                   "validation/avg_length": l}

Scoring as NeMo-RL's math environment: gold = parse("\\boxed{" + answer + "}"), prediction =
parse(response_text) with math-verify's default extraction, correct = verify(gold, prediction).
accuracy = correct / samples; avg_length = mean response tokens. Never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import List, Optional

import pyarrow as pa
import pyarrow.compute as pc

from shared import schemas
from shared.chat import ChatTokenizer
from shared.data import PromptBuilder, load_prompt_rows, load_rows, save_prompt_rows
from shared.files import atomic_write_json, read_json
from shared.models import find_model
from shared.queue import CorruptShardError, StageQueue
from shared.rundir import (DATA_SUMMARY, HELDOUT, VALIDATION_RESULT, RunDir, append_metrics, read_metrics,
                           step_numbers)

log = logging.getLogger("sluice.validation")

ACCURACY = "validation/accuracy"
AVG_LENGTH = "validation/avg_length"
DATA_FILE = "validation.arrow"  # in RUN_DIR/data/


def scheduled_versions(cfg, total_steps: int) -> List[int]:
    """Weights versions to validate in a run of `total_steps` steps, ascending."""
    d = cfg.distillation
    out = set()
    if d.val_at_start:
        out.add(0)
    if d.val_period > 0:
        out.update(range(d.val_period, total_steps + 1, d.val_period))
    if d.val_at_end and total_steps > 0:
        out.add(total_steps)
    return sorted(out)


def _timeouts() -> Optional[int]:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def is_correct(response: str, answer: Optional[str]) -> bool:
    """math-verify's verdict on `response` against the ground truth `answer`."""
    if answer is None or not response:
        return False
    # lazy: 0.4 s to import; only scoring a validation needs it
    from math_verify import parse, verify

    t = _timeouts()
    try:
        gold = parse("\\boxed{" + answer + "}", parsing_timeout=t) or parse(answer, parsing_timeout=t)
        pred = parse(response, parsing_timeout=t)
        return bool(pred) and bool(verify(gold, pred, timeout_seconds=t))
    except Exception:  # a pathological answer: wrong, never a crash of the coordinator
        return False


class Validation:
    """The coordinator's validation bookkeeping; all state is in RUN_DIR (restartable)."""

    def __init__(self, run_dir, cfg):
        self.rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.cfg = cfg
        self.vrd = self.rd.validation
        self._collected: set = set()
        self._table: Optional[pa.Table] = None

    # ------------------------------------------------------------------ data

    @property
    def enabled(self) -> bool:
        d = self.cfg.distillation
        return bool(d.val_at_start or d.val_at_end or d.val_period > 0)

    def versions(self, total_steps: int) -> List[int]:
        if not self.enabled or self.num_rows() == 0:
            return []
        return scheduled_versions(self.cfg, total_steps)

    def _source(self):
        """(rows, dataset config for the prompt builder, label), or None without validation data."""
        cfg = self.cfg
        if cfg.data.validation.dataset_name is not None or cfg.data.validation.data_path is not None:
            rows, skipped = load_rows(cfg.data.validation, cfg, "validation")
            return rows, skipped, cfg.data.validation, "data.validation"
        held = read_json(self.rd.data_file(HELDOUT))
        if held:
            return held, {}, cfg.data.train, "held out of data.train"
        return None

    def prepare(self, tokenizer=None) -> int:
        """Tokenize the validation prompts once (data/validation.arrow); returns the rows.
        0 (with a warning) when validation is enabled but there is no validation data."""
        path = self.rd.data_file(DATA_FILE)
        if path.exists() or not self.enabled:
            return self.num_rows()
        cfg = self.cfg
        source = self._source()
        if source is None:
            log.warning("validation is enabled (distillation.val_period=%s, val_at_start=%s, "
                        "val_at_end=%s) but there is no validation data: set data.validation or "
                        "data.train.split_validation_size; no validation in this run",
                        cfg.distillation.val_period, cfg.distillation.val_at_start,
                        cfg.distillation.val_at_end)
            return 0
        rows, skipped, ds, label = source
        if tokenizer is None:
            tokenizer = ChatTokenizer.from_dir(find_model(cfg.policy.tokenizer.name or cfg.policy.model_name))

        builder = PromptBuilder(cfg, tokenizer, ds)
        limit = min(cfg.data.max_input_seq_length, cfg.policy.max_total_sequence_length - 1,
                    cfg.policy.generation.vllm_cfg.max_model_len - 1)
        skipped = dict(skipped, no_answer=0, prompt_too_long=0)
        kept = []
        for r in rows:
            if len(kept) >= cfg.distillation.max_val_samples:
                break
            if r.get("answer") is None:
                skipped["no_answer"] += 1
                continue
            ids = builder.prompt_ids(r["problem"])
            if len(ids) > limit:
                skipped["prompt_too_long"] += 1
                continue
            kept.append({**r, "prompt_ids": ids})
        save_prompt_rows(path, kept)
        atomic_write_json(self.vrd.path(DATA_SUMMARY),
                          {"rows": len(kept), "source": label, "skipped": skipped})
        if not kept:
            log.warning("validation: no usable validation rows (%s; skipped %s)", label, skipped)
        log.info("[validation] %d prompts from %s (skipped: %s)", len(kept), label, skipped)
        self._table = None
        return len(kept)

    def table(self) -> pa.Table:
        if self._table is None:
            self._table = load_prompt_rows(self.rd.data_file(DATA_FILE))
        return self._table

    def num_rows(self) -> int:
        return self.table().num_rows if self.rd.data_file(DATA_FILE).exists() else 0

    # ------------------------------------------------------------------ requests

    def num_shards(self) -> int:
        return max(1, -(-self.num_rows() // max(1, self.cfg.distillation.val_batch_size)))

    def request(self, version: int) -> None:
        """Write the validation prompts of weights `version` (idempotent)."""
        n_rows = self.num_rows()
        if n_rows == 0:
            return
        prompts = StageQueue(self.vrd, version, "prompts", lease_s=self.cfg.queue.lease_s)
        if prompts.expected() is None:
            prompts.expect(self.num_shards())
        n = prompts.expected()
        rollouts = StageQueue(self.vrd, version, "rollouts")
        if rollouts.expected() is None:
            rollouts.expect(n)
        pending = prompts.pending()
        if not pending:
            return
        rows = self.table().to_pylist()
        per = -(-n_rows // n)
        for k in pending:
            part = [{"sample_id": f"val-{i:05d}", "step": version, "problem": r["problem"],
                     "answer": r["answer"], "prompt_ids": r["prompt_ids"], "dataset": r["dataset"],
                     "index": r["index"], "static_trace": None}
                    for i, r in enumerate(rows[k * per:(k + 1) * per], start=k * per)]
            prompts.commit(k, schemas.build_table("prompts", part))
        log.info("[validation] requested weights v%d: %d prompts in %d shards", version, n_rows, n)

    def is_requested(self, version: int) -> bool:
        return StageQueue(self.vrd, version, "rollouts").expected() is not None

    def is_complete(self, version: int) -> bool:
        return StageQueue(self.vrd, version, "rollouts").is_complete()

    def is_collected(self, version: int) -> bool:
        if version not in self._collected and self._result_path(version).is_file():
            self._collected.add(version)
        return version in self._collected

    def _result_path(self, version: int):
        return self.rd.validation_result(version)

    # ------------------------------------------------------------------ scoring

    def collect(self, version: int) -> dict:
        """Score the (complete) validation rollouts of `version`: writes the samples file and
        result.json, appends the metrics row to metrics.jsonl (once), returns that row."""
        q = StageQueue(self.vrd, version, "rollouts")
        if not q.is_complete():
            raise RuntimeError(f"{q.dir}: validation of weights v{version} is not complete "
                               f"(pending shards {q.pending() if q.expected() is not None else '?'})")
        tables = [q.read(k) for k in sorted(q.committed())]
        table = pa.concat_tables(tables) if tables else None
        rows = table.select(["sample_id", "problem", "answer", "response_text", "finish_reason",
                             "policy_version"]).to_pylist() if table is not None else []
        lengths = (pc.list_value_length(table.column("response_ids")).to_pylist()
                   if table is not None else [])
        correct = [is_correct(r["response_text"], r["answer"]) for r in rows]
        n = len(rows)
        metrics = {"step": version,
                   ACCURACY: sum(correct) / n if n else 0.0,
                   AVG_LENGTH: sum(lengths) / n if n else 0.0}
        versions = sorted({r["policy_version"] for r in rows})
        if versions and versions != [version]:
            log.warning("validation v%d: answers generated with weights versions %s", version, versions)

        keep = self.cfg.logger.num_val_samples_to_print
        keep = n if keep < 0 else min(keep, n)
        samples = [{"sample_id": r["sample_id"], "problem": r["problem"], "answer": r["answer"],
                    "response_text": r["response_text"], "response_tokens": length,
                    "finish_reason": r["finish_reason"], "correct": ok}
                   for r, length, ok in zip(rows[:keep], lengths, correct)]
        path = self.vrd.path(f"samples-{version:06d}.jsonl")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(s) + "\n" for s in samples))
        os.replace(tmp, path)

        if not self._metrics_has(version):
            append_metrics(self.rd, metrics)
        atomic_write_json(self._result_path(version), {
            **metrics, "samples": n, "correct": sum(correct),
            "truncated": sum(r["finish_reason"] == "length" for r in rows),
            "policy_version": versions, "collected_at": time.time()})
        self._collected.add(version)
        log.info("[validation] weights v%d: accuracy=%.4f avg_length=%.1f (%d/%d correct)",
                 version, metrics[ACCURACY], metrics[AVG_LENGTH], sum(correct), n)
        for s in samples:
            log.info("[validation] v%d %s %s | answer %s | response: %r", version, s["sample_id"],
                     "correct" if s["correct"] else "wrong", s["answer"], s["response_text"][:300])
        return metrics

    def _metrics_has(self, version: int) -> bool:
        """metrics.jsonl already holds this collection's row of `version` (a restart after the
        row was appended but before result.json was written). Rows of superseded collections
        (shared.retention.invalidate_after) do not count."""
        rows = sum(row.get("step") == version and ACCURACY in row for row in read_metrics(self.rd))
        superseded = len(list(self.vrd.step_dir(version).glob(f"{VALIDATION_RESULT}.superseded-*")))
        return rows > superseded

    # ------------------------------------------------------------------ the coordinator's tick

    def poll(self, trained_step: int, total_steps: int) -> List[dict]:
        """Request the due validations (version <= trained_step) and collect the complete ones;
        returns the new metrics rows (already in metrics.jsonl; log them to wandb/TensorBoard)."""
        out = []
        for v in self.versions(total_steps):
            if v > trained_step or self.is_collected(v):
                continue
            if not self.is_requested(v) or StageQueue(self.vrd, v, "prompts").pending():
                self.request(v)
            if self.is_complete(v):
                try:
                    out.append(self.collect(v))
                except CorruptShardError as e:
                    log.error("%s", e)  # quarantined and pending again: a worker redoes it
        return out

    def done(self, total_steps: int) -> bool:
        """Every scheduled validation is collected (the coordinator may write STOP)."""
        return all(self.is_collected(v) for v in self.versions(total_steps))

    def break_claims(self, job_id: str) -> int:
        """Release a dead job's validation claims (as the coordinator does for training shards)."""
        return sum(len(StageQueue(self.vrd, v, "rollouts").break_claims(job_id))
                   for v in step_numbers(self.vrd))

    def forget_after(self, ckpt: int) -> None:
        """Training restarts from checkpoint `ckpt`: the results of later versions were set
        aside (shared.retention.invalidate_after) and are no longer collected."""
        self._collected = {v for v in self._collected if v <= ckpt}

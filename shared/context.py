"""Context / self-distillation: the teacher's privileged prompt and its bookkeeping.

    builder = TeacherPromptBuilder(cfg, tokenizer)
    tp = builder.build(problem, response_ids, response_text, static_trace=None)
    tp.ids            # teacher prompt ids (None when the sample is dropped)
    tp.trace_found, tp.truncated, tp.drop_reason
    counts = count([tp, ...]); metrics(counts)   # context_distillation_* metrics

The teacher sees `teacher_prefix_template.format(problem=<original problem>, trace=<trace>)`
as the single user message, through the chat template with the generation prompt; the
student's `response_ids` are appended verbatim by the scorer (never re-tokenised), so
response token i is predicted at teacher position `len(ids) - 1 + i`.

Overflow (`teacher.max_total_sequence_length`, `overflow_policy`): a response longer than
the limit is dropped (`too_long_response`), one exactly as long leaves the prompt no room
(`no_prefix_budget`); otherwise the prompt's budget is the limit minus the response length,
and a rendered prompt over it is cut by the policy:
- `truncate_prefix_only` (the fork's default): its last `budget` tokens, so the start of the
  user turn and of the instruction may be lost;
- `truncate_prefix_from_end` (the fork's): its first `budget` tokens, so the template's
  closing part (end of the user turn, assistant header) may be lost;
- `shorten_trace` (Sluice's own): the longest start of the trace whose re-rendered prompt
  fits, so the prompt's start and the template's closing part stay intact; a prompt that does
  not fit even with an empty trace is dropped (`no_prefix_budget`).
The two fork policies cut token ids of the rendered prompt, as the fork does, and never drop
a sample for its prompt's length. Any cut marks the sample `truncated`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, get_args

from shared.config import OverflowPolicy
from shared.data import chat_ids

THINK = re.compile(r"<think>(.*?)</think>", flags=re.DOTALL)
THINK_OPEN = re.compile(r"<think>(.*)", flags=re.DOTALL)

DROP_REASONS = ("too_long_response", "invalid_message", "no_prefix_budget", "missing_trace")


def extract_first_think_span(text: Optional[str]) -> str:
    """The first <think> span, stripped; an unclosed span runs to the end; no tag: ''."""
    if not text:
        return ""
    m = THINK.search(text)
    if m:
        return m.group(1).strip()
    m = THINK_OPEN.search(text)
    return m.group(1).strip() if m else ""


@dataclass
class TeacherPrompt:
    ids: Optional[List[int]]
    trace_found: bool
    truncated: bool = False
    drop_reason: Optional[str] = None
    trace_chars: int = 0
    trace_tokens: int = 0


class TeacherPromptBuilder:
    def __init__(self, cfg, tokenizer):
        c = cfg.distillation.context_distillation
        self.template = c.teacher_prefix_template
        self.static = c.trace_source == "static_dataset"
        self.drop_missing = c.trace_extractor.missing_trace_policy == "drop_sample"
        self.max_len = cfg.teacher.max_total_sequence_length
        self.overflow = c.overflow_policy
        assert self.overflow in get_args(OverflowPolicy), self.overflow  # config_check refuses others
        self.kwargs = dict(cfg.teacher.tokenizer.chat_template_kwargs
                           or cfg.policy.tokenizer.chat_template_kwargs or {})
        self.tokenizer = tokenizer

    def render(self, problem: str, trace: str) -> List[int]:
        text = self.template.format(problem=problem, trace=trace)
        return chat_ids(self.tokenizer, [{"role": "user", "content": text}], self.kwargs)

    def _trace_tokens(self, trace: str) -> List[int]:
        return self.tokenizer(trace, add_special_tokens=False)["input_ids"]

    def build(self, problem: Optional[str], response_ids: List[int], response_text: str,
              static_trace: Optional[str] = None) -> TeacherPrompt:
        if not isinstance(problem, str) or not problem.strip() or len(response_ids) == 0:
            return TeacherPrompt(None, False, drop_reason="invalid_message")
        trace = extract_first_think_span(static_trace if self.static else response_text)
        found = bool(trace)
        tp = TeacherPrompt(None, found)
        if found:
            tp.trace_chars = len(trace)
            tp.trace_tokens = len(self._trace_tokens(trace))
        elif self.drop_missing:
            tp.drop_reason = "missing_trace"
            return tp
        budget = self.max_len - len(response_ids)
        if len(response_ids) > self.max_len:
            tp.drop_reason = "too_long_response"
            return tp
        if budget <= 0:
            tp.drop_reason = "no_prefix_budget"
            return tp
        ids = self.render(problem, trace)
        if len(ids) <= budget:
            tp.ids = ids
            return tp
        if self.overflow == "truncate_prefix_only":
            tp.ids, tp.truncated = ids[-budget:], True
            return tp
        if self.overflow == "truncate_prefix_from_end":
            tp.ids, tp.truncated = ids[:budget], True
            return tp
        # shorten_trace: keep the longest start of the trace that fits (binary search over its
        # tokens; rendering is monotone in the kept length up to tokenizer merges at the cut,
        # which the final check guards).
        tokens = self._trace_tokens(trace)
        lo, hi, best = 0, len(tokens), None
        while lo <= hi:
            mid = (lo + hi) // 2
            cand = self.render(problem, self.tokenizer.decode(tokens[:mid]).strip() if mid else "")
            if len(cand) <= budget:
                best, lo = cand, mid + 1
            else:
                hi = mid - 1
        if best is None:
            tp.drop_reason = "no_prefix_budget"
            return tp
        tp.ids, tp.truncated = best, True
        return tp


def count(prompts: Iterable[TeacherPrompt]) -> Dict[str, int]:
    """Additive counts of one shard; summed over shards, then turned into metrics."""
    c = {"samples": 0, "trace_hits": 0, "trace_chars": 0, "trace_tokens": 0, "truncated": 0,
         "valid": 0, **{f"dropped_{r}": 0 for r in DROP_REASONS}}
    for p in prompts:
        c["samples"] += 1
        if p.trace_found:
            c["trace_hits"] += 1
            c["trace_chars"] += p.trace_chars
            c["trace_tokens"] += p.trace_tokens
        if p.drop_reason:
            c[f"dropped_{p.drop_reason}"] += 1
            continue
        c["valid"] += 1
        c["truncated"] += int(p.truncated)
    return c


def add_counts(a: Dict[str, int], b: Dict[str, int]) -> Dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}


def metrics(c: Dict[str, int]) -> Dict[str, float]:
    """The runbook system's metric names and definitions."""
    n, hits = c.get("samples", 0), c.get("trace_hits", 0)
    if n == 0:
        return {}
    dropped = sum(c.get(f"dropped_{r}", 0) for r in DROP_REASONS)
    return {
        "context_distillation_trace_coverage": hits / n,
        "context_distillation_trace_mean_chars": c.get("trace_chars", 0) / max(hits, 1),
        "context_distillation_trace_mean_tokens": c.get("trace_tokens", 0) / max(hits, 1),
        "context_distillation_prefix_truncation_count": float(c.get("truncated", 0)),
        "context_distillation_prefix_truncation_rate": c.get("truncated", 0) / max(c.get("valid", 0), 1),
        "context_distillation_dropped_samples": float(dropped),
        **{f"context_distillation_dropped_{r}": float(c.get(f"dropped_{r}", 0)) for r in DROP_REASONS},
        "context_distillation_valid_samples": float(c.get("valid", 0)),
    }

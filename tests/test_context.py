"""Context distillation: trace extraction, the teacher prompt, overflow, and the metrics."""

import pytest

from shared.context import (TeacherPromptBuilder, count, extract_first_think_span, metrics)
from shared.data import chat_ids
from shared.recipe import load


@pytest.mark.parametrize("text,trace", [
    ("<think> add 2 and 3 </think> so \\boxed{5}", "add 2 and 3"),
    ("<think>first</think> then <think>second</think>", "first"),
    ("prefix <think>\ncut off by max tokens", "cut off by max tokens"),   # unclosed: to the end
    ("no tags here", ""),
    ("<think>   </think> answer", ""),                                      # empty span: no trace
    ("", ""),
    (None, ""),
])
def test_extract_first_think_span(text, trace):
    assert extract_first_think_span(text) == trace


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["student"])


def make_builder(tokenizer, *overrides):
    cfg, _ = load("smoke-self", list(overrides))
    return cfg, TeacherPromptBuilder(cfg, tokenizer)


def test_teacher_prompt_is_template_through_chat_template(tokenizer):
    cfg, b = make_builder(tokenizer)
    problem = "What is 2 + 3?"
    response = "<think>2 + 3 = 5</think> The answer is 5."
    resp_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    tp = b.build(problem, resp_ids, response)
    text = ("You are given a problem and a trace: What is 2 + 3? + 2 + 3 = 5. "
            "Solve it on your own.")
    expected = chat_ids(tokenizer, [{"role": "user", "content": text}], {})
    assert tp.ids == expected
    # The exact rendering: one user turn, then the assistant header (generation prompt).
    assert tokenizer.decode(tp.ids).startswith("<|im_start|>user\nYou are given a problem and a trace: What is 2 + 3?")
    assert tokenizer.decode(tp.ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tp.trace_found and not tp.truncated and tp.drop_reason is None
    assert tp.trace_chars == len("2 + 3 = 5")
    assert tp.trace_tokens == len(tokenizer("2 + 3 = 5", add_special_tokens=False)["input_ids"])


def test_static_trace_from_dataset_column(tokenizer):
    _, b = make_builder(tokenizer, "distillation.context_distillation.trace_source=static_dataset",
                        "distillation.context_distillation.static_trace.answer_column=solution")
    resp = tokenizer("<think>student's own</think>", add_special_tokens=False)["input_ids"]
    tp = b.build("Q?", resp, "<think>student's own</think>", static_trace="<think>from data</think> x")
    assert tp.trace_found
    assert "from data" in tokenizer.decode(tp.ids) and "student's own" not in tokenizer.decode(tp.ids)


def test_known_cases_give_exact_metrics(tokenizer):
    # Teacher budget 120 tokens: long traces must be truncated, an overlong response dropped.
    cfg, b = make_builder(tokenizer, "teacher.max_total_sequence_length=120")
    short = tokenizer("The answer is 5.", add_special_tokens=False)["input_ids"]
    long_trace = " ".join(f"step {i} adds one more" for i in range(60))
    cases = [
        ("found", b.build("What is 2 + 3?", short, "<think>2 + 3 = 5</think> 5")),
        ("missing-empty", b.build("What is 1 + 1?", short, "just 2")),
        ("unterminated", b.build("What is 4 + 4?", short, "<think>4 + 4 is 8")),
        ("prefix-too-long", b.build("What is 9 + 9?", short, f"<think>{long_trace}</think>")),
        ("response-too-long", b.build("What is 7 + 7?", list(range(200, 200 + 130)), "<think>x</think>")),
        ("no-budget", b.build("What is 6 + 6?", list(range(200, 200 + 118)), "<think>x</think>")),
        ("invalid", b.build("", short, "<think>x</think>")),
    ]
    tp = dict(cases)
    assert tp["found"].ids and not tp["found"].truncated
    assert tp["missing-empty"].ids and not tp["missing-empty"].trace_found
    assert tp["unterminated"].trace_found
    assert "4 + 4 is 8" in tokenizer.decode(tp["unterminated"].ids)
    trunc = tp["prefix-too-long"]
    assert trunc.truncated and trunc.drop_reason is None
    assert len(trunc.ids) + len(short) <= 120
    full = b.render("What is 9 + 9?", long_trace)
    # Shortened from the end of the trace: the prompt's start and its closing part are intact.
    head = b.render("What is 9 + 9?", "")
    closing = tokenizer(". Solve it on your own.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert trunc.ids[:20] == full[:20]
    assert trunc.ids[-len(closing):] == closing == full[-len(closing):]
    assert len(head) < len(trunc.ids) < len(full)
    assert tp["response-too-long"].drop_reason == "too_long_response"
    assert tp["no-budget"].drop_reason == "no_prefix_budget"
    assert tp["invalid"].drop_reason == "invalid_message"

    m = metrics(count(t for _, t in cases))
    # 7 samples; traces found in: found, unterminated, prefix-too-long, response-too-long,
    # no-budget (the trace is extracted before the length checks) = 5.
    assert m["context_distillation_trace_coverage"] == pytest.approx(5 / 7)
    assert m["context_distillation_valid_samples"] == 4.0
    assert m["context_distillation_prefix_truncation_count"] == 1.0
    assert m["context_distillation_prefix_truncation_rate"] == pytest.approx(1 / 4)
    assert m["context_distillation_dropped_samples"] == 3.0
    assert m["context_distillation_dropped_too_long_response"] == 1.0
    assert m["context_distillation_dropped_no_prefix_budget"] == 1.0
    assert m["context_distillation_dropped_invalid_message"] == 1.0
    assert m["context_distillation_dropped_missing_trace"] == 0.0
    hits = [tp["found"], tp["unterminated"], tp["prefix-too-long"], tp["response-too-long"], tp["no-budget"]]
    assert m["context_distillation_trace_mean_chars"] == pytest.approx(sum(h.trace_chars for h in hits) / 5)
    assert m["context_distillation_trace_mean_tokens"] == pytest.approx(sum(h.trace_tokens for h in hits) / 5)


def test_missing_trace_drop_policy(tokenizer):
    _, b = make_builder(tokenizer, "distillation.context_distillation.trace_extractor.missing_trace_policy=drop_sample")
    short = tokenizer("2", add_special_tokens=False)["input_ids"]
    tps = [b.build("Q1?", short, "no trace"), b.build("Q2?", short, "<think>t</think>")]
    assert tps[0].ids is None and tps[0].drop_reason == "missing_trace"
    m = metrics(count(tps))
    assert m["context_distillation_dropped_missing_trace"] == 1.0
    assert m["context_distillation_dropped_samples"] == 1.0
    assert m["context_distillation_valid_samples"] == 1.0
    assert m["context_distillation_trace_coverage"] == 0.5

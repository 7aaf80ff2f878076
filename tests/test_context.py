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
    cfg, b = make_builder(tokenizer, "teacher.max_total_sequence_length=120",
                          "distillation.context_distillation.overflow_policy=shorten_trace")
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


# The teacher prompt of "What is 9 + 9?" with the trace "9 + 9 = 18" through the tiny
# tokenizer's chat template: 61 ids, '<|im_start|>user\nYou are given a problem and a trace:
# What is 9 + 9? + 9 + 9 = 18. Solve it on your own.<|im_end|>\n<|im_start|>assistant\n'.
NINE_PROMPT = [508, 350, 198, 337, 322, 304, 72, 298, 77, 256, 450, 366, 418, 76, 317, 256, 261,
               81, 64, 363, 25, 220, 287, 269, 220, 24, 295, 220, 24, 30, 295, 220, 24, 295, 220,
               24, 343, 220, 16, 23, 13, 220, 50, 365, 298, 260, 83, 446, 220, 88, 316, 81, 220,
               277, 77, 13, 509, 198, 508, 338, 198]
NINE_TRACE = "9 + 9 = 18"


def nine(b, n_response):
    """The 9 + 9 sample with a response of n_response ids (the builder never reads them)."""
    return b.build("What is 9 + 9?", list(range(300, 300 + n_response)), f"<think>{NINE_TRACE}</think> 18")


def test_overflow_policies_keep_what_their_names_say(tokenizer):
    # teacher.max_total_sequence_length=66 and a 10-token response: the prompt's budget is 56,
    # 5 ids short of the 61 the full prompt needs.
    cut = {}
    for policy in ("truncate_prefix_only", "truncate_prefix_from_end", "shorten_trace"):
        _, b = make_builder(tokenizer, "teacher.max_total_sequence_length=66",
                            f"distillation.context_distillation.overflow_policy={policy}")
        assert b.render("What is 9 + 9?", NINE_TRACE) == NINE_PROMPT
        cut[policy] = nine(b, 10)
        assert cut[policy].truncated and cut[policy].drop_reason is None
        assert cut[policy].trace_found and cut[policy].trace_tokens == 8

    # The fork's truncate_prefix_only: the last 56 ids; the first 5 ("<|im_start|>user\nYou are")
    # are gone, the template's closing part is kept.
    ids = cut["truncate_prefix_only"].ids
    assert ids == [304, 72, 298, 77, 256, 450, 366, 418, 76, 317, 256, 261, 81, 64, 363, 25, 220,
                   287, 269, 220, 24, 295, 220, 24, 30, 295, 220, 24, 295, 220, 24, 343, 220, 16,
                   23, 13, 220, 50, 365, 298, 260, 83, 446, 220, 88, 316, 81, 220, 277, 77, 13,
                   509, 198, 508, 338, 198]
    assert tokenizer.decode(ids) == (" given a problem and a trace: What is 9 + 9? + 9 + 9 = 18. "
                                     "Solve it on your own.<|im_end|>\n<|im_start|>assistant\n")

    # The fork's truncate_prefix_from_end: the first 56 ids; the last 5 (the end of the user
    # turn and the assistant header) are gone.
    ids = cut["truncate_prefix_from_end"].ids
    assert ids == [508, 350, 198, 337, 322, 304, 72, 298, 77, 256, 450, 366, 418, 76, 317, 256,
                   261, 81, 64, 363, 25, 220, 287, 269, 220, 24, 295, 220, 24, 30, 295, 220, 24,
                   295, 220, 24, 343, 220, 16, 23, 13, 220, 50, 365, 298, 260, 83, 446, 220, 88,
                   316, 81, 220, 277, 77, 13]
    assert tokenizer.decode(ids) == ("<|im_start|>user\nYou are given a problem and a trace: "
                                     "What is 9 + 9? + 9 + 9 = 18. Solve it on your own.")

    # Sluice's shorten_trace: the trace cut to "9 +" and the prompt re-rendered: 55 ids, the
    # template whole.
    ids = cut["shorten_trace"].ids
    assert ids == [508, 350, 198, 337, 322, 304, 72, 298, 77, 256, 450, 366, 418, 76, 317, 256,
                   261, 81, 64, 363, 25, 220, 287, 269, 220, 24, 295, 220, 24, 30, 295, 220, 24,
                   295, 13, 220, 50, 365, 298, 260, 83, 446, 220, 88, 316, 81, 220, 277, 77, 13,
                   509, 198, 508, 338, 198]
    assert tokenizer.decode(ids) == ("<|im_start|>user\nYou are given a problem and a trace: "
                                     "What is 9 + 9? + 9 +. Solve it on your own.<|im_end|>\n"
                                     "<|im_start|>assistant\n")


@pytest.mark.parametrize("policy,truncated,valid,dropped_no_budget", [
    # Responses of 5, 10, 16, 66 and 67 ids against teacher.max_total_sequence_length=66:
    # budgets 61 (fits exactly), 56 (cut), 50 (below the 53 ids of the prompt with an empty
    # trace), 0 (no room) and -1 (response too long).
    ("truncate_prefix_only", [False, True, True], 3, 1),
    ("truncate_prefix_from_end", [False, True, True], 3, 1),
    ("shorten_trace", [False, True], 2, 2),   # the 16-id response cannot fit even without a trace
])
def test_overflow_policies_drop_and_count_truthfully(tokenizer, policy, truncated, valid, dropped_no_budget):
    _, b = make_builder(tokenizer, "teacher.max_total_sequence_length=66",
                        f"distillation.context_distillation.overflow_policy={policy}")
    tps = [nine(b, n) for n in (5, 10, 16, 66, 67)]
    kept = [tp for tp in tps if tp.drop_reason is None]
    assert [tp.truncated for tp in kept] == truncated
    # Prompt + response is exactly the limit whenever the prompt was cut by a fork policy.
    assert [len(tp.ids) for tp in kept] == {"truncate_prefix_only": [61, 56, 50],
                                            "truncate_prefix_from_end": [61, 56, 50],
                                            "shorten_trace": [61, 55]}[policy]
    assert tps[0].ids == NINE_PROMPT
    assert [tp.drop_reason for tp in tps[3:]] == ["no_prefix_budget", "too_long_response"]
    if policy == "truncate_prefix_only":
        assert tps[2].ids == NINE_PROMPT[-50:] and tps[2].ids[:3] == [366, 418, 76]
    elif policy == "truncate_prefix_from_end":
        assert tps[2].ids == NINE_PROMPT[:50] and tps[2].ids[-3:] == [446, 220, 88]
    else:
        assert tps[2].ids is None and tps[2].drop_reason == "no_prefix_budget"

    m = metrics(count(tps))
    n_truncated = sum(truncated)
    assert m["context_distillation_valid_samples"] == float(valid)
    assert m["context_distillation_prefix_truncation_count"] == float(n_truncated)
    assert m["context_distillation_prefix_truncation_rate"] == pytest.approx(n_truncated / valid)
    assert m["context_distillation_dropped_samples"] == float(5 - valid)
    assert m["context_distillation_dropped_no_prefix_budget"] == float(dropped_no_budget)
    assert m["context_distillation_dropped_too_long_response"] == 1.0
    assert m["context_distillation_dropped_invalid_message"] == 0.0
    assert m["context_distillation_dropped_missing_trace"] == 0.0
    # The trace is counted before the length checks, under every policy.
    assert m["context_distillation_trace_coverage"] == 1.0
    assert m["context_distillation_trace_mean_chars"] == 10.0
    assert m["context_distillation_trace_mean_tokens"] == 8.0


def test_recipes_ported_from_the_fork_use_its_overflow_policy():
    from shared.config import ContextDistillationConfig

    # The fork's default and every one of its context-self recipes: truncate_prefix_only.
    assert ContextDistillationConfig().overflow_policy == "truncate_prefix_only"
    for recipe in ("context-self-qwen3-0.6b", "context-self-qwen3-1.7b-16k", "context-self-qwen3-4b-16k",
                   "context-self-qwen3-8b-16k", "context-self-qwen3-14b-16k"):
        cfg, _ = load(recipe)
        assert cfg.distillation.context_distillation.overflow_policy == "truncate_prefix_only", recipe
    # Sluice's own smoke keeps Sluice's policy.
    cfg, _ = load("smoke-self")
    assert cfg.distillation.context_distillation.overflow_policy == "shorten_trace"

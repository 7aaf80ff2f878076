"""The tiny thinker of tinymodels/thinker.py writes `<think>` traces and solves its problems.

    python -m pytest tests/test_thinker.py -q              # all (builds ~3 min when not cached)
    python -m pytest tests/test_thinker.py -q -m "not vllm"

The thinker is built once into `tiny_models_dir()` (where `tiny:thinker` resolves) and reused
from there, like the tiny models; a fresh machine pays the ~3 CPU-minute build once. The
vLLM check runs in a child process (this file run as a script), as in tests/test_tiny.py:

    python tests/test_thinker.py vllm-greedy MODEL_DIR PROMPTS.json OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 48
# What the default build reaches (seed 0): accuracy 0.89, trace rate 1.0 on the 64 held-out
# problems; it stops at >= 0.8, so these leave margin for other library versions.
MIN_ACCURACY = 0.7
MIN_TRACE_RATE = 0.9


@pytest.fixture(scope="module")
def thinker():
    from tinymodels.thinker import build_thinker

    start = time.perf_counter()
    path = build_thinker()
    print(f"build_thinker: {time.perf_counter() - start:.1f} s")
    return path


def test_target_and_prompt_tokens():
    """The answer format is made of the tokens the pipeline and trace extractor expect."""
    from tinymodels.thinker import draw, prompt_builder, target_text
    from tinymodels.random_weights import build_tokenizer

    tok = build_tokenizer()
    assert tok.eos_token == "<|im_end|>"
    row = {"problem": "What is 7 - 9?", "answer": "-2", "trace": "7 - 9 = -2"}
    text = target_text(row, tok.eos_token)
    assert text == "<think>7 - 9 = -2</think> The answer is \\boxed{-2}.<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<think>")
    assert tok.convert_tokens_to_ids("</think>") in ids
    assert ids[-1] == tok.eos_token_id
    prompt = tok.decode(prompt_builder(tok).prompt_ids(row["problem"]))
    assert prompt.startswith("<|im_start|>user\nPlease solve the following math problem")
    assert prompt.endswith("Problem: What is 7 - 9?<|im_end|>\n<|im_start|>assistant\n")
    import random

    assert draw(random.Random(0), 9)["problem"].startswith("What is ")


def test_prefix_cached_loss_matches_full_sequences():
    """Training runs the shared prompt prefix once: same loss and gradients as whole sequences."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3ForCausalLM

    from tinymodels.thinker import _batch_loss, _encode, prompt_builder, training_stream
    from tinymodels.random_weights import TEACHER_CONFIG, qwen3_config, build_tokenizer

    tok = build_tokenizer()
    config = qwen3_config(TEACHER_CONFIG, tok)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    stream = training_stream(3)
    batch = [_encode(prompt_builder(tok), tok, next(stream)) for _ in range(4)]
    cached = _batch_loss(model, batch, tok.pad_token_id)
    cached.backward()
    g_cached = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    total, count = 0.0, 0
    for prompt, answer in batch:
        logits = model(torch.tensor([prompt + answer])).logits[0]
        total = total + F.cross_entropy(logits[len(prompt) - 1:len(prompt) - 1 + len(answer)],
                                        torch.tensor(answer), reduction="sum")
        count += len(answer)
    full = total / count
    full.backward()
    g_full = model.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.allclose(cached, full, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_cached, g_full, rtol=1e-4, atol=1e-6)


def test_build_is_cached_locked_and_deterministic(tmp_path):
    """A quick 3-step build: layout, marker, reuse, rebuild without marker, same weights."""
    from tinymodels.thinker import MARKER, build_info, build_thinker

    quick = dict(max_steps=3, eval_every=1000, log=lambda *_: None)
    path = Path(build_thinker(tmp_path / "a", **quick))
    assert path == (tmp_path / "a" / "thinker").absolute()
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json"):
        assert (path / f).is_file(), f
    marker = json.loads((tmp_path / "a" / MARKER).read_text())
    assert marker["key"]["train"] == {"eval_every": 1000, "max_steps": 3}
    assert build_info(tmp_path / "a")["steps"] == 3
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_thinker(tmp_path / "a", **quick) == str(path)
    assert weights.stat().st_mtime_ns == mtime, "a complete build was rebuilt instead of reused"

    # Same seed and settings elsewhere: the same weights (single-threaded, seeded).
    again = Path(build_thinker(tmp_path / "b", **quick))
    assert (again / "model.safetensors").read_bytes() == weights.read_bytes()

    # No marker (an interrupted build): rebuilt, not trusted.
    (tmp_path / "a" / MARKER).unlink()
    weights.unlink()
    build_thinker(tmp_path / "a", **quick)
    assert weights.is_file() and (tmp_path / "a" / MARKER).is_file()


def test_thinker_checkpoint(thinker):
    from transformers import AutoConfig

    from shared.models import find_model, tiny_models_dir
    from tinymodels.random_weights import TEACHER_CONFIG

    assert Path(thinker) == tiny_models_dir() / "thinker"
    assert find_model("tiny:thinker") == Path(thinker)
    cfg = AutoConfig.from_pretrained(thinker)
    assert cfg.model_type == "qwen3" and cfg.tie_word_embeddings is False
    for key, value in TEACHER_CONFIG.items():
        assert getattr(cfg, key) == value, key


def test_thinker_solves_heldout_with_traces(thinker):
    from tinymodels.thinker import build_info, evaluate, heldout_problems

    print("build:", {k: v for k, v in (build_info(Path(thinker).parent) or {}).items()
                     if k != "history"})
    start = time.perf_counter()
    result = evaluate(thinker, heldout_problems(), max_new_tokens=MAX_NEW_TOKENS,
                      return_texts=True)
    print(f"evaluate: {time.perf_counter() - start:.1f} s", {k: v for k, v in result.items()
                                                             if k != "texts"})
    assert result["n"] == 64
    assert result["trace_rate"] >= MIN_TRACE_RATE, result["texts"][:8]
    assert result["accuracy"] >= MIN_ACCURACY, result["texts"][:8]


@pytest.mark.vllm
def test_vllm_greedy_writes_think_spans(thinker, tmp_path):
    """The checkpoint serves on CPU vLLM (float32, eager, in-process engine) and its greedy
    completions carry a `<think>` span and the right answers, as with transformers."""
    from transformers import AutoTokenizer

    from tinymodels.thinker import evaluate, has_trace, heldout_problems, parse_boxed, prompt_builder

    problems = heldout_problems()[:32]
    tok = AutoTokenizer.from_pretrained(thinker)
    builder = prompt_builder(tok)
    (tmp_path / "prompts.json").write_text(json.dumps(
        [builder.prompt_ids(r["problem"]) for r in problems]))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "vllm-greedy", thinker, str(tmp_path / "prompts.json"),
         str(tmp_path / "out.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / "out.json").read_text())
    texts = got["texts"]
    print(f"vLLM import {got['import_s']:.1f} s, engine start {got['load_s']:.1f} s, "
          f"generate {got['generate_s']:.2f} s")
    trace_rate = sum(map(has_trace, texts)) / len(texts)
    accuracy = sum(parse_boxed(t) == int(r["answer"]) for t, r in zip(texts, problems)) / len(texts)
    hf = evaluate(thinker, problems, max_new_tokens=MAX_NEW_TOKENS, return_texts=True)
    same = sum(a == b for a, b in zip(texts, hf["texts"])) / len(texts)
    print(f"vLLM trace rate {trace_rate:.2f} accuracy {accuracy:.2f}; "
          f"identical to transformers greedy: {same:.2f}")
    assert trace_rate >= MIN_TRACE_RATE, texts[:8]
    assert accuracy >= MIN_ACCURACY - 0.1, texts[:8]
    assert same >= 0.9, list(zip(texts, hf["texts"]))[:8]


def _vllm_greedy(model_dir: str, prompts_json: str, out_json: str) -> None:
    """Child process: greedy completions with an in-process vLLM engine on CPU."""
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(model=model_dir, dtype="float32", max_model_len=512, enforce_eager=True,
              distributed_executor_backend="uni", seed=0)
    loaded = time.perf_counter()
    prompts = [{"prompt_token_ids": p} for p in json.loads(Path(prompts_json).read_text())]
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    done = time.perf_counter()
    Path(out_json).write_text(json.dumps({
        # vLLM skips special tokens when detokenizing by default; `<think>` is not special.
        "texts": [o.outputs[0].text for o in outs],
        "import_s": imported - start, "load_s": loaded - imported, "generate_s": done - loaded,
    }))


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "vllm-greedy":
        sys.exit(f"usage: python {sys.argv[0]} vllm-greedy MODEL_DIR PROMPTS.json OUT.json")
    _vllm_greedy(*sys.argv[2:])

"""The tiny models of tinymodels/random_weights.py load and behave like real Qwen3 checkpoints.

    python -m pytest tests/test_tiny.py -q              # all (the vLLM one takes ~15 s)
    python -m pytest tests/test_tiny.py -q -m "not vllm"

The vLLM check runs in a child process (this file run as a script): creating an engine pins
the process's threads, lowers torch's thread count and initialises a torch.distributed group,
none of which should leak into the rest of a pytest session.

    python tests/test_tiny.py vllm-greedy MODEL_DIR RELOAD_DIR PROMPTS.json OUT.json
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
MAX_NEW_TOKENS = 32
QUESTIONS = ["What is 12 + 7?", "Bob has 3 apples and buys 4 more.", "Hi", "Solve 100 * 3."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tinymodels.random_weights import build_tiny_models

    start = time.perf_counter()
    paths = build_tiny_models(tmp_path_factory.mktemp("tiny"))
    print(f"build_tiny_models: {time.perf_counter() - start:.2f} s")
    return paths


def test_layout_and_configs(tiny):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    for name, (hidden, layers, heads, kv) in {"student": (128, 2, 2, 1),
                                              "teacher": (256, 4, 4, 2)}.items():
        d = Path(tiny[name])
        for f in ("config.json", "generation_config.json", "model.safetensors",
                  "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{name}/{f} missing"
        cfg = AutoConfig.from_pretrained(d)
        assert cfg.model_type == "qwen3"
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                cfg.num_key_value_heads, cfg.head_dim) == (hidden, layers, heads, kv, 64)
        assert cfg.vocab_size == len(tok) == 512
        assert cfg.tie_word_embeddings is False
        assert cfg.eos_token_id == tok.eos_token_id
        # The same tokenizer in every directory.
        assert (d / "tokenizer.json").read_bytes() == \
            (Path(tiny["tokenizer"]) / "tokenizer.json").read_bytes()


def test_tied_student_stores_no_lm_head(tiny):
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny["student-tied"])
    assert cfg.tie_word_embeddings is True and cfg.vocab_size == 512
    with safe_open(str(Path(tiny["student-tied"]) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys


def test_real_shape_models_have_qwen3_shapes():
    """Qwen3-0.6B's vocabulary, heads and head size, tied embeddings, bf16 on disk."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from shared.models import tiny_models_dir
    from tinymodels.random_weights import build_real_shape_models

    paths = build_real_shape_models(tiny_models_dir())
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert len(tok) == 151_936
    for name, layers in (("realshape-student", 2), ("realshape-teacher", 3)):
        cfg = AutoConfig.from_pretrained(paths[name])
        assert (cfg.vocab_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.num_hidden_layers, cfg.tie_word_embeddings) == (151_936, 128, 16, 8, layers, True)
        assert str(cfg.dtype if hasattr(cfg, "dtype") else cfg.torch_dtype).endswith("bfloat16")
        with safe_open(str(Path(paths[name]) / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in set(f.keys())
            emb = f.get_slice("model.embed_tokens.weight")
            assert emb.get_shape() == [151_936, cfg.hidden_size] and emb.get_dtype() == "BF16"
        assert AutoTokenizer.from_pretrained(paths[name]).eos_token_id == tok.eos_token_id


def test_build_is_cached_and_deterministic(tiny, tmp_path):
    from tinymodels.random_weights import MARKER, build_tiny_models

    out = Path(tiny["student"]).parent
    weights = Path(tiny["student"]) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_tiny_models(out) == tiny
    assert weights.stat().st_mtime_ns == mtime, "a complete build was rebuilt instead of reused"

    again = build_tiny_models(tmp_path / "again")
    for name, f in [("student", "model.safetensors"), ("teacher", "model.safetensors"),
                    ("tokenizer", "tokenizer.json")]:
        assert (Path(again[name]) / f).read_bytes() == (Path(tiny[name]) / f).read_bytes(), \
            f"{name}/{f} differs between two builds with seed 0"

    # Another seed: other weights, same vocabulary; the marker says which seed is there.
    other = build_tiny_models(tmp_path / "again", seed=1)
    assert json.loads((tmp_path / "again" / MARKER).read_text())["seed"] == 1
    assert (Path(other["student"]) / "model.safetensors").read_bytes() != weights.read_bytes()
    assert (Path(other["tokenizer"]) / "tokenizer.json").read_bytes() == \
        (Path(tiny["tokenizer"]) / "tokenizer.json").read_bytes()

    # No marker (an interrupted build): rebuilt, not trusted.
    (tmp_path / "again" / MARKER).unlink()
    (Path(other["student"]) / "model.safetensors").unlink()
    build_tiny_models(tmp_path / "again", seed=1)
    assert (Path(other["student"]) / "model.safetensors").is_file()


def test_tokenizer_and_chat_template(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["student"])
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{special} is not one token: {ids}"
    text = "<think>\n7 + 12 = 19\n</think>\n\nThe answer is \\boxed{19}."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<think>")
    assert tok.decode(ids) == text
    # `<think>` survives skip_special_tokens (as in Qwen3); the chat markers do not.
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.decode(tok("Héllo wörld 😀 你好")["input_ids"]) == "Héllo wörld 😀 你好"

    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 12 + 7?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False).endswith(
        "What is 12 + 7?<|im_end|>\n")
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Earlier assistant turns lose their think span, the last one keeps it (Qwen3).
    chat = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "<think>\nx\n</think>\n\nA"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "<think>\ny\n</think>\n\nB"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ny\n</think>\n\nB<|im_end|>\n")


def _prompts(tokenizer_dir: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tok.apply_chat_template([{"role": "user", "content": q}],
                                    add_generation_prompt=True, return_dict=False)
            for q in QUESTIONS]


def _hf_greedy(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.dtype == torch.float32
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False)
            out.append(seq[0, len(p):].tolist())
    return out


def test_transformers_generates_varied_text(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    prompts = _prompts(tiny["tokenizer"])
    for name in ("student", "teacher"):
        for completion in _hf_greedy(tiny[name], prompts[:2]):
            # init std 0.2: a random model that does not just repeat one token.
            assert len(set(completion)) > len(completion) // 3, (name, completion)
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        s, t = student(x).logits, teacher(x).logits
    assert s.shape == t.shape == (1, len(prompts[0]), 512)
    assert not torch.allclose(s, t)


@pytest.mark.vllm
def test_vllm_greedy_matches_transformers(tiny, tmp_path):
    """Float32 on both sides: greedy ids are equal token for token. (vLLM's dtype="auto"
    would run this float32 checkpoint in bfloat16 on CPU, and then greedy paths diverge after
    a few tokens; the stages choose their dtype explicitly.)

    Then the engine reloads other weights in place (`reload_weights`, as the generation stage
    does each step) and must match transformers on those: the untied embeddings are what make
    this work on CPU without re-packing lm_head (notes/platform.md)."""
    from tinymodels.random_weights import build_tiny_models

    other = build_tiny_models(tmp_path / "seed1", seed=1)
    prompts = _prompts(tiny["tokenizer"])
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, __file__, "vllm-greedy", tiny["student"], other["student"],
         str(tmp_path / "prompts.json"), str(tmp_path / "out.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / "out.json").read_text())
    print(f"vLLM import {got['import_s']:.1f} s, engine start {got['load_s']:.1f} s, "
          f"generate {got['generate_s']:.2f} s, reload {got['reload_s']:.2f} s")
    assert got["tokens"] == _hf_greedy(tiny["student"], prompts)
    assert got["reloaded_tokens"] == _hf_greedy(other["student"], prompts)
    assert got["reloaded_tokens"] != got["tokens"]


def _vllm_greedy(model_dir: str, reload_dir: str, prompts_json: str, out_json: str) -> None:
    """Child process: greedy completions of the prompts with an in-process vLLM engine, then
    again after reloading the weights of `reload_dir` in place."""
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
    llm.collective_rpc("reload_weights", kwargs={"weights_path": reload_dir})
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
    reloaded = time.perf_counter()
    outs2 = llm.generate(prompts, greedy, use_tqdm=False)
    Path(out_json).write_text(json.dumps({
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "reloaded_tokens": [list(o.outputs[0].token_ids) for o in outs2],
        "import_s": imported - start, "load_s": loaded - imported, "generate_s": done - loaded,
        "reload_s": reloaded - done,
    }))


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "vllm-greedy":
        sys.exit(f"usage: python {sys.argv[0]} vllm-greedy MODEL_DIR RELOAD_DIR PROMPTS.json "
                 "OUT.json")
    _vllm_greedy(*sys.argv[2:])

"""Random-weight Qwen3 models and tokenizers, built in-process (no download).

    python -m tinymodels.random_weights /tmp/sluice-tiny                  # build (or reuse) and print the paths
    python -m tinymodels.random_weights /tmp/sluice-tiny --seed 1         # another set of random weights
    python -m tinymodels.random_weights /tmp/sluice-tiny --set realshape  # the real-shape models

From Python (tests, smoke):

    from tinymodels.random_weights import build_tiny_models, build_real_shape_models
    paths = build_tiny_models("/tmp/sluice-tiny")
    # {"student": ".../student", "student-tied": ..., "teacher": ..., "tokenizer": ...}

Layout written under OUT_DIR (each model dir is a complete HF checkpoint: config.json,
generation_config.json, model.safetensors and the tokenizer files, so vLLM, transformers and
the stages load it exactly like a real model; recipes name them tiny:<dir>):

    student/             Qwen3, hidden 128, 2 layers, 2 heads, 1 KV head, head_dim 64, untied
    student-tied/        the same with tied embeddings (the smoke's student)
    teacher/             Qwen3, hidden 256, 4 layers, 4 heads, 2 KV heads, head_dim 64
    tokenizer/           the shared tokenizer alone (512 ids)
    TINY_MODELS.json     marker, written last and atomically: what was built, by which code
                         version and seed; its presence means the build is complete
    realshape-student/   real shapes: vocabulary 151,936, head_dim 128, 16 query and 8 KV
                         heads (as Qwen3-0.6B), tied, bfloat16; hidden 256, 2 layers
    realshape-teacher/   the same with 3 layers
    realshape-tokenizer/, REALSHAPE_MODELS.json   (built only when a recipe names them)

The tokenizer is a byte-level BPE (512 ids in all) trained on a fixed synthetic corpus of
arithmetic problems, answers and English words, with Qwen3's special tokens (`<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`) and `<think>`/`</think>` as single tokens, and a Qwen3-style
chat template (honours `enable_thinking=False` the way Qwen3 does). The vocabulary is the
same for every seed; the seed only changes the weights. The real-shape tokenizer is the same
BPE padded with filler tokens to Qwen3's 151,936 ids.

Why these numbers: vLLM's CPU attention refuses head_dim 16 (64 works); weights are drawn
with std 0.2 because the usual 0.02 makes a random model repeat one token forever; the
untied student and the float32 weights keep CPU numerics of vLLM and transformers close, so
greedy decoding matches between them; the tied student exercises vLLM's in-place reload of
tied embeddings, which on CPU needs lm_head repacked (see notes/platform.md).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# Bump when anything below changes what gets written: a cached OUT_DIR built by another
# version is rebuilt, never silently reused.
TINY_VERSION = 1

MARKER = "TINY_MODELS.json"
VOCAB_SIZE = 512  # BPE ids + the 5 added tokens; a multiple of 64 like real vocabularies
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # skipped when decoding
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MAX_POSITIONS = 8192

# Qwen2/Qwen3's pre-tokenizer split: single digits, words with their leading space, etc.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's template reduced to what Sluice uses (no tools): turns as
# `<|im_start|>role\ncontent<|im_end|>\n`; assistant turns before the last user message lose
# their `<think>` span, as in Qwen3; `enable_thinking=false` pre-fills an empty think span.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'assistant' and loop.index0 < ns.last_user"
    " and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

STUDENT_CONFIG = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64,
)
TEACHER_CONFIG = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64,
)
# The student with tied embeddings (as Qwen3 0.6B/1.7B/4B): the smoke's student.
STUDENT_TIED_CONFIG = dict(STUDENT_CONFIG, tie_word_embeddings=True)
# Real shapes on a CPU budget: Qwen3's vocabulary (151,936) and head_dim (128), grouped-query
# attention as Qwen3-0.6B (16 query heads, 8 KV heads), tied embeddings, bfloat16 on disk as
# the released checkpoints; few layers and a small hidden size.
REAL_VOCAB_SIZE = 151_936
REAL_STUDENT_CONFIG = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, dtype="bfloat16",
)
REAL_TEACHER_CONFIG = dict(REAL_STUDENT_CONFIG, num_hidden_layers=3)
INIT_STD = 0.2

_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from have not "
    "answer question problem solve step first then next finally so therefore thus because "
    "number numbers sum total difference product quotient remainder equals equal plus minus "
    "times divided multiply add subtract result value compute calculate check think let me "
    "we need find what how many much each left more less than twice half apples books coins "
    "students boxes cars pages minutes hours days friends has had gives buys sells eats reads "
    "Alice Bob Carol Dan Eve Sam Tom Mia Ann there were after before now only all some every "
    "correct wrong final hence yes no true false good great simple carefully reason answer"
).split()
_NAMES = ["Alice", "Bob", "Carol", "Dan", "Eve", "Sam", "Tom", "Mia", "Ann"]
_ITEMS = ["apples", "books", "coins", "boxes", "cars", "pages", "marbles", "pens"]


def _corpus() -> list[str]:
    """Fixed synthetic training text: arithmetic Q&A in chat form, word problems, word salad."""
    rng = random.Random(1234)  # fixed: the vocabulary must not depend on the model seed
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    lines = []
    for _ in range(1500):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        sym, fn = rng.choice(ops)
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        lines.append(f"What is {a} {sym} {b}? Put the final answer in \\boxed{{}}.")
        lines.append(f"Let me think step by step. {a} {sym} {b} = {fn(a, b)}. "
                     f"The answer is \\boxed{{{fn(a, b)}}}.")
        lines.append(f"{name} has {a} {item} and gets {b} more. How many {item} does "
                     f"{name} have now? {name} has {a + b} {item}.")
        # A chat turn with the added tokens left out (they are never split anyway).
        lines.append(f"system\nYou are a helpful assistant.\nuser\nWhat is {b} + {a}?\n"
                     f"assistant\n\nAdd them.\n\n\n{a + b}")
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 15))) + ".")
    return lines


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE and wrap it as a `transformers` fast tokenizer (~1 s).

    With `vocab_size` above VOCAB_SIZE (the real-shape models: Qwen3's 151,936) the BPE
    vocabulary is padded with never-merged filler tokens `<|reserved_i|>` before the added
    tokens, which take the last ids as in Qwen."""
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(ADDED_TOKENS),
        min_frequency=2,
        show_progress=False,
        # All 256 bytes, so any text (other languages, emoji) still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE - len(ADDED_TOKENS):
        raise RuntimeError(
            f"tiny tokenizer: BPE training gave {tok.get_vocab_size()} ids, expected "
            f"{VOCAB_SIZE - len(ADDED_TOKENS)}; the corpus in tinymodels/random_weights.py is too small for "
            f"VOCAB_SIZE={VOCAB_SIZE}: enlarge _corpus() or lower VOCAB_SIZE"
        )
    if vocab_size > VOCAB_SIZE:
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(len(vocab), vocab_size - len(ADDED_TOKENS)):
            vocab[f"<|reserved_{i}|>"] = i
        tok = Tokenizer.from_str(json.dumps(spec))
    # Added after training so they take the last ids, as in Qwen. `<think>` is not special
    # (as in Qwen3): decoding with skip_special_tokens keeps it, so traces stay visible.
    tok.add_tokens([
        AddedToken(t, special=t in SPECIAL_TOKENS, normalized=False, single_word=False,
                   lstrip=False, rstrip=False)
        for t in ADDED_TOKENS
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def qwen3_config(sizes: dict, tokenizer):
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        initializer_range=INIT_STD,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        use_cache=True,
        **{"tie_word_embeddings": False, "dtype": "float32", **sizes},
    )


def _save_model(sizes: dict, tokenizer, seed: int, out: Path) -> None:
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    config = qwen3_config(sizes, tokenizer)
    torch.manual_seed(seed)
    dtype = getattr(torch, sizes.get("dtype", "float32"))
    model = Qwen3ForCausalLM(config).to(dtype).eval()
    with quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    # Only stop/pad ids: vLLM applies a checkpoint's generation_config as default sampling
    # parameters, and tests want the engine's defaults, not ours.
    GenerationConfig(
        eos_token_id=[config.eos_token_id, config.pad_token_id],
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def quiet_progress_bars():
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# The model sets built in-process: name -> (tokenizer vocabulary, {model dir: (config, seed
# offset)}). A set is built whole, under its own marker.
MODEL_SETS = {
    "tiny": (VOCAB_SIZE, {"student": (STUDENT_CONFIG, 0), "student-tied": (STUDENT_TIED_CONFIG, 0),
                          "teacher": (TEACHER_CONFIG, 1_000_003)}),
    "realshape": (REAL_VOCAB_SIZE, {"realshape-student": (REAL_STUDENT_CONFIG, 0),
                                    "realshape-teacher": (REAL_TEACHER_CONFIG, 1_000_003)}),
}


def _tokenizer_dir(model_set: str) -> str:
    return "tokenizer" if model_set == "tiny" else f"{model_set}-tokenizer"


def _marker(model_set: str) -> str:
    return MARKER if model_set == "tiny" else f"{model_set.upper()}_MODELS.json"


def _is_complete(out_dir: Path, model_set: str, want: dict) -> bool:
    try:
        have = json.loads((out_dir / _marker(model_set)).read_text())
    except (OSError, ValueError):
        return False
    return have == want and all((out_dir / name / "config.json").is_file()
                                for name in MODEL_SETS[model_set][1])


def _fingerprint(model_set: str, seed: int) -> dict:
    # Library versions are part of the key: a new torch may draw different random weights,
    # a new tokenizers may merge differently.
    # lazy: loaded only to build a model (launch.run imports this module for every recipe)
    import tokenizers
    import torch
    import transformers

    vocab, models = MODEL_SETS[model_set]
    return {
        "tiny_version": TINY_VERSION,
        "seed": seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "models": {name: config for name, (config, _) in models.items()},
        "vocab_size": vocab,
        "init_std": INIT_STD,
    }


@contextlib.contextmanager
def locked(out_dir: Path, name: str = ".lock"):
    """Serialise builders of one OUT_DIR (e.g. parallel test processes)."""
    with open(out_dir / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_model_set(out_dir: str | os.PathLike, model_set: str = "tiny", seed: int = 0) -> dict[str, str]:
    """Build (or reuse) one set of MODEL_SETS under `out_dir`; returns {name: path} for its
    models and "tokenizer". Deterministic for a given seed and library versions; reuses
    `out_dir` when the set's marker says it was built by this code version with this seed."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, models = MODEL_SETS[model_set]
    tok_dir = _tokenizer_dir(model_set)
    paths = {name: str(out_dir / name) for name in models}
    paths["tokenizer"] = str(out_dir / tok_dir)
    want = _fingerprint(model_set, seed)
    if _is_complete(out_dir, model_set, want):
        return paths
    with locked(out_dir):
        if _is_complete(out_dir, model_set, want):  # another process built it while we waited
            return paths
        (out_dir / _marker(model_set)).unlink(missing_ok=True)
        for stale in out_dir.glob(f".build-{model_set}-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{model_set}-", dir=out_dir))
        try:
            tokenizer = build_tokenizer(vocab)
            tokenizer.save_pretrained(tmp / tok_dir)
            # Each model its own stream, so the teacher is not a prefix-copy of the student.
            for name, (config, offset) in models.items():
                _save_model(config, tokenizer, seed + offset, tmp / name)
            for name in [*models, tok_dir]:
                shutil.rmtree(out_dir / name, ignore_errors=True)
                os.replace(tmp / name, out_dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        marker_tmp = out_dir / f".{_marker(model_set)}.tmp"
        with open(marker_tmp, "w") as f:
            json.dump(want, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, out_dir / _marker(model_set))
    return paths


def build_tiny_models(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """The tiny student (untied and tied), teacher and tokenizer under `out_dir`:
    {"student", "student-tied", "teacher", "tokenizer": path}."""
    return build_model_set(out_dir, "tiny", seed)


def build_real_shape_models(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """The real-shape student and teacher (Qwen3 vocabulary and heads, tied, bfloat16):
    {"realshape-student", "realshape-teacher", "tokenizer": path}."""
    return build_model_set(out_dir, "realshape", seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to build into (reused if already built)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--set", default="tiny", choices=sorted(MODEL_SETS), help="which models")
    args = parser.parse_args(argv)
    print(json.dumps(build_model_set(args.out_dir, args.set, seed=args.seed), indent=1))


if __name__ == "__main__":
    main()

"""shared.chat: the coordinator's tokenizer, without transformers (which imports torch).

Its ids equal transformers' apply_chat_template for the built-in tokenizers (the tiny one and
the real-shape one with Qwen3's 151,936-token vocabulary), with system prompts, the chat
template's kwargs and a template using `{% generation %}`; and the coordinator's data and
validation preparation import neither torch nor vLLM.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.chat import ChatTokenizer
from shared.models import tiny_models_dir
from tinymodels.random_weights import build_real_shape_models, build_tiny_models

REPO = Path(__file__).resolve().parents[1]


def _conversations():
    for i in range(12):
        rng = random.Random(i)
        system = [{"role": "system", "content": "Réponds brièvement ✓\n"}] if i % 3 == 0 else []
        user = {"role": "user", "content": f"What is {rng.randint(0, 999)} + {rng.randint(0, 999)}?"
                                           " <think>x</think> \\boxed{}  \n\ttab"}
        history = [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "<think>\nhm\n</think>\n\nhello"}] if i % 4 == 1 else []
        yield system + history + [user]


def _hf_ids(tok, messages, **kwargs):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def tokenizer_dirs():
    return {"tiny": Path(build_tiny_models(tiny_models_dir())["tokenizer"]),
            "realshape": Path(build_real_shape_models(tiny_models_dir())["tokenizer"])}


@pytest.mark.parametrize("which", ["tiny", "realshape"])
def test_ids_equal_transformers(tokenizer_dirs, which):
    from transformers import AutoTokenizer

    path = tokenizer_dirs[which]
    hf, ours = AutoTokenizer.from_pretrained(str(path)), ChatTokenizer.from_dir(path)
    for messages in _conversations():
        for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
            assert ours.apply_chat_template(messages, **kwargs) == _hf_ids(hf, messages, **kwargs), \
                (messages, kwargs)
    ids = ours.apply_chat_template(messages)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert ours.apply_chat_template(messages, tokenize=False) == \
        hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_template_with_generation_blocks(tokenizer_dirs, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "tok"
    shutil.copytree(tokenizer_dirs["tiny"], path)
    template = (path / "chat_template.jinja").read_text()
    marked = template.replace("{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}",
                              "{%- generation -%}{{- '<|im_start|>' + message['role'] + '\\n' + content"
                              " + '<|im_end|>\\n' -}}{%- endgeneration -%}")
    assert marked != template
    (path / "chat_template.jinja").write_text(marked)
    hf, ours = AutoTokenizer.from_pretrained(str(path)), ChatTokenizer.from_dir(path)
    for messages in _conversations():
        assert ours.apply_chat_template(messages) == _hf_ids(hf, messages)


def test_missing_tokenizer_json_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        ChatTokenizer.from_dir(tmp_path)


PREPARE = """
import sys
from launch.coordinator import Coordinator
c = Coordinator(sys.argv[1])
c.data.prepare()
c.validation.prepare()
print("rows", c.data.table().num_rows, "validation", c.validation.num_rows())
print("imported", sorted(m for m in ("torch", "vllm", "transformers") if m in sys.modules))
"""


def test_coordinator_prepares_data_without_torch_or_vllm(tokenizer_dirs, tmp_path):
    from launch.start import create_run_dir
    from shared.recipe import load
    from shared.config_check import validate

    cfg, node = load("smoke", [])
    run_dir = tmp_path / "run"
    create_run_dir(run_dir, "smoke", node, validate(cfg), "local")
    out = subprocess.run([sys.executable, "-c", PREPARE, str(run_dir)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported []" in out.stdout, out.stdout
    rows = int(out.stdout.split("rows ")[1].split()[0])
    assert rows > 0 and "validation 8" in out.stdout, out.stdout
    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    assert summary["train_rows"] == rows

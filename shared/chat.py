"""A model directory's tokenizer and chat template, without transformers (which imports torch).

    tok = ChatTokenizer.from_dir(path)           # tokenizer.json + tokenizer_config.json
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    text = tok.decode(ids)

The coordinator tokenizes the prompts (CPU only: it never imports torch or vLLM). The chat
template is rendered as transformers renders it (a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, its `tojson`, `raise_exception` and `strftime_now`, the
special tokens as variables) and the text encoded without adding special tokens; tests pin
the ids against transformers' apply_chat_template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

# The special tokens transformers passes to a chat template, by their config names.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):  # {"content": ..., "lstrip": ...} in older configs
        return value.get("content")
    return value


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training
        masks in some templates): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclass
class ChatTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    chat_template: Optional[str]
    special: Dict[str, str]

    @classmethod
    def from_dir(cls, path) -> "ChatTokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (Sluice reads fast tokenizers; save "
                                    "the tokenizer with transformers' save_pretrained first)")
        config = json.loads((path / "tokenizer_config.json").read_text()) \
            if (path / "tokenizer_config.json").is_file() else {}
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        elif isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS if config.get(k) is not None}
        return cls(Tokenizer.from_file(str(path / "tokenizer.json")), template, special)

    def render(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True,
               **kwargs) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json "
                             "chat_template or chat_template.jinja)")
        return _compile(self.chat_template).render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **{**self.special, **kwargs})

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs):
        text = self.render(messages, add_generation_prompt, **kwargs)
        return self.encode(text) if tokenize else text

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

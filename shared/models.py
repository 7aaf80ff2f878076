"""Find models and tokenizers on local disk; never download.

    find_model("Qwen/Qwen3-4B")      # HF cache snapshot dir, or None
    find_model("/path/to/model")      # the path, if it holds a config.json
    find_model("tiny:student")        # where the built-in tiny model lives (tinymodels.build
                                      # builds it on first use)

Real recipes name Hugging Face ids; compute nodes have no internet, so ids are resolved only
from the local cache (`HF_HOME` / `HF_HUB_CACHE`), as with `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from shared.recipe import REPO_ROOT

TINY_PREFIX = "tiny:"


def tiny_models_dir() -> Path:
    """Where the built-in tiny models live (built once, reused)."""
    return Path(os.environ.get("SLUICE_TINY_DIR", REPO_ROOT / ".cache" / "tiny-models"))


def find_model(name: str) -> Optional[Path]:
    if name.startswith(TINY_PREFIX):
        return tiny_models_dir() / name[len(TINY_PREFIX):]
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve() if (path / "config.json").is_file() else None
    if name.count("/") != 1 or name.startswith(("/", ".")):
        return None
    # lazy: 0.3 s to import; only a Hugging Face id needs it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def tokenizer_fingerprint(name: str) -> Optional[str]:
    """A hash of the vocabulary and special tokens, or None if the tokenizer is not on disk."""
    path = find_model(name)
    if path is None or not (path / "tokenizer.json").is_file():
        return None
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = tok.get("model", {}).get("vocab", {})
    added = sorted((t["id"], t["content"]) for t in tok.get("added_tokens", []))
    blob = json.dumps([sorted(vocab.items()) if isinstance(vocab, dict) else vocab, added])
    return hashlib.sha256(blob.encode()).hexdigest()

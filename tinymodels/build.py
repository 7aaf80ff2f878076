"""A model name to its local directory, building the built-in `tiny:*` models on first use.

    from tinymodels.build import ensure_model
    ensure_model("tiny:student", "policy.model_name")   # built once under the tiny models dir
    ensure_model("Qwen/Qwen3-4B", "teacher.model_name")  # the HF cache snapshot, or the fix

The one place that builds on demand: the stages resolve their models here, and launch.start
builds the tiny models of a recipe on the launching machine before any job starts.
"""

from __future__ import annotations

from pathlib import Path

from shared.models import TINY_PREFIX, find_model, tiny_models_dir
from tinymodels.random_weights import build_real_shape_models, build_tiny_models
from tinymodels.thinker import build_thinker


def ensure_model(name: str, key: str = "model_name") -> Path:
    """The local directory of `name`, building the built-in tiny models on first use.

    Raises FileNotFoundError naming `key` and the fix when the model is not on local disk.
    """
    if name.startswith(TINY_PREFIX):
        if name == TINY_PREFIX + "thinker":
            build_thinker(tiny_models_dir())
        elif name.startswith(TINY_PREFIX + "realshape"):
            build_real_shape_models(tiny_models_dir())
        else:
            build_tiny_models(tiny_models_dir())
    path = find_model(name)
    if path is None or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{key}={name!r} is not on local disk (compute nodes never download); fetch it on a "
            f"node with internet (huggingface-cli download {name}) into the HF cache the jobs see "
            "(HF_HOME), or give a local directory holding config.json")
    return path

"""Shared test set-up: offline everything, the local Slurm cluster fixture, tiny models."""

import os

# Nothing in the tests may download: models and data are built in-process or shipped small.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest_plugins = ["tests.slurm_fixture"]

import pytest


@pytest.fixture(scope="session")
def tiny_models():
    """The built-in tiny student/teacher/tokenizer (built once, cached under .cache/)."""
    from shared.models import tiny_models_dir
    from tinymodels.random_weights import build_tiny_models

    return build_tiny_models(tiny_models_dir())


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/ from the current code (review the diff before committing)")

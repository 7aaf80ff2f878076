"""Pytest fixture `slurm_cluster`: a real local Slurm cluster (see tools/local_slurm.py).

Use it with `from tests.slurm_fixture import slurm_cluster  # noqa: F401` and mark the
tests `@pytest.mark.slurm`. The fixture sets SLURM_CONF in os.environ for the session, so
submitit's sbatch/sacct/scancel find the cluster. Where the cluster cannot be started
(not root, no apt-get) the tests skip with the reason, except under CI=true, where they
fail instead: CI must never pass by skipping them. Without root, a cluster that root
already started is used. The cluster stays up after the session (the next session reuses
it in under a second); stop it with `python -m tools.local_slurm down`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tools import local_slurm


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    env: dict[str, str]  # already set in os.environ for the session (SLURM_CONF)


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and the local Slurm cluster cannot start: {reason}", pytrace=False)
    pytest.skip(f"local Slurm cluster unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    state_dir = local_slurm.DEFAULT_STATE_DIR
    ok, reason = local_slurm.can_start(state_dir)
    if not ok:
        _skip_or_fail(reason)
    # Where it can start, a failure to start is a real failure, never a skip.
    env = local_slurm.ensure_up(state_dir)
    # sbatch/sacct/scancel, run by submitit in this process, find the cluster through these.
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield SlurmCluster(state_dir=Path(state_dir), env=env)

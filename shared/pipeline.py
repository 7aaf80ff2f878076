"""The pipeline's stages and roles, in one table that the rest of Sluice derives from.

    prompts  --generation-->  rollouts  --teacher-->  scored  --training-->  weights
    (coordinator)             (stages.generate)       (stages.score)         (stages.train)

A *stage* is a queue of Arrow shards under RUN_DIR/steps/<step>/<stage>/ (shared.queue); a
*role* is a kind of worker, started by module name (``python -m <module> RUN_DIR``) in its
own Slurm job or on its own nodes. Adding a role or stage means adding a row here (and its
schema in shared/schemas.py, its worker module in stages/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Role:
    name: str
    module: str             # started as python -m <module> RUN_DIR
    label: str              # its name in the plan line users grep for ("inference=1x2GPUs")
    consumes: str           # the stage it reads
    produces: Optional[str]  # the stage it commits (None: the trainer commits weights)


# In pipeline order: each role consumes what the one before produces.
PIPELINE = (
    Role("generation", "stages.generate", "inference", consumes="prompts", produces="rollouts"),
    Role("teacher", "stages.score", "teacher", consumes="rollouts", produces="scored"),
    Role("training", "stages.train", "train", consumes="scored", produces=None),
)
ROLE = {r.name: r for r in PIPELINE}
# Pipeline order (events, inspect, the coordinator's checks).
ROLE_NAMES = tuple(r.name for r in PIPELINE)
# Placement order: the trainer takes the first nodes, then generation, then the teacher.
PLACEMENT_ORDER = ("training", "generation", "teacher")
assert sorted(PLACEMENT_ORDER) == sorted(ROLE_NAMES)

# The shard stages in order; the coordinator writes the first one.
STAGES = ("prompts",) + tuple(r.produces for r in PIPELINE if r.produces)
# Who writes each stage (error messages name what to resubmit).
PRODUCER = {"prompts": "coordinator", **{r.produces: r.name for r in PIPELINE if r.produces}}
# The stages workers produce (what a dead job's claims can hold).
WORKER_STAGES = STAGES[1:]


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not a shard stage; valid stages: {', '.join(STAGES)}")
    return stage


def redone_by(role: str) -> list[str]:
    """The stages that redoing `role`'s work for a step replaces: its own output and every
    stage derived from it (generation: rollouts and scored; teacher: scored; training: none)."""
    produced = ROLE[role].produces
    return list(STAGES[STAGES.index(produced):]) if produced else []

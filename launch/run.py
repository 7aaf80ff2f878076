"""Start (or resume) a Sluice run.

    python -m launch.run conf=smoke
    python -m launch.run conf=qwen3-14b-4b distillation.max_num_steps=5 logger.wandb_enabled=False
    python -m launch.run conf=qwen3-32b-4b-isolated launch.dry_run=true
    python -m launch.run conf=my_recipe.yaml launch.run_dir=/scratch/runs/exp1
    python -m launch.run conf=qwen3-32b-4b-isolated launch.executor=allocation   # one sbatch -N3

`conf` names a recipe in conf/ (or a YAML path); every other argument is a Hydra override.
The config is validated before anything is written or submitted; a user error exits with
status 2 and one message naming the key, the value and the fix.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from launch.executors.allocation import render_allocation
from launch.executors.slurm import render_run
from launch.start import start
from shared.config_check import validate
from shared.errors import UserError, exit_with
from shared.memory import memory_plan
from shared.recipe import load, recipe_names

USAGE = "usage: python -m launch.run conf=NAME [key=value ...]"


def split_args(argv: Sequence[str]) -> Tuple[str, List[str]]:
    conf: Optional[str] = None
    overrides: List[str] = []
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if a.startswith("conf="):
            conf = a[len("conf="):]
        elif a.startswith("-"):
            raise UserError(f"unknown option {a}. {USAGE}")
        else:
            overrides.append(a)
    if not conf:
        raise UserError(f"missing conf=NAME. {USAGE}; recipes: {', '.join(recipe_names())}")
    return conf, overrides


def prepare(argv: Sequence[str]):
    """Load and validate; returns (conf name, typed config, DictConfig, plan)."""
    conf, overrides = split_args(argv)
    cfg, node = load(conf, overrides)
    plan = validate(cfg, check_models=not cfg.launch.dry_run)
    return conf, cfg, node, plan


def print_dry_run(cfg, node, plan) -> None:
    print(OmegaConf.to_yaml(node), end="")
    print("# partition plan")
    print(f"Isolated clusters created: {plan.summary()}" if plan.isolated
          else f"Shared-node clusters: {plan.summary()}")
    for r, p in plan.roles.items():
        print(f"  {r}: {p.num_nodes} node(s) x {p.gpus_per_node} GPUs, {p.num_tasks} task(s) of "
              f"{p.gpus_per_task} GPU(s), nodes {p.nodes}, gpus {p.gpu_ids}")
    print(memory_plan(cfg, plan).format(), end="")
    if cfg.launch.executor == "allocation":
        print(render_allocation(cfg, plan), end="")
        return
    print(render_run(cfg, plan), end="")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        conf, cfg, node, plan = prepare(argv)
        if cfg.launch.dry_run:
            print_dry_run(cfg, node, plan)
            return 0
        return start(conf, cfg, node, plan)
    except UserError as e:
        exit_with(e, "launch.run")


if __name__ == "__main__":
    sys.exit(main())

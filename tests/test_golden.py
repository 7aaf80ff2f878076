"""Golden files: what the Slurm executor submits for every recipe in conf/, byte for byte.

    python -m pytest tests/test_golden.py -q
    python -m pytest tests/test_golden.py --update-golden     # or: make golden; review the diff

Each tests/golden/<recipe>.txt holds the coordinator's sbatch script, then every role job's
sbatch script (nodes, tasks, GPUs, CPUs, memory, signal, time, partition...) and each task's
worker command line with its GPUs (`launch.executors.slurm.render_run`, which
`launch.dry_run=true` also prints). A change to what Sluice submits shows up here as a diff.
Paths are placeholders: /RUN_DIR for the run directory, PYTHON for the interpreter.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from launch.executors.slurm import render_run
from shared.recipe import load, recipe_names
from shared.config_check import validate

GOLDEN = Path(__file__).resolve().parent / "golden"


def rendered(recipe: str) -> str:
    cfg, _ = load(recipe, [])
    return render_run(cfg, validate(cfg))


@pytest.mark.parametrize("recipe", recipe_names())
def test_what_is_submitted_matches_golden(recipe, request):
    _compare(GOLDEN / f"{recipe}.txt", rendered(recipe), recipe, request)


def _compare(path: Path, text: str, recipe: str, request) -> None:
    if request.config.getoption("--update-golden"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run `make golden` and review it"
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                            str(path), "now"))
        pytest.fail(f"what Sluice submits for {recipe} changed:\n{diff}\nIf intended: `make golden` "
                    "and commit the reviewed diff.", pytrace=False)


@pytest.mark.parametrize("recipe", recipe_names())
def test_what_an_allocation_starts_matches_golden(recipe, request):
    """launch.executor=allocation: the batch script and every job step's srun."""
    from launch.executors.allocation import render_allocation

    cfg, _ = load(recipe, [])
    _compare(GOLDEN / "allocation" / f"{recipe}.txt", render_allocation(cfg, validate(cfg)), recipe, request)


def test_every_golden_file_has_a_recipe():
    stale = sorted(p.stem for p in [*GOLDEN.glob("*.txt"), *GOLDEN.glob("allocation/*.txt")]
                   if p.stem not in recipe_names())
    assert not stale, f"golden files without a recipe: {stale}; delete them"


def test_isolated_recipes_hold_exactly_their_nodes():
    """Read back from the golden text: the role jobs' --nodes add up to cluster.num_nodes,
    and each whole-node job asks for all of a node's memory."""
    import re

    for recipe in recipe_names():
        cfg, _ = load(recipe, [])
        text = (GOLDEN / f"{recipe}.txt").read_text()
        jobs = text.split("\n## job ")[1:]
        nodes = [int(re.search(r"#SBATCH --nodes=(\d+)", j).group(1)) for j in jobs]
        assert sum(nodes) == cfg.cluster.num_nodes, (recipe, nodes)
        for j in jobs:
            assert "#SBATCH --exclusive\n" in j and "#SBATCH --mem=0\n" in j, (recipe, j[:200])
            tasks = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", j).group(1))
            cpus = int(re.search(r"#SBATCH --cpus-per-task=(\d+)", j).group(1))
            assert f"--cpus-per-task={cpus} --kill-on-bad-exit=1" in j
            assert j.count("\n# task node 0 local ") <= tasks

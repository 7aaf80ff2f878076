"""Extra sbatch options a user may add (`cluster.sbatch_args`, `cluster.coordinator.sbatch_args`).

    cluster.sbatch_args=[--switches=1,--comment=sluice]

Each item is one long option, `--name=value` or a bare `--flag`. Options that Sluice sets
itself (nodes, tasks, GPUs, CPUs, memory, time, output files, the pre-timeout signal) are
refused: each has its own `cluster.*` key, or is derived from the partition plan. No item may
hold whitespace or a newline, since each becomes an `#SBATCH` line of a script.
"""

from __future__ import annotations

import re
from typing import Dict, List, Union

# Option -> the key that sets it (or why Sluice sets it itself).
RESERVED: Dict[str, str] = {
    "nodes": "the partition plan (cluster.num_nodes, distillation.resource_isolation.roles)",
    "ntasks": "the partition plan (one task per worker)",
    "ntasks-per-node": "the partition plan (one task per worker)",
    "cpus-per-task": "cluster.cpus_per_gpu",
    "cpus-per-gpu": "cluster.cpus_per_gpu",
    "gres": "cluster.gpus_per_node and cluster.gpu_type",
    "gpus": "cluster.gpus_per_node and cluster.gpu_type",
    "gpus-per-node": "cluster.gpus_per_node and cluster.gpu_type",
    "gpus-per-task": "cluster.gpus_per_node and cluster.gpu_type",
    "mem": "cluster.mem_per_gpu_gb (cluster.coordinator.mem_gb for the coordinator)",
    "mem-per-cpu": "cluster.mem_per_gpu_gb (cluster.coordinator.mem_gb for the coordinator)",
    "mem-per-gpu": "cluster.mem_per_gpu_gb (cluster.coordinator.mem_gb for the coordinator)",
    "exclusive": "cluster.exclusive",
    "time": "cluster.time_limit (cluster.coordinator.time_limit)",
    "partition": "cluster.partition (cluster.coordinator.partition)",
    "account": "cluster.account (cluster.coordinator.account)",
    "qos": "cluster.qos (cluster.coordinator.qos)",
    "reservation": "cluster.reservation",
    "constraint": "cluster.constraint",
    "exclude": "cluster.exclude",
    "nodelist": "cluster.nodelist",
    "job-name": "Sluice's job names (squeue tells the runs apart by them)",
    "output": "Sluice's log folders (RUN_DIR/logs)",
    "error": "Sluice's log folders (RUN_DIR/logs)",
    "open-mode": "Sluice's log folders (RUN_DIR/logs)",
    "array": "Sluice's jobs (one per node group)",
    "signal": "Sluice's pre-timeout signal",
    "export": "Sluice's job environment",
    "chdir": "Sluice's working directory",
    "wrap": "Sluice's job scripts",
}
_OPTION = re.compile(r"--([a-z][a-z0-9-]*)(?:=(.+))?")


class SbatchArgError(ValueError):
    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem, self.fix = problem, fix


def parse(key: str, items: List[str]) -> Dict[str, Union[str, bool]]:
    """`["--switches=1", "--requeue"]` -> `{"switches": "1", "requeue": True}`; raises
    SbatchArgError naming the item, the problem and the fix."""
    out: Dict[str, Union[str, bool]] = {}
    for item in items:
        text = str(item)
        m = _OPTION.fullmatch(text)
        if m is None or any(c.isspace() for c in text):
            raise SbatchArgError(f"{text!r} is not one long sbatch option",
                                 f"write --name=value or --flag, one option per item, without "
                                 f"spaces, e.g. {key}=[\"--switches=1\"]")
        name, value = m.group(1), m.group(2)
        if name in RESERVED:
            raise SbatchArgError(f"{text!r}: Sluice sets --{name} itself", f"use {RESERVED[name]} instead")
        out[name] = True if value is None else value
    return out

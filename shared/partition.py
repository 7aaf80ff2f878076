"""The partition plan: which nodes and GPUs each role gets.

Two layouts, with the runbook's keys:

- `distillation.resource_isolation.enabled=true`: every role gets whole nodes of its own. The
  roles' nodes must add up to `cluster.num_nodes` and each role must use all of a node's GPUs
  (the runbook's `must exactly partition cluster nodes` and `enforces node-level role isolation`).
- otherwise roles may share nodes: each role asks for `num_nodes` x `gpus_per_node` and the
  roles are packed first-fit onto the cluster's nodes, so a single-node run splits the node's
  GPUs between roles. Generation's request comes from
  `policy.generation.colocated.resources` when set (runbook semantics), else from
  `distillation.resource_isolation.roles.generation`.

Inside a role, generation has one worker per vLLM engine
(`policy.generation.vllm_cfg.tensor_parallel_size` GPUs), the teacher one worker per
teacher replica (`teacher.dtensor_cfg.tensor_parallel_size` GPUs), and training is one
torchrun job over all its nodes.

The plan is plain data (written to run.json) and is checked again at run time against the
hosts the workers record.

Jobs. `job_units(plan, merge_shared_nodes)` groups the workers into the jobs that are
submitted. A worker is one process tree on one node: a vLLM engine, a teacher replica, or
one node's torchrun of the trainer. A job holds whole plan nodes: the trainer's nodes form
one job; every generation or teacher node is a job of its own, with one task per engine or
replica (each bound to its own GPUs). With `merge_shared_nodes` (the Slurm executor) the jobs
of roles that share a plan node are merged into one job, so that the node is allocated once;
the local executor keeps one job per role and node (one machine has no nodes to get right,
and a failure restarts less). Either way the jobs hold exactly `cluster.num_nodes` nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

from shared.config import SluiceConfig
from shared.errors import config_error
# ROLES: the order in which roles take nodes.
from shared.pipeline import PLACEMENT_ORDER as ROLES, ROLE



@dataclass
class RolePlan:
    role: str
    num_nodes: int
    gpus_per_node: int
    num_tasks: int
    """Workers: engines (generation), replicas (teacher), or 1 (training)."""
    gpus_per_task: int
    nodes: List[int] = field(default_factory=list)
    """Logical node indices (0-based) in the cluster the role lives on."""
    gpu_ids: List[List[int]] = field(default_factory=list)
    """GPU indices used on each of `nodes`."""

    @property
    def total_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class Plan:
    isolated: bool
    num_nodes: int
    gpus_per_node: int
    roles: Dict[str, RolePlan]

    def summary(self) -> str:
        return ", ".join(
            f"{ROLE[r].label}={p.num_nodes}x{p.gpus_per_node}GPUs" for r, p in self.roles.items()
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        roles = {k: RolePlan(**v) for k, v in d["roles"].items()}
        return cls(isolated=d["isolated"], num_nodes=d["num_nodes"],
                   gpus_per_node=d["gpus_per_node"], roles=roles)

    def shared_nodes(self) -> Dict[int, List[str]]:
        """Logical node -> roles placed on it (only nodes with more than one role)."""
        by_node: Dict[int, List[str]] = {}
        for r, p in self.roles.items():
            for n in p.nodes:
                by_node.setdefault(n, []).append(r)
        return {n: rs for n, rs in by_node.items() if len(rs) > 1}


@dataclass(frozen=True)
class WorkerPlan:
    """One task of a job: a worker process tree on one node."""

    role: str
    task: int
    """The worker's index in its role (engine or teacher replica k; 0 for the trainer)."""
    node: int
    """Plan node it runs on."""
    gpus: Tuple[int, ...]
    """GPU indices it uses on that node."""
    node_rank: int = 0
    """Trainer: this node's rank among the trainer's nodes (0 for the other roles)."""
    nnodes: int = 1
    """Trainer: nodes the trainer spans (1 for the other roles)."""

    @property
    def multiprocess(self) -> bool:
        """Started through torchrun (several ranks) rather than as one process. vLLM does its
        own tensor parallelism inside one process, so an engine never is."""
        return self.role != "generation" and (len(self.gpus) > 1 or self.nnodes > 1)


@dataclass(frozen=True)
class JobPlan:
    """One submitted job: whole plan nodes and the workers placed on them."""

    key: str
    """Stable name in the run: roles joined by '+', then '-n' and its first plan node, e.g.
    training-n0, generation-n1 (coordinator/state.json, logs/<key>/, job names)."""
    roles: Tuple[str, ...]
    nodes: Tuple[int, ...]
    """Plan nodes it holds, whole."""
    workers: Tuple[WorkerPlan, ...]

    @property
    def tasks_per_node(self) -> int:
        """Slurm tasks per node: the most workers any of its nodes holds (a node with fewer
        leaves its spare task slots idle)."""
        return max(sum(1 for w in self.workers if w.node == n) for n in self.nodes)

    def gpus_on(self, node: int) -> List[int]:
        """GPU indices its workers use on `node`, ascending."""
        return sorted({g for w in self.workers if w.node == node for g in w.gpus})

    @property
    def gpus_per_node(self) -> int:
        """GPUs to request per node (the most any of its nodes uses)."""
        return max(len(self.gpus_on(n)) for n in self.nodes)

    def slots(self) -> Dict[Tuple[int, int], WorkerPlan]:
        """(node position in the job, task index on that node) -> worker: what each Slurm task
        (SLURM_NODEID, SLURM_LOCALID) runs."""
        out = {}
        for pos, n in enumerate(self.nodes):
            for local, w in enumerate(w for w in self.workers if w.node == n):
                out[(pos, local)] = w
        return out

    def gpu_positions(self, w: WorkerPlan) -> List[int]:
        """Positions of the worker's GPUs among the GPUs the job holds on its node: the indices
        into the job's CUDA_VISIBLE_DEVICES there."""
        held = self.gpus_on(w.node)
        return [held.index(g) for g in w.gpus]

    def only(self, role: str, first_worker: bool = False) -> "JobPlan":
        """The part of this job that runs `role` (just its first worker with `first_worker`):
        a one-shot redo of one role."""
        workers = tuple(w for w in self.workers if w.role == role)
        workers = workers[:1] if first_worker else workers
        nodes = tuple(n for n in self.nodes if any(w.node == n for w in workers))
        return JobPlan(key=f"{role}-n{nodes[0]}", roles=(role,), nodes=nodes, workers=workers)


def workers_of(plan: "Plan") -> List[WorkerPlan]:
    """Every worker of the plan, role by role, node-major."""
    out: List[WorkerPlan] = []
    for role in ROLES:
        rp = plan.roles[role]
        if role == "training":
            for rank, (n, ids) in enumerate(zip(rp.nodes, rp.gpu_ids)):
                out.append(WorkerPlan(role, 0, n, tuple(ids), node_rank=rank, nnodes=rp.num_nodes))
            continue
        per_node = rp.gpus_per_node // rp.gpus_per_task
        for i, (n, ids) in enumerate(zip(rp.nodes, rp.gpu_ids)):
            for j in range(per_node):
                gpus = tuple(ids[j * rp.gpus_per_task:(j + 1) * rp.gpus_per_task])
                out.append(WorkerPlan(role, i * per_node + j, n, gpus))
    return out


def job_units(plan: "Plan", merge_shared_nodes: bool) -> List[JobPlan]:
    """The jobs to submit, in a stable order (see the module docstring)."""
    groups: List[Tuple[set, List[WorkerPlan]]] = []
    for w in workers_of(plan):
        if w.role == "training":
            key_nodes = set(plan.roles["training"].nodes)
        else:
            key_nodes = {w.node}
        match = next((g for g in groups if g[1][0].role == w.role and g[0] == key_nodes), None)
        if match is None:
            groups.append((key_nodes, [w]))
        else:
            match[1].append(w)
    if merge_shared_nodes:
        merged = True
        while merged:
            merged = False
            for i in range(len(groups)):
                for j in range(i + 1, len(groups)):
                    if groups[i][0] & groups[j][0]:
                        groups[i] = (groups[i][0] | groups[j][0], groups[i][1] + groups[j][1])
                        del groups[j]
                        merged = True
                        break
                if merged:
                    break
    units = []
    for nodes, workers in groups:
        roles = tuple(r for r in ROLES if any(w.role == r for w in workers))
        order = sorted(nodes)
        workers = sorted(workers, key=lambda w: (order.index(w.node), ROLES.index(w.role), w.task))
        units.append(JobPlan(key=f"{'+'.join(roles)}-n{order[0]}", roles=roles,
                             nodes=tuple(order), workers=tuple(workers)))
    return sorted(units, key=lambda u: (u.nodes[0], u.key))


def _requests(cfg: SluiceConfig) -> Dict[str, tuple]:
    roles = cfg.distillation.resource_isolation.roles
    req = {r: (getattr(roles, r).num_nodes, getattr(roles, r).gpus_per_node) for r in ROLES}
    res = cfg.policy.generation.colocated.resources
    if not cfg.distillation.resource_isolation.enabled and (
        res.num_nodes is not None or res.gpus_per_node is not None
    ):
        req["generation"] = (
            res.num_nodes if res.num_nodes is not None else req["generation"][0],
            res.gpus_per_node if res.gpus_per_node is not None else req["generation"][1],
        )
    return req


def _check_isolation(cfg: SluiceConfig) -> None:
    iso = cfg.distillation.resource_isolation
    cl = cfg.cluster
    if cfg.policy.generation.colocated.enabled:
        raise config_error(
            "distillation.resource_isolation.enabled", value=True,
            problem="distillation.resource_isolation.enabled=true requires "
            "policy.generation.colocated.enabled=false",
            fix="set policy.generation.colocated.enabled=false",
        )
    nodes = {r: getattr(iso.roles, r).num_nodes for r in ROLES}
    if sum(nodes.values()) != cl.num_nodes:
        raise config_error(
            "distillation.resource_isolation.roles", value=None,
            problem="resource isolation must exactly partition cluster nodes: training.num_nodes "
            f"({nodes['training']}) + generation.num_nodes ({nodes['generation']}) + "
            f"teacher.num_nodes ({nodes['teacher']}) = {sum(nodes.values())}, but "
            f"cluster.num_nodes={cl.num_nodes}",
            fix="make the roles' num_nodes add up to cluster.num_nodes (and to sbatch -N)",
        )
    for r in ROLES:
        g = getattr(iso.roles, r).gpus_per_node
        if g != cl.gpus_per_node:
            raise config_error(
                f"distillation.resource_isolation.roles.{r}.gpus_per_node", value=g,
                problem="resource isolation enforces node-level role isolation: each role's "
                f"gpus_per_node must equal cluster.gpus_per_node ({cl.gpus_per_node})",
                fix=f"set distillation.resource_isolation.roles.{r}.gpus_per_node="
                f"{cl.gpus_per_node}, or disable resource_isolation to share nodes",
            )


def _place(cfg: SluiceConfig, req: Dict[str, tuple]) -> Dict[str, tuple]:
    """First-fit packing of role requests onto nodes; returns role -> (nodes, gpu_ids)."""
    cl = cfg.cluster
    free = [list(range(cl.gpus_per_node)) for _ in range(cl.num_nodes)]
    placed = {}
    # Biggest per-node requests first so whole-node roles are not fragmented by small ones.
    for r in sorted(ROLES, key=lambda r: (-req[r][1], ROLES.index(r))):
        n, g = req[r]
        chosen = [i for i, f in enumerate(free) if len(f) >= g][:n]
        if len(chosen) < n:
            want = ", ".join(f"{x}={req[x][0]}x{req[x][1]}GPUs" for x in ROLES)
            raise config_error(
                "cluster", value=f"{cl.num_nodes}x{cl.gpus_per_node}GPUs",
                problem=f"the roles do not fit the cluster: they ask for {want}",
                fix="lower the roles' num_nodes/gpus_per_node "
                "(distillation.resource_isolation.roles.*, "
                "policy.generation.colocated.resources) or raise cluster.num_nodes",
            )
        ids = []
        for i in chosen:
            ids.append(free[i][:g])
            free[i] = free[i][g:]
        placed[r] = (chosen, ids)
    return placed


def plan(cfg: SluiceConfig) -> Plan:
    """Validate the layout keys and compute the plan. Raises ConfigError."""
    _check_layout(cfg)
    req = _requests(cfg)
    _check_requests(cfg, req)
    placed = _place(cfg, req)
    roles = {r: _role_plan(cfg, r, req[r], placed[r]) for r in ROLES}
    cl = cfg.cluster
    return Plan(isolated=cfg.distillation.resource_isolation.enabled, num_nodes=cl.num_nodes,
                gpus_per_node=cl.gpus_per_node, roles=roles)


def _check_layout(cfg: SluiceConfig) -> None:
    """The cluster size and the layout switches (isolation, colocation, resident teacher)."""
    cl = cfg.cluster
    for key, v in (("cluster.num_nodes", cl.num_nodes), ("cluster.gpus_per_node", cl.gpus_per_node)):
        if v < 1:
            raise config_error(key, value=v, problem="must be at least 1", fix=f"set {key}>=1")
    iso = cfg.distillation.resource_isolation
    if iso.enabled:
        _check_isolation(cfg)
    elif cfg.policy.generation.colocated.enabled:
        raise config_error(
            "policy.generation.colocated.enabled", value=True,
            problem="Sluice runs generation as its own Slurm job, which cannot share GPUs with "
            "the training job",
            fix="set policy.generation.colocated.enabled=false and give generation its GPUs with "
            "policy.generation.colocated.resources.{num_nodes,gpus_per_node} (or use "
            "distillation.resource_isolation)",
        )
    if not iso.teacher_resident_on_gpu:
        raise config_error(
            "distillation.resource_isolation.teacher_resident_on_gpu", value=False,
            problem="Sluice's teacher runs in its own job and always stays loaded on its GPUs",
            fix="set distillation.resource_isolation.teacher_resident_on_gpu=true",
        )


def _check_requests(cfg: SluiceConfig, req: Dict[str, tuple]) -> None:
    """Every role asks for at least one node and one GPU, and no more GPUs than a node has."""
    cl = cfg.cluster
    for r, (n, g) in req.items():
        if n < 1 or g < 1:
            raise config_error(
                f"distillation.resource_isolation.roles.{r}", value=f"{n}x{g}",
                problem="every role needs at least one node and one GPU",
                fix=f"set roles.{r}.num_nodes>=1 and roles.{r}.gpus_per_node>=1",
            )
        if g > cl.gpus_per_node:
            raise config_error(
                f"distillation.resource_isolation.roles.{r}.gpus_per_node", value=g,
                problem=f"more GPUs than a node has (cluster.gpus_per_node={cl.gpus_per_node})",
                fix=f"use at most {cl.gpus_per_node} GPUs per node for each role",
            )


def _role_plan(cfg: SluiceConfig, r: str, request: tuple, placed: tuple) -> RolePlan:
    """Role ``r``'s plan: its workers (one trainer; else one per engine or teacher replica,
    whose tensor-parallel size must divide the role's GPUs per node) and its placement."""
    n, g = request
    if r == "training":
        tasks, gpt = 1, n * g
    else:
        per_task = {
            "generation": ("policy.generation.vllm_cfg.tensor_parallel_size",
                           cfg.policy.generation.vllm_cfg.tensor_parallel_size),
            "teacher": ("teacher.dtensor_cfg.tensor_parallel_size",
                        cfg.teacher.dtensor_cfg.tensor_parallel_size),
        }
        key, tp = per_task[r]
        if tp < 1 or g % tp:
            raise config_error(
                key, value=tp,
                problem=f"must divide the {r} role's GPUs per node ({g}): one "
                f"{'vLLM engine' if r == 'generation' else 'teacher replica'} lives on one node",
                fix=f"choose a divisor of {g}",
            )
        tasks, gpt = n * g // tp, tp
    nodes, ids = placed
    return RolePlan(role=r, num_nodes=n, gpus_per_node=g, num_tasks=tasks,
                    gpus_per_task=gpt, nodes=nodes, gpu_ids=ids)

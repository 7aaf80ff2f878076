"""The coordinator: owns a run's state machine. CPU only; never imports torch or vLLM.

    python -m launch.coordinator RUN_DIR          # what launch.run starts (here, or a process)

Each poll (queue.poll_s) it logs the steps trained since the last poll (metrics.jsonl,
wandb/TensorBoard), collects validations, writes the prompts of the steps generation may
start (launch.step_data), prunes the weights no longer needed (shared.retention), and has the
supervisor watch the jobs and their workers (launch.supervisor: resubmits what failed, up to
launch.max_retries per job). It ends the run when every step is trained and validated: STOP,
the jobs' end, the final model (checkpointing.save_consolidated). All of its state is in
RUN_DIR, so it can be killed and restarted at any time (launch.run on the run directory does
that); a run has one coordinator at a time (launch.lock). Hosted as a Slurm job or inside an
allocation, it stops on the hand-off flag and returns HANDED_OFF (launch.host goes on).

Files it writes:

    coordinator/state.json      jobs, retries, phase, steps (launch.state)
    coordinator/events.jsonl    what happened, one JSON object a line (launch.events)
    coordinator/STOP            the run is over ({"reason": "finished"|"failed", ...}): workers exit
    coordinator/lock.json       the one live coordinator (launch.lock)
    data/, steps/<t>/prompts/   the training prompts and each step's (launch.step_data)
    metrics.jsonl               one JSON object per step (train/*, timing/*; launch.metrics)
    final/                      the student after the last step (checkpointing.save_consolidated)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from launch import access
from launch.events import EventLog, RunFailed
from launch.executors import make_executor
from launch.lock import AlreadyRunning, RunLock
from launch.logger import MetricsLogger
from launch.metrics import step_metrics, summary
from launch.state import RunState
from launch.step_data import StepData
from launch.supervisor import Supervisor
from launch.validation import Validation
from shared.errors import UserError
from shared.files import atomic_write_json, read_json
from shared.partition import Plan
from shared.pipeline import ROLE, WORKER_STAGES
from shared.queue import StageQueue
from shared.retention import committed_checkpoints, prune_weights, weights_needed
from shared.rundir import (COMMITTED, WEIGHTS, RunDir, append_metrics, commit_dir, committed_steps,
                           is_committed_dir, last_step_on, last_trained_step, read_metrics,
                           temp_dir_for)
from shared.worker import load_run_config

log = logging.getLogger("sluice.coordinator")

# Set by the signal that asks a hosted coordinator to hand the run over (launch.host).
_HANDOFF = threading.Event()
# main()'s exit status when the coordinator stopped to hand the run over to its successor.
HANDED_OFF = 3


def request_handoff(signum, frame) -> None:
    """The hand-off flag (a signal handler): the loop stops at its next poll, saved."""
    _HANDOFF.set()


def handoff_requested() -> bool:
    return _HANDOFF.is_set()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Coordinator:
    def __init__(self, run_dir):
        self.rd = RunDir(run_dir)
        self.root = self.rd.root
        self.cfg = load_run_config(self.rd)
        run = read_json(self.rd.run_file)
        if run is None:
            raise FileNotFoundError(f"{self.root}/run.json missing: not a Sluice run directory")
        self.plan = Plan.from_dict(run["plan"])
        self.kind = run["executor"]
        executor = make_executor(self.kind, self.root, self.cfg, self.plan)
        self.state = RunState(self.rd, [u.key for u in executor.units()])
        self.events = EventLog(self.rd)
        self.event = self.events.event
        self.validation = Validation(self.rd, self.cfg)
        self.data = StepData(self.rd, self.cfg, self.plan, self.event)
        self.supervisor = Supervisor(self.rd, self.cfg, self.plan, executor, self.state, self.event,
                                     self.validation)
        self.poll_s = self.cfg.queue.poll_s
        self.lock = RunLock(self.rd)
        self.logger: Optional[MetricsLogger] = None  # started in run()
        self._logged: set = set()
        self._started = time.time()
        self._step_done_at: Dict[int, float] = {}
        self._cpu_logged = time.process_time()
        self._last_progress = ""

    # ------------------------------------------------------------------ steps

    def logged_steps(self) -> set:
        """Steps that already have their row in metrics.jsonl (a restarted coordinator that
        died between writing a row and saving state.json must not write it twice)."""
        return {r.get("step") for r in read_metrics(self.rd) if "train/loss" in r}

    def log_step(self, step: int) -> None:
        if step in self._logged:
            return
        row = step_metrics(self.rd, step, self.cfg)
        # The coordinator's own cost (its process: polls, prompts, metrics) since the last row.
        cpu = time.process_time()
        row["timing/coordinator_cpu_s"] = round(cpu - self._cpu_logged, 4)
        self._cpu_logged = cpu
        append_metrics(self.rd, row)
        for stage in ("prompts", *WORKER_STAGES):  # the step is done: its summaries are final
            StageQueue(self.rd, step, stage).refresh_manifest()
        self._logged.add(step)
        if self.logger is not None:
            self.logger.log(row, step=step)
        self.state["logged_step"] = step
        parts = [f"loss={row.get('train/loss', float('nan')):.4f}",
                 f"gen_tokens/sample={row.get('train/mean_gen_tokens_per_sample', 0):.1f}",
                 f"step_time={row.get('timing/step', 0):.1f}s"]
        total = self.state["total_steps"]
        self._step_done_at[step] = time.time()
        done = sorted(self._step_done_at)
        if len(done) >= 2:
            # Recent pace (steps overlap, so per-step wall times would over-count).
            recent = done[-min(len(done), 5):]
            pace = (self._step_done_at[recent[-1]] - self._step_done_at[recent[0]]) / (len(recent) - 1)
            parts.append(f"eta={_duration(pace * (total - step))}")
        log.info("[coordinator] step %d/%d done: %s", step, total, " ".join(parts))

    def report_progress(self, trained: int) -> None:
        """One console line per change of the current step's progress: prompts written,
        rollouts generated, samples scored, and the steps trained, with the step's age."""
        step = trained + 1
        if step > self.state.get("total_steps", 0):
            return
        counts = []
        for stage in ("prompts", "rollouts", "scored"):
            q = StageQueue(self.rd, step, stage)
            expected = q.expected()
            committed = q.committed(fast=True)
            rows = sum(r.get("rows", 0) for r in committed.values())
            counts.append(f"{stage} {len(committed)}/{expected or '?'} ({rows} rows)")
        line = f"step {step}/{self.state['total_steps']}: " + " | ".join(counts)
        if line != self._last_progress:
            self._last_progress = line
            log.info("[coordinator] %s", line)

    def prune_weights(self, trained: int, total: int) -> List[int]:
        """Delete the weights/<v> no longer needed (shared.retention.weights_needed); returns
        the versions deleted."""
        pending = [v for v in self.validation.versions(total) if not self.validation.is_collected(v)]
        needed = weights_needed(committed_steps(self.rd, WEIGHTS), trained,
                                committed_checkpoints(self.rd), self.cfg.distillation.max_staleness,
                                pending, self.cfg.checkpointing.keep_weights_period)
        dropped = prune_weights(self.rd, needed)
        if dropped:
            self.event("weights_pruned", versions=dropped)
        return dropped

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        stop = self.rd.stop_file
        if stop.exists() and self.state.get("phase") == "finished":
            print(f"run {self.root} is already finished")
            return 0
        try:
            self.lock.acquire()
        except AlreadyRunning as e:
            print(f"sluice: a coordinator is already running {self.root} ({e}); not starting a "
                  "second one. Watch it with python -m launch.inspect; to restart it, stop it first.",
                  file=sys.stderr)
            return 2
        try:
            return self._run(stop)
        finally:
            self.lock.release()

    def _run(self, stop: Path) -> int:
        stop.unlink(missing_ok=True)
        labels = ", ".join(f"{ROLE[r].label}={p.num_nodes}x{p.gpus_per_node}GPUs"
                           for r, p in self.plan.roles.items())
        log.info(("Isolated clusters created: " if self.plan.isolated else "Clusters created: ") + labels)
        self.event("coordinator_started", pid=os.getpid(), executor=self.kind, plan=labels)
        sup = self.supervisor
        try:
            self.data.prepare()
            self.validation.prepare()
            try:
                self.logger = MetricsLogger(self.rd, self.cfg)
            except ValueError as e:  # wandb could not start: before any job is submitted
                raise RunFailed(str(e)) from e
            total = self.data.total_steps()
            self.state.update(total_steps=total, phase="running")
            self.state.save()
            self._logged = self.logged_steps()
            dead = sup.attach_saved_jobs()
            if last_trained_step(self.rd) < total or not self.validation.done(total):
                sup.ensure_jobs(dead)
            pruned_at = None
            while True:
                trained = last_trained_step(self.rd)
                for t in range(1, trained + 1):
                    self.log_step(t)
                self.state["trained_step"] = trained
                self.report_progress(trained)
                for row in self.validation.poll(trained, total):
                    self.logger.log(row, step=row["step"])
                    self.event("validated", **row)
                if trained >= total and self.validation.done(total):
                    break
                # Prompts one step beyond what generation may start now (the steps whose
                # staleness window holds the trained step): the next step's are ready when
                # its weights land, so the coordinator's own poll is never on a hand-off's path.
                last = last_step_on(trained, self.cfg.distillation.max_staleness) + 1
                for t in range(trained + 1, min(total, last) + 1):
                    self.data.write_prompts(t)
                if trained != pruned_at:  # versions fall out of use only as training progresses
                    self.prune_weights(trained, total)
                    pruned_at = trained
                sup.watch_jobs()
                sup.check_workers()
                self.state.save()
                if handoff_requested():
                    self.event("coordinator_stopping", reason="time limit of its job: handing over")
                    if self.kind == "allocation":
                        sup.stop_for_time_limit()
                    return HANDED_OFF
                time.sleep(self.poll_s)
            return self.finish()
        except RunFailed as e:
            self.event("run_failed", reason=str(e).splitlines()[0])
            atomic_write_json(stop, {"reason": "failed", "detail": str(e)})
            self.state["phase"] = "failed"
            self.state.save()
            sup.stop_all()
            print(f"sluice: run failed: {e}", file=sys.stderr)
            return 1
        finally:
            if self.logger is not None:
                self.logger.close()

    def publish_final(self, step: int) -> Path:
        """checkpointing.save_consolidated: RUN_DIR/final, the student after the last step in
        Hugging Face format (weights/<step>, which training exported in the base model's
        dtype, with its config and tokenizer): hard links where the filesystem allows, else
        copies, committed as one directory."""
        src, final = self.rd.weights_dir(step), self.rd.final_dir
        if not is_committed_dir(src):
            raise RunFailed(f"{src} is not committed: cannot publish the final model "
                            "(checkpointing.save_consolidated)")
        tmp = temp_dir_for(final)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != COMMITTED:
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        commit_dir(tmp, final, {"step": step, "from": str(src), "format": "hf-safetensors",
                                "model_name": self.cfg.policy.model_name})
        self.event("final_published", step=step, path=str(final))
        return final

    def finish(self) -> int:
        self.state["phase"] = "finishing"
        self.state.save()
        atomic_write_json(self.rd.stop_file, {"reason": "finished"})
        self.supervisor.stop_all()
        if self.cfg.checkpointing.save_consolidated:
            self.publish_final(self.state["total_steps"])
        self.state["phase"] = "finished"
        self.state.save()
        text = summary(self.rd, time.time() - self._started)
        self.event("run_finished", steps=self.state["total_steps"])
        print(text)
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launch.coordinator RUN_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    root = Path(argv[0]).resolve()
    try:
        access.check_run_dir(root)
    except UserError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 2
    coordinator = Coordinator(root)
    access.apply_umask(coordinator.cfg.launch.share_group)
    return coordinator.run()


if __name__ == "__main__":
    sys.exit(main())

"""Metrics to wandb and TensorBoard, from the coordinator (CPU; never imports torch).

    from launch.logger import MetricsLogger
    logger = MetricsLogger(RunDir(path), cfg)      # starts wandb / TensorBoard as configured
    logger.log({"train/loss": 0.4, ...}, step=3)    # every metrics.jsonl row: train and validation
    logger.close()

metrics.jsonl stays the record; this only mirrors its rows.

wandb (`logger.wandb_enabled`): project `logger.wandb.project`, name `logger.wandb.name` (else
the run directory's name), entity `logger.wandb.entity`, mode `logger.wandb.mode` (else wandb's
own default, i.e. WANDB_MODE). Files go to RUN_DIR/wandb/. The run id is kept in
RUN_DIR/wandb/sluice-run-id, so a restarted coordinator continues the same wandb run. The
wandb config is the run's config.yaml (already without secrets) with every value equal to a
secret from the environment (WANDB_API_KEY, HF_TOKEN, ...) redacted again; the API key is
read by wandb from the environment and never written by Sluice. Rows arrive out of step
order (a validation of step v is collected after step v+1 trained), which wandb's own step
counter refuses, so every metric is charted against the logged "step" metric instead
(`define_metric("*", step_metric="step")`). Console capture, code saving and system stats
are off: the coordinator's output is in RUN_DIR/logs and its machine is a CPU node.

TensorBoard (`logger.tensorboard_enabled`): scalars to `logger.tensorboard.log_dir` (relative
to RUN_DIR; default RUN_DIR/tensorboard) through tensorboardX if installed, else the
`tensorboard` package's own event writer (neither needs torch); with neither, one warning and
no TensorBoard. torch.utils.tensorboard is never used: it would import torch.

A failure while logging a row is reported once and does not stop the run; a failure to start
wandb does (ValueError, before any job is submitted when created at coordinator start).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from numbers import Number
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from shared.rundir import WANDB, RunDir

log = logging.getLogger("sluice.logger")

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN")
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
RUN_ID_FILE = "sluice-run-id"


def secret_values() -> set:
    """Values of the secrets in the environment (long enough to be worth matching)."""
    out = set()
    for name, value in os.environ.items():
        if (name in SECRET_ENV or name.endswith(_SECRET_SUFFIXES)) and value and len(value) >= 8:
            out.add(value)
    return out


def scrub(obj: Any, secrets: Optional[set] = None) -> Any:
    """`obj` (nested dicts/lists of plain values) with every secret value redacted."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "<redacted>")
    return obj


def run_config_dict(rd: RunDir) -> Dict[str, Any]:
    """RUN_DIR/config.yaml as a plain dict, secrets redacted."""
    path = rd.config_file
    if not path.is_file():
        return {}
    return scrub(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def _scalars(row: Dict[str, Any]):
    for k, v in row.items():
        if isinstance(v, bool):
            yield k, float(v)
        elif isinstance(v, Number) and math.isfinite(float(v)):
            yield k, float(v)


class _TensorBoard:
    """Scalars only, without torch."""

    def __init__(self, log_dir: Path):
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            # lazy: optional packages (logger.tensorboard_enabled); a missing one is a warning
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(log_dir))
            self._kind = "tensorboardX"
            return
        except ImportError:
            pass
        # lazy: optional, as above (ImportError: the caller warns)
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._Event, self._Summary = Event, Summary
        self._writer = EventFileWriter(str(log_dir))
        self._kind = "tensorboard"

    def log(self, row: Dict[str, Any], step: int) -> None:
        if self._kind == "tensorboardX":
            for k, v in _scalars(row):
                if k != "step":
                    self._writer.add_scalar(k, v, global_step=step)
            return
        values = [self._Summary.Value(tag=k, simple_value=v) for k, v in _scalars(row) if k != "step"]
        if values:
            self._writer.add_event(self._Event(wall_time=time.time(), step=step,
                                               summary=self._Summary(value=values)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsLogger:
    """Mirror of metrics.jsonl rows to wandb and TensorBoard, as configured."""

    def __init__(self, run_dir, cfg):
        self.rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.cfg = cfg
        self.wandb_run = None
        self.tb: Optional[_TensorBoard] = None
        self._warned: set = set()
        lc = cfg.logger
        if lc.wandb_enabled:
            self.wandb_run = self._start_wandb()
        if lc.tensorboard_enabled:
            tb_dir = Path(lc.tensorboard.log_dir) if lc.tensorboard.log_dir else Path("tensorboard")
            if not tb_dir.is_absolute():
                tb_dir = self.rd.path(tb_dir)
            try:
                self.tb = _TensorBoard(tb_dir)
                log.info("[logger] TensorBoard scalars to %s (%s)", tb_dir, self.tb._kind)
            except ImportError:
                log.warning("logger.tensorboard_enabled=true but neither tensorboardX nor tensorboard "
                            "is installed (the coordinator does not use torch.utils.tensorboard); "
                            "no TensorBoard logs. Fix: pip install tensorboardX, or set "
                            "logger.tensorboard_enabled=false")

    def _start_wandb(self):
        # lazy: 0.4 s to import; only logger.wandb_enabled needs it
        import wandb

        w = self.cfg.logger.wandb
        wdir = self.rd.path(WANDB)
        wdir.mkdir(parents=True, exist_ok=True)
        id_file = wdir / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            tmp = id_file.with_suffix(".tmp")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, id_file)
        try:
            run = wandb.init(
                project=w.project, entity=w.entity, name=w.name or self.rd.root.name,
                id=run_id, resume="allow", dir=str(self.rd.root), mode=w.mode,
                config=run_config_dict(self.rd),
                settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True),
            )
        except Exception as e:
            raise ValueError(
                f"logger.wandb_enabled=true but wandb could not start ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Fix: export WANDB_API_KEY before "
                "launching, or set logger.wandb.mode=offline (compute nodes without internet), "
                "or logger.wandb_enabled=false") from e
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        log.info("[logger] wandb run %s (%s) in %s", run_id, getattr(run.settings, "mode", "?"), wdir)
        return run

    def _warn_once(self, what: str, e: Exception) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("[logger] %s logging failed (%s: %s); metrics.jsonl still has every row",
                        what, type(e).__name__, e)

    def log(self, row: Dict[str, Any], step: int) -> None:
        """Log one metrics row (train or validation) at `step`."""
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({**dict(_scalars(row)), "step": step})
            except Exception as e:
                self._warn_once("wandb", e)
        if self.tb is not None:
            try:
                self.tb.log(row, step)
                self.tb.flush()
            except Exception as e:
                self._warn_once("TensorBoard", e)

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as e:
                self._warn_once("wandb", e)
            self.wandb_run = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

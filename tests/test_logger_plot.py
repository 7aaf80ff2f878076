"""Metrics mirrors (wandb offline, TensorBoard) and the run plot.

    .venv/bin/python -m pytest tests/test_logger_plot.py -q
"""

import importlib.util
import json
import logging

from omegaconf import OmegaConf

from launch.logger import MetricsLogger
from launch.plot import TITLES, plot_run
from shared.recipe import load
from shared.rundir import RunDir

SECRET = "sk-test-0123456789abcdef-not-a-real-key"
TRAIN = [{"step": 1, "train/loss": 2.5, "timing/generation": 3.0, "timing/teacher": 1.5,
          "timing/training_train_s": 2.0},
         {"step": 2, "train/loss": 2.0, "timing/generation": 2.5, "timing/teacher": 1.0,
          "timing/training_train_s": 1.8}]
VAL = [{"step": 0, "validation/accuracy": 0.25, "validation/avg_length": 12.0},
       {"step": 2, "validation/accuracy": 0.5, "validation/avg_length": 10.5}]


def make_run(tmp_path, *overrides):
    # A secret that leaked into the config (here: the run name) must not reach wandb either.
    cfg, node = load("smoke", [f"launch.name={SECRET}", *overrides])
    OmegaConf.save(node, tmp_path / "config.yaml")
    return RunDir(tmp_path), cfg


def wandb_records(path):
    """The records of a .wandb file (wandb's LevelDB-log format: 7-byte file header, 32 KiB
    blocks, each record chunk with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left  # block trailer padding
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            pos += (block - pos % block) % block
        elif kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    records = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def test_wandb_offline_has_metrics_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    rd, cfg = make_run(tmp_path, "logger.wandb_enabled=true", "logger.tensorboard_enabled=false",
                       "logger.wandb.project=sluice-test")
    with MetricsLogger(rd, cfg) as logger:
        # Out of order, as the coordinator logs them: v0 first, then steps 1, 2, then v2.
        for row in (VAL[0], TRAIN[0], TRAIN[1], VAL[1]):
            logger.log(row, step=row["step"])

    files = list(rd.path("wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    history = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.history.item if not (i.key or i.nested_key[0]).startswith("_")})
    assert history == [{**r} for r in (VAL[0], TRAIN[0], TRAIN[1], VAL[1])]
    config = {}  # the run record carries the initial config; config records any later update
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    assert config["policy"]["model_name"] == "tiny:student-tied"
    assert config["launch"]["name"] == "<redacted>"

    # A restarted coordinator continues the same wandb run.
    run_id = rd.path("wandb", "sluice-run-id").read_text().strip()
    assert files[0].name == f"run-{run_id}.wandb"

    leaked = [p for p in rd.root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [rd.config_file]  # the test's own config file, written by hand


def test_tensorboard_without_torch(tmp_path, caplog):
    rd, cfg = make_run(tmp_path, "logger.wandb_enabled=false", "logger.tensorboard_enabled=true")
    installed = any(importlib.util.find_spec(m) for m in ("tensorboardX", "tensorboard"))
    with caplog.at_level(logging.WARNING, logger="sluice.logger"), MetricsLogger(rd, cfg) as logger:
        for row in TRAIN + VAL:
            logger.log(row, step=row["step"])
    if installed:
        assert list(rd.path("tensorboard").glob("events.out.tfevents.*"))
    else:
        assert logger.tb is None and "neither tensorboardX nor tensorboard" in caplog.text


def test_plot_run_png(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    rows = [TRAIN[0], VAL[0], TRAIN[1], VAL[1], {**TRAIN[1], "train/loss": 1.9}]  # step 2 redone
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "trai')
    out = tmp_path / "plots" / "curves.png"
    fig = plot_run(RunDir(tmp_path), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title() for ax in fig.axes] == list(TITLES)
    loss, acc, timing = fig.axes
    assert [list(line.get_ydata()) for line in loss.get_lines()] == [[2.5, 1.9]]
    assert [list(line.get_xdata()) for line in acc.get_lines()] == [[0, 2]]
    assert [line.get_label() for line in timing.get_lines()] == ["generation", "teacher", "training"]

    from launch.inspect import main

    other = tmp_path / "cli.png"
    assert main([str(tmp_path), "--plot", str(other)]) == 0
    assert other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

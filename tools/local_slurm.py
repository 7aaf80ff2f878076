"""A real Slurm cluster on this one machine, for tests and local runs.

    python -m tools.local_slurm up      [--state-dir DIR] [--timeout SECONDS]
    python -m tools.local_slurm status  [--state-dir DIR]
    python -m tools.local_slurm down    [--state-dir DIR]
    export SLURM_CONF=DIR/etc/slurm.conf   # then sbatch, sinfo, sacct, submitit work

`up` (needs root) installs the Debian packages when missing (slurm-wlm, munge,
mariadb-server, slurmdbd), then starts munged, MariaDB, slurmdbd, slurmctld and four
slurmd nodes: node1..node3 in the default partition `debug`, each with 4 fake GPUs
(`Gres=gpu:4`, backed by character devices made with mknod), and cpu1, CPU only, in the
partition `cpu` (for coordinator jobs), and waits until `sinfo` shows the nodes idle. It is
idempotent: with everything running it only checks and returns. If a node is INVAL or
DOWN it restarts slurmctld with a clean StateSaveLocation, the one recovery seen to work.

Everything lives under the state dir (default /tmp/sluice-slurm, or $SLUICE_SLURM_DIR):
configs in etc/, logs in log/, pid files in run/, Slurm state in spool/, the munge key
and socket in munge/, the MariaDB data in mysql/. Nothing is written to /etc/slurm or
/etc/munge, so every Slurm command (sbatch, sacct, scancel, hence submitit) needs
SLURM_CONF pointing at DIR/etc/slurm.conf; slurmdbd and slurmd find slurmdbd.conf and
gres.conf beside it. Jobs inherit SLURM_CONF from the submitting environment.
The daemons use their own ports (slurmctld 17817, slurmdbd 17819, slurmd 17001-17004,
MariaDB 17306 on 127.0.0.1), so a system Slurm or MariaDB does not get in the way.
`down` stops, by recorded pid, only the processes `up` started; the state dir stays, so
the next `up` reuses the database and the munge key (delete the dir for a clean slate).

Python API: `can_start()`, `ensure_up(state_dir)` -> env vars to use, `down(state_dir)`,
`is_up(state_dir)`, `running_pids(state_dir)`, `node_states(state_dir)`. Without root,
`ensure_up` can only use a cluster that root already started.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEFAULT_STATE_DIR = Path(os.environ.get("SLUICE_SLURM_DIR", "/tmp/sluice-slurm"))
CLUSTER_NAME = "sluice"
PARTITION = "debug"
NODES = ("node1", "node2", "node3")
GPUS_PER_NODE = 4
# A CPU-only node in a partition of its own, as real clusters have for small jobs: where the
# coordinator job runs, so that it never takes one of the GPU nodes the roles need.
CPU_PARTITION = "cpu"
CPU_NODES = ("cpu1",)
ALL_NODES = NODES + CPU_NODES
SLURMD_PORTS = {node: 17001 + i for i, node in enumerate(ALL_NODES)}
SLURMCTLD_PORT = 17817
SLURMDBD_PORT = 17819
MYSQL_PORT = 17306
# Low enough for any box this runs on; a node reporting less than configured goes INVAL.
NODE_REAL_MEMORY_MB = 4000
DB_NAME = "slurm_acct_db"
DB_USER = "slurm"
# The database only listens on 127.0.0.1 and holds throwaway accounting data.
DB_PASSWORD = "sluice-local"
APT_PACKAGES = ("slurm-wlm", "munge", "mariadb-server", "slurmdbd")
REQUIRED_BINARIES = (
    "slurmctld", "slurmd", "slurmdbd", "sbatch", "sinfo", "sacct", "sacctmgr", "scontrol",
    "munged", "munge", "mysqld_safe", "mariadb", "mariadb-install-db",
)
# Short sinfo states of a node that is up and usable (busy counts as usable).
READY_NODE_STATES = {"idle", "alloc", "mix", "comp", "resv", "plnd"}
# States that waiting does not cure: the node answers but slurmctld has rejected it.
BROKEN_NODE_STATES = {"inval", "down", "drain", "drng", "fail", "failg"}
DEFAULT_TIMEOUT_S = 180.0
POLL_INTERVAL_S = 0.25


class ClusterError(RuntimeError):
    """The local cluster cannot be started or is unhealthy; the message says how to fix it."""


@dataclass(frozen=True)
class Layout:
    """Where every file of one local cluster lives, under its state dir."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def gres_conf(self) -> Path:
        return self.etc / "gres.conf"

    @property
    def slurmdbd_conf(self) -> Path:
        return self.etc / "slurmdbd.conf"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def ctld_state(self) -> Path:
        return self.root / "spool" / "slurmctld"

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    @property
    def munge(self) -> Path:
        return self.root / "munge"

    @property
    def munge_key(self) -> Path:
        return self.munge / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.munge / "munge.socket"

    @property
    def mysql(self) -> Path:
        return self.root / "mysql"

    @property
    def mysql_data(self) -> Path:
        return self.mysql / "data"

    @property
    def mysql_socket(self) -> Path:
        return self.mysql / "mysqld.sock"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def gpu_device(self, index: int) -> Path:
        return self.dev / f"nvidia{index}"


@dataclass(frozen=True)
class Daemon:
    """One process `up` starts: its pid file and the process names it may have."""

    name: str
    pid_file: Path
    comms: tuple[str, ...]
    stop_signal: int = signal.SIGTERM


def daemons(layout: Layout) -> list[Daemon]:
    """All daemons of the cluster, in start order (`down` stops them in reverse)."""
    return [
        Daemon("munged", layout.munge / "munged.pid", ("munged",)),
        # mysqld_safe restarts mariadbd only after a crash, and it ignores SIGTERM. `down`
        # stops mariadbd first (reverse order), after which it exits on its own; SIGKILL is
        # for the rare one left without a server. Its pid is recorded by us.
        Daemon("mysqld_safe", layout.mysql / "mysqld_safe.pid", ("mysqld_safe",), signal.SIGKILL),
        Daemon("mariadbd", layout.mysql / "mariadbd.pid", ("mariadbd", "mysqld")),
        Daemon("slurmdbd", layout.run / "slurmdbd.pid", ("slurmdbd",)),
        Daemon("slurmctld", layout.run / "slurmctld.pid", ("slurmctld",)),
        *(Daemon(f"slurmd-{node}", layout.run / f"slurmd-{node}.pid", ("slurmd",)) for node in ALL_NODES),
    ]


def _daemon(layout: Layout, name: str) -> Daemon:
    return next(d for d in daemons(layout) if d.name == name)


# ---------------------------------------------------------------- processes


def _process_matches(pid: int, comms: tuple[str, ...]) -> bool:
    """True when `pid` is a live (not zombie) process named one of `comms`.

    Checking the name guards against a stale pid file whose pid was reused.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm = text[text.index("(") + 1 : text.rindex(")")]
    process_state = text[text.rindex(")") + 2]
    return process_state not in "ZX" and comm in comms


def _live_pid(daemon: Daemon) -> int | None:
    try:
        pid = int(daemon.pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _process_matches(pid, daemon.comms) else None


def running_pids(state_dir: Path | str = DEFAULT_STATE_DIR) -> dict[str, int | None]:
    """Pid of each daemon of the cluster at `state_dir`, None where it does not run."""
    layout = Layout(Path(state_dir))
    return {d.name: _live_pid(d) for d in daemons(layout)}


def _poll(condition, timeout_s: float, what: str, layout: Layout) -> None:
    """Return once `condition()` is true; raise ClusterError naming `what` after timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}.\n" + _log_report(layout))
        time.sleep(POLL_INTERVAL_S)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
        os.kill(pid, signum)


def _stop(daemon: Daemon, timeout_s: float = 30.0) -> bool:
    """Signal the daemon named by its pid file, SIGKILL if it lingers; True if it was running."""
    pid = _live_pid(daemon)
    if pid is None:
        daemon.pid_file.unlink(missing_ok=True)
        return False
    _signal(pid, daemon.stop_signal)
    deadline = time.monotonic() + timeout_s
    while _process_matches(pid, daemon.comms):
        if time.monotonic() > deadline:
            _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
        time.sleep(POLL_INTERVAL_S)
    daemon.pid_file.unlink(missing_ok=True)
    return True


def _slurm_env(layout: Layout) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(layout.slurm_conf)}


def _run(
    cmd: list[str], env: dict[str, str] | None = None, timeout_s: float = 60.0, **kwargs
) -> subprocess.CompletedProcess:
    if "input" not in kwargs:
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def _start_daemon(daemon: Daemon, cmd: list[str], layout: Layout, timeout_s: float, **kwargs) -> int:
    """Run a self-daemonizing command, then wait for its pid file to name a live process."""
    log_path = layout.log / f"{daemon.name}.start.log"
    with open(log_path, "ab") as log:
        # stdout goes to a file, not a pipe: a daemon keeping the pipe open would hang us.
        result = subprocess.run(
            cmd, env=_slurm_env(layout), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            timeout=60, **kwargs,
        )
    if result.returncode != 0:
        raise ClusterError(
            f"{daemon.name} failed to start (exit {result.returncode}): {' '.join(cmd)}\n" + _log_report(layout)
        )
    _poll(lambda: _live_pid(daemon) is not None, timeout_s, f"{daemon.name} to write {daemon.pid_file}", layout)
    return _live_pid(daemon)  # type: ignore[return-value]


def _log_files(layout: Layout) -> list[Path]:
    found = []
    for folder in (layout.log, layout.munge, layout.mysql):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.suffix in (".log", ".err") and p.is_file())
    return found


def _log_report(layout: Layout, tail_lines: int = 5) -> str:
    """The log files of the cluster, each with its last lines, for error messages."""
    parts = ["Log files:"]
    for path in _log_files(layout):
        parts.append(f"  {path}")
        try:
            lines = path.read_text(errors="replace").splitlines()[-tail_lines:]
        except OSError:
            continue
        parts += [f"      {line}" for line in lines]
    return "\n".join(parts)


# ---------------------------------------------------------------- preconditions


def _missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def is_up(state_dir: Path | str = DEFAULT_STATE_DIR) -> bool:
    """True when every daemon runs and all nodes are usable (needs no root)."""
    layout = Layout(Path(state_dir).resolve())
    return all(running_pids(layout.root).values()) and _nodes_ready(node_states(layout.root))


def can_start(state_dir: Path | str = DEFAULT_STATE_DIR) -> tuple[bool, str]:
    """Whether `ensure_up` can work here, and if not, why (the reason names the fix)."""
    if sys.platform != "linux":
        return False, f"the local Slurm cluster needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        if is_up(state_dir):
            return True, "already running"
        return False, (
            "the local Slurm cluster needs root to start (it installs packages, makes device files with "
            "mknod and runs munged/MariaDB as their users); run `python -m tools.local_slurm up` as root "
            "(e.g. sudo), or run as root, as in the CI container"
        )
    missing = _missing_binaries()
    if missing and shutil.which("apt-get") is None:
        return False, (
            f"Slurm binaries are missing ({', '.join(missing)}) and there is no apt-get to install them; "
            f"install the packages {' '.join(APT_PACKAGES)} (Debian/Ubuntu) first"
        )
    return True, "ok"


@contextlib.contextmanager
def _services_not_started_by_dpkg() -> Iterator[None]:
    """Stop package scripts from starting system munge/MariaDB/Slurm daemons we would not own.

    Debian's invoke-rc.d asks /usr/sbin/policy-rc.d; exit 101 means "do not start".
    """
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\n# written by tools/local_slurm.py during apt-get install\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)


def install_packages() -> None:
    """Install the Debian packages when a binary is missing (`apt-get update` first)."""
    if not _missing_binaries():
        return
    if shutil.which("apt-get") is None:
        raise ClusterError(
            f"Slurm binaries are missing ({', '.join(_missing_binaries())}) and there is no apt-get; "
            f"install the packages {' '.join(APT_PACKAGES)} (Debian/Ubuntu) first"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = [
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold",
         *APT_PACKAGES],
    ]
    with _services_not_started_by_dpkg():
        for cmd in commands:
            result = _run(cmd, env=env, timeout_s=900)
            if result.returncode != 0:
                raise ClusterError(
                    f"`{' '.join(cmd)}` failed (exit {result.returncode}); fix the package source and rerun.\n"
                    + result.stdout[-2000:] + result.stderr[-2000:]
                )
    still_missing = _missing_binaries()
    if still_missing:
        raise ClusterError(f"after installing {' '.join(APT_PACKAGES)}, still missing: {', '.join(still_missing)}")


# ---------------------------------------------------------------- configuration


def _node_hardware() -> str:
    """The CPU topology of this host as slurmd reports it (`slurmd -C`), for the node lines.

    Copying slurmd's own view avoids INVAL nodes from a socket/core/thread mismatch.
    """
    result = _run(["slurmd", "-C"])
    fields = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    if result.returncode != 0 or not all(k in fields for k in keys):
        raise ClusterError(f"`slurmd -C` gave no hardware description: {result.stdout}{result.stderr}")
    return " ".join(f"{k}={fields[k]}" for k in keys)


def render_slurm_conf(layout: Layout, hostname: str, hardware: str) -> str:
    nodes = "\n".join(
        f"NodeName={node} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={SLURMD_PORTS[node]} "
        f"{hardware} RealMemory={NODE_REAL_MEMORY_MB}"
        + (f" Gres=gpu:{GPUS_PER_NODE}" if node in NODES else "") + " State=UNKNOWN"
        for node in ALL_NODES
    )
    return f"""\
# Written by tools/local_slurm.py; rewritten on every `up`.
ClusterName={CLUSTER_NAME}
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={SLURMCTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={layout.munge_socket}
StateSaveLocation={layout.ctld_state}
SlurmdSpoolDir={layout.root}/spool/%n
SlurmctldPidFile={_daemon(layout, "slurmctld").pid_file}
SlurmdPidFile={layout.run}/slurmd-%n.pid
SlurmctldLogFile={layout.log}/slurmctld.log
SlurmdLogFile={layout.log}/slurmd-%n.log
# Containers have no usable cgroups: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
# A node that was down for not responding comes back as soon as it registers.
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
GresTypes=gpu
# Accounting through slurmdbd, so sacct (and submitit) see job states.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={SLURMDBD_PORT}
# Connections to slurmdbd ignore AuthInfo: for them this names the munge socket.
AccountingStoragePass={layout.munge_socket}
# GPUs in sacct's AllocTRES, as GPU clusters record them.
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MailProg=/bin/true
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
PartitionName={CPU_PARTITION} Nodes={",".join(CPU_NODES)} MaxTime=INFINITE State=UP
"""


def render_gres_conf(layout: Layout) -> str:
    # The nodes share one host, so they share the fake device files; Slurm only stats them.
    # Count= without File= made slurmd report 0 GPUs and the nodes went INVAL.
    last = GPUS_PER_NODE - 1
    return (
        "# Written by tools/local_slurm.py.\n"
        f"NodeName={','.join(NODES)} Name=gpu File={layout.dev}/nvidia[0-{last}]\n"
    )


def render_slurmdbd_conf(layout: Layout) -> str:
    return f"""\
# Written by tools/local_slurm.py; must stay mode 600 and owned by SlurmUser (root).
AuthType=auth/munge
AuthInfo=socket={layout.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={SLURMDBD_PORT}
SlurmUser=root
PidFile={_daemon(layout, "slurmdbd").pid_file}
LogFile={layout.log}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={MYSQL_PORT}
StorageUser={DB_USER}
StoragePass={DB_PASSWORD}
StorageLoc={DB_NAME}
"""


def _write_if_changed(path: Path, text: str, mode: int) -> bool:
    """Write `text` to `path` unless it already holds it; True when the file changed."""
    changed = not path.exists() or path.read_text() != text
    if changed:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(path)
    path.chmod(mode)
    return changed


def _chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _make_dirs(layout: Layout) -> None:
    for folder in (layout.root, layout.etc, layout.run, layout.log, layout.ctld_state, layout.dev):
        folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    # munged wants its socket directory owned by it, searchable by all, writable by none else.
    layout.munge.mkdir(mode=0o755, exist_ok=True)
    _chown(layout.munge, "munge")
    layout.munge.chmod(0o755)
    layout.mysql.mkdir(mode=0o755, exist_ok=True)
    _chown(layout.mysql, "mysql")


def _make_gpu_devices(layout: Layout) -> None:
    """Fake GPUs: character devices with the NVIDIA major number; nothing ever opens them."""
    for index in range(GPUS_PER_NODE):
        path = layout.gpu_device(index)
        if path.exists() and stat.S_ISCHR(path.stat().st_mode):
            continue
        path.unlink(missing_ok=True)
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(195, index))
        except OSError as error:
            raise ClusterError(
                f"cannot create the fake GPU device {path} with mknod ({error}); the container needs "
                "CAP_MKNOD (run as root, without a seccomp/capability drop of mknod)"
            ) from error


def _write_configs(layout: Layout) -> bool:
    """(Re)write slurm.conf, gres.conf and slurmdbd.conf; True if any of them changed."""
    hostname = socket.gethostname().split(".")[0]
    changed = _write_if_changed(layout.slurm_conf, render_slurm_conf(layout, hostname, _node_hardware()), 0o644)
    changed |= _write_if_changed(layout.gres_conf, render_gres_conf(layout), 0o644)
    # slurmdbd refuses a config readable by others (it holds the database password).
    changed |= _write_if_changed(layout.slurmdbd_conf, render_slurmdbd_conf(layout), 0o600)
    os.chown(layout.slurmdbd_conf, 0, 0)
    return changed


# ---------------------------------------------------------------- services


def _munge_works(layout: Layout) -> bool:
    cred = _run(["munge", "-n", "-S", str(layout.munge_socket)], timeout_s=10)
    if cred.returncode != 0:
        return False
    return _run(["unmunge", "-S", str(layout.munge_socket)], input=cred.stdout, timeout_s=10).returncode == 0


def _ensure_munge(layout: Layout, timeout_s: float) -> None:
    if not layout.munge_key.exists():
        layout.munge_key.write_bytes(os.urandom(1024))
        _chown(layout.munge_key, "munge")
        layout.munge_key.chmod(0o400)
    daemon = _daemon(layout, "munged")
    if _live_pid(daemon) is None:
        # A socket left by a killed munged would make the new one refuse to start.
        layout.munge_socket.unlink(missing_ok=True)
        _start_daemon(
            daemon,
            ["munged", f"--key-file={layout.munge_key}", f"--socket={layout.munge_socket}",
             f"--pid-file={daemon.pid_file}", f"--log-file={layout.munge / 'munged.log'}",
             f"--seed-file={layout.munge / 'munged.seed'}"],
            layout, timeout_s, user="munge", group="munge", extra_groups=[],
        )
    _poll(lambda: _munge_works(layout), timeout_s, "munged to answer on its socket", layout)


def _mysql(layout: Layout, sql: str) -> subprocess.CompletedProcess:
    # As root over the socket: the unix_socket plugin authenticates root without a password.
    return _run(["mariadb", "--no-defaults", f"--socket={layout.mysql_socket}", "-uroot", "-e", sql], timeout_s=30)


def _ensure_mariadb(layout: Layout, timeout_s: float) -> None:
    if not (layout.mysql_data / "mysql").is_dir():
        result = _run(
            ["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={layout.mysql_data}",
             "--auth-root-authentication-method=socket", "--skip-test-db"],
            timeout_s=300,
        )
        if result.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    mariadbd = _daemon(layout, "mariadbd")
    safe = _daemon(layout, "mysqld_safe")
    if _live_pid(mariadbd) is None:
        _stop(safe)  # a lone mysqld_safe would start a second server on the same files
        with open(layout.mysql / "mysqld_safe.log", "ab") as log:
            # mysqld_safe stays in the foreground: `setsid -f` detaches it from this process.
            subprocess.run(
                ["setsid", "-f", "mysqld_safe", "--no-defaults", "--user=mysql",
                 f"--datadir={layout.mysql_data}", f"--socket={layout.mysql_socket}",
                 f"--pid-file={mariadbd.pid_file}", f"--log-error={layout.mysql / 'mariadb.err'}",
                 f"--port={MYSQL_PORT}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                 "--innodb-lock-wait-timeout=900"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=30,
            )
        _poll(lambda: _live_pid(mariadbd) is not None, timeout_s, f"MariaDB to write {mariadbd.pid_file}", layout)
        # mysqld_safe is mariadbd's parent: record it so `down` can stop it too.
        parent = _parent_pid(_live_pid(mariadbd))
        if parent is not None and _process_matches(parent, safe.comms):
            safe.pid_file.write_text(f"{parent}\n")
    _poll(lambda: _mysql(layout, "SELECT 1").returncode == 0, timeout_s, "MariaDB to accept connections", layout)
    grants = [f"CREATE DATABASE IF NOT EXISTS {DB_NAME}"]
    for host in ("127.0.0.1", "localhost"):
        grants += [
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'{host}' IDENTIFIED BY '{DB_PASSWORD}'",
            f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'{host}'",
        ]
    result = _mysql(layout, "; ".join(grants))
    if result.returncode != 0:
        raise ClusterError(f"could not create the Slurm database and user: {result.stderr}")


def _parent_pid(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[1])


def _clusters(layout: Layout) -> list[str] | None:
    """Clusters registered in slurmdbd, or None while slurmdbd does not answer."""
    cmd = ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"]
    result = _run(cmd, env=_slurm_env(layout), timeout_s=30)
    return result.stdout.split() if result.returncode == 0 else None


def _ensure_slurmdbd(layout: Layout, timeout_s: float) -> None:
    daemon = _daemon(layout, "slurmdbd")
    if _live_pid(daemon) is None:
        _start_daemon(daemon, ["slurmdbd"], layout, timeout_s)
    _poll(lambda: _clusters(layout) is not None, timeout_s, "slurmdbd to answer sacctmgr", layout)
    if CLUSTER_NAME not in (_clusters(layout) or []):
        # slurmctld only sends job records for a cluster slurmdbd knows.
        result = _run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME], env=_slurm_env(layout))
        if result.returncode != 0 and CLUSTER_NAME not in (_clusters(layout) or []):
            raise ClusterError(f"`sacctmgr -i add cluster {CLUSTER_NAME}` failed: {result.stdout}{result.stderr}")


def _ctld_answers(layout: Layout) -> bool:
    result = _run(["scontrol", "ping"], env=_slurm_env(layout), timeout_s=30)
    return result.returncode == 0 and "UP" in result.stdout


def _ensure_slurmctld(layout: Layout, timeout_s: float) -> None:
    daemon = _daemon(layout, "slurmctld")
    if _live_pid(daemon) is None:
        _start_daemon(daemon, ["slurmctld"], layout, timeout_s)
    _poll(lambda: _ctld_answers(layout), timeout_s, "slurmctld to answer `scontrol ping`", layout)


def _ensure_slurmds(layout: Layout, timeout_s: float) -> None:
    for node in ALL_NODES:
        daemon = _daemon(layout, f"slurmd-{node}")
        if _live_pid(daemon) is None:
            _start_daemon(daemon, ["slurmd", "-N", node], layout, timeout_s)


def node_states(state_dir: Path | str = DEFAULT_STATE_DIR) -> dict[str, str]:
    """Short sinfo state of each node ("idle", "down*", "inval", ...); empty if sinfo fails."""
    layout = Layout(Path(state_dir))
    result = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=_slurm_env(layout), timeout_s=30)
    if result.returncode != 0:
        return {}
    return dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)


def _nodes_ready(states: dict[str, str]) -> bool:
    return all(states.get(node) in READY_NODE_STATES for node in ALL_NODES)


def _nodes_broken(states: dict[str, str]) -> bool:
    # A trailing "*" means "not responding yet": that one waiting can still cure.
    return any(s.rstrip("$~#!%@^-") in BROKEN_NODE_STATES for s in states.values())


def _wait_for_nodes(layout: Layout, timeout_s: float) -> bool:
    """Wait until all nodes are usable; False on timeout or as soon as one is INVAL/DOWN."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = node_states(layout.root)
        if _nodes_ready(states):
            return True
        if _nodes_broken(states):
            return False
        time.sleep(POLL_INTERVAL_S)
    return False


def _restart_with_clean_state(layout: Layout, timeout_s: float) -> None:
    """The recovery seen to work for INVAL nodes: slurmctld from an empty StateSaveLocation.

    The slurmds restart too, so that they register with the new slurmctld at once.
    """
    for daemon in daemons(layout):
        if daemon.name == "slurmctld" or daemon.name.startswith("slurmd-"):
            _stop(daemon)
    shutil.rmtree(layout.ctld_state, ignore_errors=True)
    layout.ctld_state.mkdir(parents=True, exist_ok=True)
    _ensure_slurmctld(layout, timeout_s)
    _ensure_slurmds(layout, timeout_s)


def _stop_slurm_daemons(layout: Layout) -> None:
    for daemon in reversed(daemons(layout)):
        if daemon.name.startswith("slurm"):
            _stop(daemon)


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """Serialise `up`/`down` across processes (e.g. parallel test workers)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def ensure_up(state_dir: Path | str = DEFAULT_STATE_DIR, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, str]:
    """Start whatever part of the cluster is not running; return the env vars to use it.

    With everything running this only checks (well under a second). Raises ClusterError.
    """
    layout = Layout(Path(state_dir).resolve())
    ok, reason = can_start(layout.root)
    if not ok:
        raise ClusterError(reason)
    if os.geteuid() != 0:
        return {"SLURM_CONF": str(layout.slurm_conf)}  # started by root earlier; nothing we may do
    with _locked(layout):
        install_packages()
        _make_dirs(layout)
        _make_gpu_devices(layout)
        if _write_configs(layout):
            # Running daemons hold the old config; restart them on the new one.
            _stop_slurm_daemons(layout)
        _ensure_munge(layout, timeout_s)
        _ensure_mariadb(layout, timeout_s)
        _ensure_slurmdbd(layout, timeout_s)
        _ensure_slurmctld(layout, timeout_s)
        _ensure_slurmds(layout, timeout_s)
        if not _wait_for_nodes(layout, timeout_s):
            _restart_with_clean_state(layout, timeout_s)
            if not _wait_for_nodes(layout, timeout_s):
                raise ClusterError(
                    f"nodes not idle after restarting slurmctld with a clean state: {node_states(layout.root)}.\n"
                    f"Stop with `python -m tools.local_slurm down --state-dir {layout.root}`, delete that "
                    "dir and retry.\n" + _log_report(layout)
                )
    return {"SLURM_CONF": str(layout.slurm_conf)}


def down(state_dir: Path | str = DEFAULT_STATE_DIR) -> list[str]:
    """Stop the daemons `up` started (by their pid files); return the names stopped."""
    layout = Layout(Path(state_dir).resolve())
    if not layout.root.is_dir():
        return []
    with _locked(layout):
        return [d.name for d in reversed(daemons(layout)) if _stop(d)]


def status_text(state_dir: Path | str = DEFAULT_STATE_DIR) -> str:
    layout = Layout(Path(state_dir).resolve())
    lines = [f"state dir: {layout.root}", f"SLURM_CONF={layout.slurm_conf}"]
    pids = running_pids(layout.root)
    lines += [f"  {name:<14} {pid if pid else 'not running'}" for name, pid in pids.items()]
    if pids.get("slurmctld"):
        lines += [f"  {node:<14} {state}" for node, state in sorted(node_states(layout.root).items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.local_slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait per step (up)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            env = ensure_up(args.state_dir, args.timeout)
            print("\n".join(f"export {key}={value}" for key, value in env.items()))
        elif args.command == "down":
            stopped = down(args.state_dir)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            print(status_text(args.state_dir))
    except ClusterError as error:
        print(f"local_slurm {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

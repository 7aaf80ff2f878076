"""Who may read and write a run directory.

Whoever can write to RUN_DIR can run code as its owner: submitit executes the pickles under
logs/, and config.yaml holds shell lines (cluster.setup) that every job runs. Run directories
live on shared filesystems whose default permissions often let a whole group write. So:

- a new RUN_DIR is private (mode 700), or with `launch.share_group=G` readable, never
  writable, by group G (mode 2750: new subdirectories inherit the group; the run's processes
  use umask 027, so what they write is group-readable and nothing is group-writable);
- before a run starts or resumes (launch.run, the coordinator) RUN_DIR and what executes code
  in it (config.yaml, run.json, coordinator/, logs/ and the job folders under it) must be
  owned by the user, writable by no one else, and no symbolic link (a link planted there
  would redirect the job pickles elsewhere); otherwise the run is refused with the fix.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path
from typing import List, Optional

from shared.errors import UserError
from shared.rundir import LOGS, TOP_ENTRIES

PRIVATE_MODE = 0o700
SHARED_MODE = 0o2750
# Sluice's own entries of RUN_DIR (shared.rundir.TOP_ENTRIES) are never links; logs/ is
# checked two levels down.


def umask_for(group: Optional[str]) -> int:
    return 0o077 if group is None else 0o027


def apply_umask(group: Optional[str]) -> None:
    """The run's processes create nothing that others (or, when shared, the group) can write.
    Slurm gives submitted jobs the submitter's umask."""
    os.umask(umask_for(group))


def _gid(group: str) -> int:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise UserError(f"config error: launch.share_group={group!r}: no such Unix group. Fix: "
                        "name a group you belong to (see `id -Gn`), or null") from None
    if gid not in os.getgroups() and gid != os.getgid():
        raise UserError(f"config error: launch.share_group={group!r}: you are not a member of "
                        "that group. Fix: name a group you belong to (see `id -Gn`), or null")
    return gid


def create_run_dir(run_dir: Path, group: Optional[str]) -> None:
    """Make RUN_DIR (and missing parents) with the run's permissions."""
    gid = _gid(group) if group else None
    apply_umask(group)
    run_dir.mkdir(parents=True, exist_ok=True)
    if gid is not None:
        os.chown(run_dir, -1, gid)
    os.chmod(run_dir, PRIVATE_MODE if group is None else SHARED_MODE)


def parent_warning(run_dir: Path) -> Optional[str]:
    """A parent directory others may write to without the sticky bit lets them rename RUN_DIR
    away and put their own in its place (the checks here would then refuse to resume it)."""
    for parent in run_dir.parents:
        try:
            st = os.stat(parent)
        except OSError:
            continue
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            return (f"warning: {parent} is writable by everyone without the sticky bit; others "
                    f"could replace {run_dir}. Consider a private parent directory.")
    return None


def _problems(path: Path, uid: int) -> List[str]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    out = []
    if stat.S_ISLNK(st.st_mode):
        out.append(f"{path} is a symbolic link (to {os.readlink(path)}); Sluice never follows links "
                   "inside a run directory. Fix: remove the link (and check who planted it)")
        return out
    if st.st_uid != uid:
        out.append(f"{path} is owned by uid {st.st_uid}, not by you (uid {uid}). Fix: a run "
                   "directory is only resumed by its owner; start a new run")
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        out.append(f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}): anyone who "
                   "can write there can run code as you (submitit executes the job pickles in "
                   f"logs/). Fix: chmod -R go-w {path} and check its contents, or start a new run; "
                   "to let a group read the run, use launch.share_group")
    return out


def check_run_dir(run_dir: Path) -> None:
    """Refuse (UserError) a run directory others could have written code into."""
    uid = os.getuid()
    problems = _problems(run_dir, uid)
    for name in TOP_ENTRIES:
        problems += _problems(run_dir / name, uid)
    logs = run_dir / LOGS
    if logs.is_dir() and not logs.is_symlink():
        for key_dir in logs.iterdir():
            problems += _problems(key_dir, uid)
            if key_dir.is_dir() and not key_dir.is_symlink():
                # Job folders (submitit runs their pickles); links in place of one are refused.
                # submitit's own links to a job's submission script beside them are not run again.
                for job_dir in key_dir.iterdir():
                    if job_dir.is_dir():
                        problems += _problems(job_dir, uid)
    if problems:
        raise UserError(f"run directory {run_dir} is not safe to run: " + "; ".join(problems[:5])
                        + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))

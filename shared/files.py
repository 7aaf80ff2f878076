"""File primitives of the run directory: atomic replacement, directory fsync, JSON files.

Every file Sluice publishes in RUN_DIR is written to a temporary name beside it, fsynced and
renamed over the final name, so a reader sees the old or the new file, never a mix; a
killed writer leaves only a dot-named temporary file.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    """A temporary name beside `final`. Leading dot: never matched as a shard; host and pid:
    verification can say who left it."""
    return final.with_name(f".{final.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def unlink(path: Path) -> bool:
    """Remove `path`; False if it was not there."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix."""
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json_bytes(obj))


def read_json(path: Path, default=None):
    """The JSON in `path`, or `default` if it is missing or not (yet) valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default

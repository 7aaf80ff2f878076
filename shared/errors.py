"""User-facing errors: each names the key (or file), the value, and the fix.

The command-line entry points catch `UserError`, print its message on one line block and exit
with status 2, never a traceback: a traceback is for Sluice's own bugs.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn, Optional


class UserError(Exception):
    """A mistake the user can fix (config, paths, command-line arguments)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(UserError):
    """A config value that cannot work, with the key, the value and the fix."""

    def __init__(self, key: str, value: Any, problem: str, fix: str):
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        shown = "" if value is _NO_VALUE else f"={value!r}"
        super().__init__(f"config error: {key}{shown}: {problem}. Fix: {fix}.")


_NO_VALUE = object()


def config_error(key: str, problem: str, fix: str, value: Any = _NO_VALUE) -> ConfigError:
    return ConfigError(key, value, problem, fix)


def exit_with(err: UserError, prog: Optional[str] = None) -> NoReturn:
    prefix = f"{prog}: " if prog else "sluice: "
    print(prefix + err.message, file=sys.stderr)
    raise SystemExit(err.exit_code)

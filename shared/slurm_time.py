"""Slurm time limits ('D-HH:MM:SS', 'HH:MM:SS', 'MM:SS', 'MM', 'D-HH', 'D-HH:MM') in minutes."""

from __future__ import annotations


def minutes(limit: str) -> int:
    """Whole minutes, rounded up, as sbatch --time reads `limit`."""
    days = 0
    if "-" in limit:
        d, limit = limit.split("-", 1)
        days = int(d)
    parts = [int(p) for p in limit.split(":")]
    if len(parts) == 1:
        h, m, s = (0, parts[0], 0) if not days else (parts[0], 0, 0)
    elif len(parts) == 2:
        h, m, s = (0, parts[0], parts[1]) if not days else (parts[0], parts[1], 0)
    else:
        h, m, s = parts[-3:]
    return days * 1440 + h * 60 + m + (1 if s else 0)

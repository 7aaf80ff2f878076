"""Tools around Sluice that are not part of a run: the local Slurm cluster for development
and CI (local_slurm.py: installs Debian's Slurm packages and starts its daemons)."""

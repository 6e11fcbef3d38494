"""Confinement of worker processes: what a worker may use, and what it may see.

- ``limits``: per-worker resource limits (memory, CPU, tasks, open files) through cgroups,
  with rlimits where no cgroup can be had.

Host-side only: a worker never imports this package.
"""

from __future__ import annotations

__all__: list[str] = []

"""Confining workers: the policy each one runs under and the mechanisms that enforce it.

- ``plan``: ``resolve`` narrows the host's policy by an extension's own; ``prepare`` makes one
  worker's ``Confinement`` from it and what this machine offers (its owner is the ``Worker``).
- ``limits``: resource limits (cgroups, else rlimits) for one worker and its descendants.
- ``bwrap``: bubblewrap's namespaces around a worker, where it can run.
- ``launch``: holds a bwrap sandbox (``--info-fd``, ``--block-fd``) until its processes joined
  the worker's groups.

The rules a worker applies to itself (Landlock, seccomp) live worker-side, in
``pyisolate.workers.confine``.
"""

from __future__ import annotations

from .plan import Confinement, Resolved, offered, prepare, resolve

__all__ = ["Confinement", "Resolved", "offered", "prepare", "resolve"]

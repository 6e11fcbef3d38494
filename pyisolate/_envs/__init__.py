"""Building environments: the extensions' venvs (with uv), the runtime directory every worker
imports pyisolate from, the progress a build reports, and the venvs under a root.

- ``venv``: ``ensure_venv`` builds or reuses one extension's venv, keyed by a fingerprint;
  ``uv`` runs the installer for it, ``wheels`` picks CUDA wheels from an index, and ``locks``
  holds the flock that serialises work on one venv across processes.
- ``runtime``: the directory of links to pyisolate's own code that a worker puts on its path.
- ``progress``: the steps a build reports and the display that draws them.
- ``lines``: splits a child's output into lines as it arrives (uv's, a worker's).
- ``inventory``: list, remove and rebuild the venvs under a root (``pyisolate env``).

Host-side only: a worker never imports this package. The rest of pyisolate uses what this
module names.
"""

from __future__ import annotations

from . import inventory
from .lines import LineSplitter
from .progress import ProgressDisplay, ProgressEvent, ProgressStep
from .runtime import runtime_dir
from .uv import uv_binary
from .venv import ensure_venv

__all__ = [
    "LineSplitter", "ProgressDisplay", "ProgressEvent", "ProgressStep", "ensure_venv",
    "inventory", "runtime_dir", "uv_binary",
]  # fmt: skip

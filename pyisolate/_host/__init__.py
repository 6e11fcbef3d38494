"""The host side: the manager, its handle on each extension, and the worker processes.

- ``manager``: ``ExtensionManager`` owns the loop-bound parts (broker, endpoint, singletons,
  heartbeats) and every extension; ``sync``: ``SyncExtensionManager``, the same from threads.
- ``extension``: ``Extension``, the handle whose attributes are remote methods, ``method()``
  for an extension's own method that the handle's ``name``/``config``/``state``/``stop`` hide,
  and ``LocalBackend`` (``isolated=False``).
- ``worker``: one remote extension's life: venv, launch, readiness, crash and restart. It
  needs of the manager only the ``Host`` interface.
- ``process``: the child process, its pipes and its logs; ``events``: the host's event fan-out.
- ``remote``: a worker on another machine (``ExtensionConfig(remote=True)``) as a process
  stand-in, its bootstrap, and ``remote_worker_command`` (the argv a launcher runs there).
- ``placement``: a worker's process started on a Ray node (``RayPlacement``), held like a child;
  ``ray_runner``: the Ray actor that runs it there (standard library only, sent by value).
- ``stats``: snapshots of what each extension does (``pyisolate.stats``, ``manager.stats()``),
  with ``procinfo`` (a worker's memory and CPU time); ``admin``: the admin endpoint that
  ``pyisolate top``/``stack``/``profile`` attach to.
- ``sandbox``: each worker's confinement (policy, limits, the rules it applies to itself);
  ``sandbox_offered()`` says what this machine can enforce; ``resolve`` and ``prepare`` serve
  ``pyisolate worker`` too, which confines a remote worker on its own machine.

Host-side only: a worker never imports this package.
"""

from __future__ import annotations

from .admin import MAX_ANSWER, SOCKET_NAME, read_frame, write_frame
from .extension import Extension, method
from .manager import ExtensionManager
from .process import WorkerProcess, extension_logger
from .remote import remote_worker_command
from .sandbox import Resolved, prepare, resolve
from .sandbox import offered as sandbox_offered
from .stats import stats
from .sync import SyncExtensionManager

__all__ = [
    "MAX_ANSWER", "SOCKET_NAME", "Extension", "ExtensionManager", "SyncExtensionManager", "WorkerProcess",
    "extension_logger", "method", "read_frame", "remote_worker_command",
    "Resolved", "prepare", "resolve", "sandbox_offered", "stats", "write_frame",
]  # fmt: skip

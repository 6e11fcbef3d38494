"""Snapshots of what each extension does: ``manager.stats()`` and ``pyisolate.stats(ext)``.

A snapshot is made of plain values (dicts, lists, numbers, strings, None), so it prints as
JSON and travels as msgpack (the admin endpoint sends it as is). It only reads: counters the
host's calls keep (``pyisolate._rpc.stats``), the call slots and backlogs of flow control,
the shared-memory layer's byte counts, and the worker's /proc entries (``procinfo``). Reading
copies each container first, so the admin endpoint's thread may take one while the event
loop counts (and while that loop is blocked).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from .._config import ExtensionManagerConfig
from .._rpc import Blocking, CallStats
from .._wire import shm as _shm
from .extension import Extension, LocalBackend
from .procinfo import process_info
from .worker import Worker

if TYPE_CHECKING:
    from pyisolate.broker.router import Broker

    from .._rpc import Endpoint

__all__ = ["Observed", "extension_stats", "manager_stats", "stats"]


class Observed(Protocol):
    """What a snapshot reads of the manager (``ExtensionManager`` is one)."""
    config: ExtensionManagerConfig
    _extensions: dict[str, Worker | LocalBackend]

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def broker(self) -> Broker: ...
    def _host_endpoints(self) -> list[Endpoint]: ...


def stats(extension: Extension | Blocking) -> dict[str, Any]:
    """What extension ``extension`` has done since it was loaded, as plain values.

    Keys: ``name``, ``state``, ``pid`` (its worker's, None while it has none), ``calls`` (calls
    the host made to it that ended), ``errors`` (of those, the ones that raised, by exception
    type name), ``in_flight`` (calls sent and not answered yet), ``queued`` (calls waiting for
    a slot, ``max_in_flight``), ``backlog`` (messages the broker holds until the worker reads),
    ``bytes_out``/``bytes_in`` (message bytes of calls and their answers), ``shm_bytes_out``/
    ``shm_bytes_in`` (bytes of shared-memory segments the host shared with it / it shared with
    the host), ``restarts``, ``reloads``, ``p50``/``p99`` (latency of all its calls, seconds),
    ``methods`` (per method: ``calls``, ``errors``, ``p50``, ``p99``), ``rss``/``pss`` (bytes;
    pss None where the host may not read it), ``cpu_seconds`` (user + system) and ``uptime``
    (seconds since it was loaded). Latencies are rounded up to their histogram bucket (at most
    19% high); None where no call was made.

    A handle of a ``SyncExtensionManager`` works too. Safe to call from any thread.

    Raises:
        TypeError: ``extension`` is not an extension handle.
    """
    if isinstance(extension, Blocking) and isinstance(extension._target, Extension):
        extension = extension._target
    if not isinstance(extension, Extension):
        raise TypeError(f"pyisolate.stats() needs an extension handle (from load_extension), got {extension!r}")
    backend = extension._pyisolate_backend
    backend = getattr(backend, "current", backend)  # an isolated extension's worker serving now
    manager = getattr(backend, "_manager", None)
    return extension_stats(manager, backend)


def extension_stats(manager: Observed | None, backend: object) -> dict[str, Any]:
    """The snapshot of one extension (see ``stats``) run by ``backend`` for ``manager``."""
    if isinstance(backend, LocalBackend):  # runs in the host: no process, no calls through the broker
        local = {"name": backend.name, "state": backend.status, "isolated": False, "pid": os.getpid()}
        return local | (backend.call_stats or CallStats()).snapshot()
    assert isinstance(backend, Worker) and manager is not None
    bname = backend.bname
    process = backend.process
    pid = process.worker_pid() if process is not None else None
    snapshot: dict[str, Any] = {"name": backend.name, "state": backend.status, "isolated": True, "pid": pid}
    snapshot.update(backend.call_stats.snapshot())
    in_flight = queued = 0
    for endpoint in manager._host_endpoints():
        in_flight += endpoint.calls.slots.open(bname)
        queued += endpoint.calls.slots.waiting(bname)
    shm_out, shm_in = _shm.traffic(bname)
    snapshot.update({
        "in_flight": in_flight,
        "queued": queued,
        "backlog": manager.broker.queued(bname),
        "shm_bytes_out": shm_out,
        "shm_bytes_in": shm_in,
        "restarts": backend.restart_count + backend.call_stats.restarts_before,
        "uptime": time.time() - backend.loaded_at,
    })
    snapshot.update(process_info(pid) if pid is not None else {"rss": None, "pss": None, "cpu_seconds": None})
    return snapshot


def manager_stats(manager: Observed) -> dict[str, Any]:
    """``manager.stats()``: the host's pid, whether calls are counted, and each extension's snapshot."""
    backends = list(manager._extensions.values())  # a copy: loads and stops happen on the loop
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "counting": manager.config.stats,
        "extensions": {backend.name: extension_stats(manager, backend) for backend in backends},
    }

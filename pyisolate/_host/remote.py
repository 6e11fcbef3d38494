"""A worker on another machine, as the host sees it: a connection standing in for a process.

``ExtensionConfig(remote=True)`` spawns nothing: the host announces the name to the broker as
remote (it may join only through the CURVE listener, with the key the allowlist binds to it)
and waits for ``pyisolate worker --connect ...`` to join. ``RemoteProcess`` gives the Worker the
same life a spawned process has: its "exit" is the end of its connection, which the host finds
when the broker loses it or when heartbeats stay unanswered for ``heartbeat_timeout`` (a
partition looks the same as a dead machine). Then every call pending on it fails with
``ExtensionCrashedError`` and the restart policy decides, as after any crash: a "restart"
waits for the worker to rejoin (the command rejoins on its own when the network returns).

``remote_worker_command`` is the extension point for launchers (a cluster engine placing the
worker on a node): the argv to run there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import os
from typing import TYPE_CHECKING, Any

import msgpack

from pyisolate.workers.loader import class_spec

from .._curve import CurveConfig, worker_command
from .._limits import FIELDS, Limits
from .._policy import SandboxPolicy
from ..errors import ConfigError

if TYPE_CHECKING:
    from pyisolate.workers.loader import ClassSpec

    from .._config import ExtensionConfig, ExtensionManagerConfig
    from .apptypes import AppTypes

__all__ = ["LOST", "STOPPED", "RemoteProcess", "check_remote", "remote_boot", "remote_worker_command",
           "sandbox_options"]

#: The "exit codes" of a remote worker: it left when asked, or its connection was lost.
STOPPED = 0
LOST = -1000


class RemoteProcess:
    """The part of ``WorkerProcess`` a Worker uses, for a worker on another machine.

    Nothing here signals anything: the other machine's process is out of reach. ``kill`` and
    ``stop`` only end the host's view of it (the broker forgets the connection, so a rejoin is
    a fresh join); the worker, finding the host silent, leaves and rejoins on its own.
    """

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.pid = 0  # the worker's pid on its machine, once it joined (informational)
        self._ended: asyncio.Future[int] = loop.create_future()
        self.how = ""
        #: The last lines of its output where a launch of the host's relays them; None: not here.
        self.output: Callable[[], str] | None = None

    @property
    def returncode(self) -> int | None:
        return self._ended.result() if self._ended.done() else None

    def worker_pid(self) -> int | None:
        """None: no local process to read /proc of or to signal."""
        return None

    def end(self, code: int, how: str = "") -> None:
        """The worker is gone (``how`` says why); idempotent."""
        if not self._ended.done():
            self.how = how
            self._ended.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._ended)

    def kill(self) -> None:
        self.end(LOST, "lost its connection to the host")

    async def stop(self, timeout: float) -> int:
        self.end(STOPPED, "was stopped")
        return await self.wait()

    async def aclose(self) -> None:
        self.end(STOPPED, "was stopped")

    def stderr_tail(self) -> str:
        if self.output is not None:  # a launch of ours relays it (RayPlacement)
            return self.output()
        return "(a remote worker: its output is on its own machine, in the output of `pyisolate worker`)"

    async def dump_stacks(self, timeout: float) -> tuple[str, bool]:
        return "(a remote worker: its stacks cannot be read from this host)", False

    def describe(self, code: int) -> str:
        """Say how it ended, in words (``describe_exit`` for a remote worker)."""
        return self.how or ("left" if code == STOPPED else "lost its connection to the host")


def remote_worker_command(config: ExtensionManagerConfig, name: str, *, connect: str, key_file: str | os.PathLike[str],
                          extension_dir: str | os.PathLike[str], venv_root: str | os.PathLike[str] | None = None,
                          python: str = "python3") -> list[str]:
    """The argv of ``pyisolate worker`` that joins this manager as extension ``name``, to run elsewhere.

    ``connect``: the manager's listener as the other machine reaches it (``manager.listen_endpoint``
    names a local address); ``key_file``, ``extension_dir``, ``venv_root``: paths there. The host's
    public key comes from ``config.curve``, and its sandbox policy and limits (``sandbox_mode``,
    ``sandbox``, ``limits``) become the command's ``--sandbox-*`` and ``--limit`` options: the
    worker is confined by them there (the extension's manifest narrows them, as on the host).
    A launcher (a cluster engine) runs it on the node it picks; the worker then joins like any
    remote worker.

    Raises:
        ValueError: the manager has no ``curve``, or ``name`` is not on its allowlist.
    """
    curve = config.curve
    if not isinstance(curve, CurveConfig):
        raise ValueError("the manager has no CURVE keys (ExtensionManagerConfig.curve): no worker can join it remotely")
    if name not in curve.workers:
        raise ValueError(f"{name!r} is not on the manager's allowlist (CurveConfig.workers)")
    assert isinstance(config.sandbox, SandboxPolicy)  # made one at construction
    return worker_command(name=name, connect=connect, server_key=curve.server.public, key_file=key_file,
                          extension_dir=extension_dir, venv_root=venv_root, python=python,
                          sandbox=sandbox_options(str(config.sandbox_mode), config.sandbox,
                                                  config.limits if isinstance(config.limits, Limits) else None))


def sandbox_options(mode: str, policy: SandboxPolicy, limits: Limits | None = None) -> list[str]:
    """``pyisolate worker``'s options that confine a remote worker by ``mode``, ``policy`` and ``limits``."""
    options = [f"--sandbox-mode={mode}"] + ["--sandbox-network"] * policy.network
    options += [f"--sandbox-read={os.fspath(path)}" for path in policy.readonly_paths]
    options += [f"--sandbox-write={os.fspath(path)}" for path in policy.writable_paths]
    limits = limits or Limits()
    return options + [f"--limit={name}={value}" for name in FIELDS if (value := getattr(limits, name)) is not None]


def check_remote(config: ExtensionConfig, manager: ExtensionManagerConfig) -> None:
    """A remote extension needs the manager's listener and a key bound to its name.

    Raises:
        ConfigError: no ``listen``, or ``curve`` allows no key for this name.
    """
    if manager.listen is None or not isinstance(manager.curve, CurveConfig):
        raise ConfigError(f"extension {config.name!r} has remote=True, but the manager does not listen for remote "
                          "workers; set ExtensionManagerConfig(listen='tcp://0.0.0.0:5555', curve=CurveConfig(...))")
    if config.name not in manager.curve.workers and config.placement is None:  # placed: a key per launch
        raise ConfigError(f"extension {config.name!r} has remote=True, but CurveConfig.workers allows no key for it; "
                          f"make one with `pyisolate keys {config.name}` and add its public key under that name")


def remote_boot(mconfig: ExtensionManagerConfig, config: ExtensionConfig, *, extension_spec: ClassSpec | None,
                app_types: AppTypes | None, singletons: list[bytes]) -> bytes:
    """The bootstrap a remote worker gets in its WELCOME (msgpack), once its key was checked.

    What a local worker's bootstrap holds, less what has no meaning on another machine: no
    launch secret (its key is its identity), no shared-memory session (it shares no memory
    with us), no sandbox or limits (``pyisolate worker`` confines it there, before it joins), no
    host paths. The application's extension class, singleton APIs and types are named by module
    and file, so they must be importable there from the same paths (or be pyisolate's own).
    """
    from .process import extension_logger

    boot: dict[str, Any] = {
        "cuda_ipc": False,
        "extension_class": extension_spec,
        "apis": [class_spec(api) for api in config.apis],
        "types": app_types.reference if app_types else None,
        "host_actors": ["host", *(n.decode() for n in singletons)],
        "handshake_timeout": mconfig.start_timeout,
        "heartbeat_timeout": mconfig.heartbeat_timeout,
        "log_level": extension_logger(config.name).getEffectiveLevel(),
        "tracing": mconfig.tracing,
        "limits": {
            "max_in_flight": mconfig.max_in_flight,
            "max_message_size": mconfig.max_message_size,
            "max_queued_bytes": mconfig.max_queued_bytes,
        },
        "host_paths": [],
    }
    packed: bytes = msgpack.packb(boot, use_bin_type=True)
    return packed

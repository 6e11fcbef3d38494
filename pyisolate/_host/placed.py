"""An extension whose worker the host starts on a Ray node (``ExtensionConfig.placement``).

The host launches ``pyisolate worker --connect ...`` there through ``placement.launch`` and then
treats it like any remote worker: it joins the broker's CURVE listener under the extension's
name. Each launch gets a CURVE key pair of its own, allowed on the listener for that name
while the launch lives and revoked after, so no allowlist entry has to be written and a key
seen on the cluster (argv and environment are visible to its users) is worth nothing once the
launch is gone. The secret half goes in the process's environment, not its argv.

A launch outlives a worker that leaves and rejoins (the command restarts its worker itself);
a restart after a crash launches again only once the launch itself has ended.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .._curve import CurveConfig, worker_command
from ..errors import ConfigError, ExtensionCrashedError
from .remote import sandbox_options
from .sandbox import resolve

if TYPE_CHECKING:
    from .._config import ExtensionConfig, ExtensionManagerConfig
    from .._placement import RayPlacement
    from .placement import RayProcess

__all__ = ["KEY_VARIABLE", "Placed"]

logger = logging.getLogger("pyisolate")

#: The variable that carries a launch's secret key to ``pyisolate worker --key env:...``.
KEY_VARIABLE = "PYISOLATE_WORKER_KEY"


class Placed:
    """The Ray launches of one extension's worker: at most one running, its key, its end."""

    def __init__(self, name: str, placement: RayPlacement, on_end: Callable[[str], None]) -> None:
        self.name = name
        self.placement = placement
        self._on_end = on_end  # told, in words, when a launch ends (the worker it ran is gone)
        self.process: RayProcess | None = None
        self._key: bytes | None = None
        self._listener: Any = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self._watch is not None and not self._watch.done()

    async def ensure(self, manager: ExtensionManagerConfig, config: ExtensionConfig, listener: Any,
                     listen_endpoint: str | None) -> None:
        """Launch the worker on a node unless a launch of it still runs.

        Raises:
            ConfigError: no listener, or no address the nodes could reach it at.
            PlacementError: Ray could not place it (see ``placement.launch``).
        """
        if self.running:
            return
        await self._end_launch()
        curve = manager.curve
        if listener is None or listen_endpoint is None or not isinstance(curve, CurveConfig):
            raise ConfigError(f"extension {self.name!r} has a placement, but the manager does not listen for "
                              "remote workers; set ExtensionManagerConfig(listen=..., curve=CurveConfig(...))")
        public, secret = zmq.curve_keypair()
        listener.allow(public, self.name)
        self._key, self._listener = public, listener
        placement = self.placement
        resolved = resolve(config, manager)  # the host's policy narrowed by the extension's: it holds there too
        argv = worker_command(
            name=self.name, connect=placement.connect or reachable(listen_endpoint),
            server_key=curve.server.public, key_file=f"env:{KEY_VARIABLE}",
            extension_dir=config.module_path, venv_root=placement.venv_root or manager.venv_root,
            python=placement.python or sys.executable, sandbox=sandbox_options(resolved.mode, resolved.policy,
                                                                           resolved.limits))
        from .placement import launch

        self.process = process = await launch(placement, argv, {KEY_VARIABLE: secret.decode()}, name=self.name)
        self._watch = asyncio.get_running_loop().create_task(self._watch_end(process),
                                                             name=f"pyisolate-placed-{self.name}")

    async def _watch_end(self, process: RayProcess) -> None:
        try:
            code = await process.wait()
            how = f"ended with its Ray launch: the command on node {process.node_ip} exited with code {code}"
        except ExtensionCrashedError as exc:
            how = f"ended with its Ray launch: {exc}"
        self._on_end(how)

    def stderr_tail(self) -> str:
        """The last lines the current (or last) launch wrote to stderr."""
        return self.process.stderr_tail() if self.process is not None else ""

    async def _end_launch(self, grace: float = 0.0) -> None:
        """End the current launch (if any) and revoke its key."""
        process, self.process = self.process, None
        if process is not None:
            if grace and process.returncode is None:
                await process.stop(grace)
            await process.aclose()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self._key is not None:
            self._listener.revoke(self._key)
            self._key = None

    async def close(self, grace: float) -> None:
        """The extension is gone: end its launch (SIGTERM, SIGKILL after ``grace``), revoke its key."""
        await self._end_launch(grace)


def reachable(listen_endpoint: str) -> str:
    """The listener's endpoint as other machines reach it: a wildcard address (``0.0.0.0``, ``*``)
    becomes this machine's own address."""
    address, _, port = listen_endpoint.removeprefix("tcp://").rpartition(":")
    if address in ("0.0.0.0", "*", "[::]", "::"):
        address = socket.gethostbyname(socket.gethostname())
    return f"tcp://{address}:{port}"

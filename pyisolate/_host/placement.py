"""Start a worker's process on a Ray node (``RayPlacement``) and hold it like a local child.

The host process is the Ray driver: ``launch`` joins the running cluster (``ray.init``, once,
never starting a cluster), then starts one actor (``ray_runner.Runner``) with the placement's
resources, whose only job is to run the argv as a subprocess on its node. ``RayProcess`` is
the host's handle on it, shaped like ``WorkerProcess`` where the worker needs it: ``wait()``
for the exit code, ``stop()`` (SIGTERM, then SIGKILL after a grace period, then the actor
ends), ``stderr_tail()``, ``aclose()``.

What goes through Ray: the runner's code, the argv and environment strings, the output lines
and the exit code. The worker talks to the host over the broker's tcp endpoint, never Ray.

Failures are typed: a cluster that cannot be reached or a request no node takes within
``start_timeout`` raise ``PlacementError``; once started, the actor or its node dying makes
``wait()`` raise ``ExtensionCrashedError`` (a crash like any other).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .._placement import RAY_EXTRA, RayPlacement
from ..errors import ConfigError, ExtensionCrashedError, PlacementError
from . import ray_runner

__all__ = ["RayProcess", "disconnect", "launch"]

logger = logging.getLogger(__name__)

#: Seconds the end of a process waits for the rest of its output to be relayed.
_RELAY_GRACE = 2.0
#: stderr lines kept for the error that reports a crash.
_TAIL = 50
#: Seconds the actor may take to answer ``stop`` beyond the grace period it was given.
_STOP_SLACK = 10.0
#: Seconds to wait for a cluster's GCS port to accept a connection before ray.init is tried.
_PROBE_TIMEOUT = 5.0

_lock = threading.Lock()
_connected_by_us = False
_runner_class: Any = None


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"RayPlacement needs Ray, which cannot be imported ({exc}); {RAY_EXTRA}") from exc
    return ray


def _connect(address: str | None) -> Any:
    """Join the cluster at ``address`` once per process; return the ray module and the runner class."""
    global _connected_by_us, _runner_class
    ray = _ray()
    with _lock:
        if not ray.is_initialized():
            target = address or os.environ.get("RAY_ADDRESS") or "auto"
            _probe(target)
            try:
                ray.init(address=target, log_to_driver=False, configure_logging=False)
            except Exception as exc:  # ConnectionError, ValueError (bad address), RuntimeError, ...
                raise PlacementError(
                    f"cannot connect to the Ray cluster at {target!r} ({type(exc).__name__}: {exc}); start one with "
                    "`ray start --head` or give RayPlacement(address=...) (pyisolate never starts one itself)",
                    extension="") from exc
            _connected_by_us = True
        if _runner_class is None:
            # Travels by value: the node needs no pyisolate to run it (see ray_runner).
            ray.cloudpickle.register_pickle_by_value(ray_runner)
            _runner_class = ray.remote(max_restarts=0, max_task_retries=0)(ray_runner.Runner)
        return ray, _runner_class


def _probe(address: str) -> None:
    """Fail at once where a ``HOST:PORT`` address has nothing listening: ``ray.init`` would retry
    for minutes, in a thread nobody can cancel. ("auto" and "ray://" are left to Ray.)"""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_TIMEOUT).close()
    except OSError as exc:
        raise PlacementError(
            f"cannot connect to the Ray cluster at {address!r} ({exc}); start one with `ray start --head` or give "
            "RayPlacement(address=...) the address of a running head (pyisolate never starts one itself)",
            extension="") from exc


def disconnect() -> None:
    """Leave the Ray cluster if ``launch`` joined it (a connection the host made itself stays)."""
    global _connected_by_us
    with _lock:
        if _connected_by_us:
            import ray

            ray.shutdown()
            _connected_by_us = False


async def _get(ref: Any) -> Any:
    """Await a Ray object ref without blocking the loop (its result arrives on Ray's thread)."""
    return await asyncio.wrap_future(ref.future())


async def launch(placement: RayPlacement, argv: Sequence[str], env: Mapping[str, str], *, name: str) -> RayProcess:
    """Run ``argv`` on a node of the placement's cluster that has its resources.

    Args:
        placement: The cluster, the resources, the extra environment and the start timeout.
        argv: The command, run as is on the node (its paths are the node's).
        env: Variables for the process, over the node's environment and ``placement.env``.
        name: The extension's name, for messages and the logger its output goes to.

    Raises:
        ConfigError: Ray is not installed (names the extra).
        PlacementError: the cluster cannot be reached, or no node took the request within
            ``placement.start_timeout`` (the message says what the nodes offer), or the
            process could not be started there.
    """
    ray, runner_class = await asyncio.to_thread(_connect, placement.address)
    actor = runner_class.options(**placement.actor_options()).remote()
    ref = actor.start.remote(list(argv), {**placement.env, **env})
    try:
        async with asyncio.timeout(placement.start_timeout):
            started = await _get(ref)
    except TimeoutError:
        await asyncio.to_thread(ray.kill, actor)
        offered = await asyncio.to_thread(_offered, ray)
        raise PlacementError(
            f"no node of the Ray cluster took extension {name!r} ({placement.describe()}) within "
            f"{placement.start_timeout:g} s (RayPlacement.start_timeout); the live nodes offer: {offered}",
            extension=name) from None
    except BaseException as exc:
        await asyncio.shield(asyncio.to_thread(ray.kill, actor))
        if isinstance(exc, ray.exceptions.RayError):
            raise PlacementError(f"Ray could not start extension {name!r}: {_first_line(exc)}", extension=name) from exc
        raise
    return RayProcess(name, ray, actor, started)


def _offered(ray: Any) -> str:
    """Each live node's total resources, in words (Ray's internal node: and object store ones left out)."""
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = {k: v for k, v in node.get("Resources", {}).items()
                if not k.startswith("node:") and k != "object_store_memory"}
        words = [f"{k}={v / 2**30:.1f}GiB" if k == "memory" else f"{k}={v:g}" for k, v in sorted(have.items())]
        nodes.append(f"{node.get('NodeManagerAddress')} ({', '.join(words)})")
    return "; ".join(nodes) or "none (no live node)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class RayProcess:
    """The host's handle on a worker process that a Ray actor runs on some node.

    Attributes:
        name: The extension's name.
        node_id: The Ray node it runs on (hex), and ``node_ip`` that node's address.
        pid: The worker's pid on that node.
        runner_pid: The pid of the Ray worker process that holds the actor, on that node.
    """

    def __init__(self, name: str, ray: Any, actor: Any, started: Mapping[str, Any]) -> None:
        self.name = name
        self.node_id: str = str(started["node_id"])
        self.node_ip: str = str(started["node_ip"])
        self.pid: int = int(started["pid"])
        self.runner_pid: int = int(started["runner_pid"])
        self._ray = ray
        self._actor = actor
        self._closed = False
        self._returncode: int | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
        from .process import extension_logger

        self._logger = extension_logger(name)
        self._pump = asyncio.create_task(self._relay(), name=f"pyisolate-ray-output-{name}")
        self._exit = asyncio.create_task(self._wait_exit(), name=f"pyisolate-ray-exit-{name}")
        logger.debug("extension %r runs on Ray node %s (%s), pid %d", name, self.node_id, self.node_ip, self.pid)

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has ended and the host knows it, else None."""
        return self._returncode

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr (as far as they reached the host)."""
        return "\n".join(self._tail)

    async def wait(self) -> int:
        """The exit code once the process has ended.

        Raises:
            ExtensionCrashedError: the actor or its node died (the process died with it).
        """
        return await asyncio.shield(self._exit)

    async def _wait_exit(self) -> int:
        try:
            code = int(await _get(self._actor.wait.remote()))
        except self._ray.exceptions.RayError as exc:
            # Its output may still be on the way: the tail says what it had written.
            await asyncio.wait([self._pump], timeout=_RELAY_GRACE)
            raise ExtensionCrashedError(
                f"extension {self.name!r} was lost with its Ray actor on node {self.node_ip} ({self.node_id[:12]}): "
                f"{_first_line(exc)}", extension=self.name, exit_code=None, stderr_tail=self.stderr_tail()) from exc
        # What it wrote before it ended is relayed before its end is told (bounded: a descendant
        # that kept the pipes open would hold them).
        await asyncio.wait([self._pump], timeout=_RELAY_GRACE)
        self._returncode = code
        return code

    async def _relay(self) -> None:
        """Hand each line the process writes to the extension's logger, as a local worker's."""
        while True:
            try:
                batch = await _get(self._actor.lines.remote())
            except self._ray.exceptions.RayError:
                return  # the actor is gone; _wait_exit says how
            if batch is None:
                return
            for stream, line in batch:
                if stream == "stderr":
                    self._tail.append(line)
                    self._logger.warning(line, extra={"extension": self.name, "stream": "stderr"})
                else:
                    self._logger.info(line, extra={"extension": self.name, "stream": "stdout"})

    async def stop(self, grace: float) -> int | None:
        """SIGTERM the process, SIGKILL it (and its session) after ``grace`` s, then end the actor.

        Returns the exit code, or None where the actor or its node was already gone.
        """
        code: int | None = None
        try:
            async with asyncio.timeout(grace + _STOP_SLACK):
                code = int(await _get(self._actor.stop.remote(grace)))
        except (TimeoutError, self._ray.exceptions.RayError) as exc:
            logger.warning("extension %r: its Ray actor did not confirm the stop (%s); ending the actor",
                           self.name, _first_line(exc))
        await self.aclose()
        return code

    def kill(self) -> None:
        """End the actor now; the kernel SIGKILLs the process with it (PR_SET_PDEATHSIG)."""
        self._ray.kill(self._actor, no_restart=True)

    async def aclose(self) -> None:
        """End the actor (and so the process) and the relay of its output; idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self.kill)
        for task in (self._pump, self._exit):
            if not task.done():
                try:
                    async with asyncio.timeout(_STOP_SLACK):
                        await asyncio.wait([task])
                except TimeoutError:
                    task.cancel()
                    await asyncio.wait([task])
        if self._exit.done() and not self._exit.cancelled():
            self._exit.exception()  # retrieved: the owner may never have awaited it

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if not getattr(self, "_closed", True):
            _warn(f"RayProcess of extension {self.name!r} was not closed", ResourceWarning, stacklevel=2)

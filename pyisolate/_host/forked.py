"""A worker forked by the fork server, shaped like the ``asyncio.subprocess.Process`` of a spawned one.

``WorkerProcess`` holds either; what differs is how the host learns the exit status: the
fork server, the worker's parent, reaps it and reports the status (``ForkServer`` sets the
future this object waits on). A worker whose fork server has gone is reaped by init instead,
and its status is lost: ``STATUS_UNKNOWN`` then stands for it, once it has exited.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Protocol

__all__ = ["STATUS_UNKNOWN", "ForkedProcess", "Forker"]

#: The exit status of a forked worker that exited after its fork server was gone (nobody could
#: tell the host how it ended). Reads as "exited with code 255".
STATUS_UNKNOWN = 255


class _Stdin:
    """The host's end of the worker's stdin pipe (it carries nothing; its end of file says the host is gone)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ForkedProcess:
    """A forked worker: its pid, pidfd, pipes, and the exit status its fork server reports."""

    def __init__(self, pid: int, pidfd: int, stdin: int, stdout: asyncio.StreamReader, stderr: asyncio.StreamReader,
                 transports: list[asyncio.BaseTransport], status: asyncio.Future[int]) -> None:
        """Own ``pidfd`` (handed on by ``take_pidfd``), the ``stdin`` descriptor and the readers' ``transports``."""
        self.pid = pid
        self.stdin = _Stdin(stdin)
        self.stdout = stdout
        self.stderr = stderr
        self._pidfd: int | None = pidfd
        self._transports = transports
        self._status = status

    @property
    def returncode(self) -> int | None:
        """The exit status once reported (negative: killed by that signal), else None."""
        return self._status.result() if self._status.done() and not self._status.cancelled() else None

    async def wait(self) -> int:
        """Wait for the exit status."""
        return await asyncio.shield(self._status)

    def take_pidfd(self) -> int:
        """Hand the pidfd to the caller, who closes it (``WorkerProcess``)."""
        assert self._pidfd is not None
        pidfd, self._pidfd = self._pidfd, None
        return pidfd

    def send_signal(self, sig: signal.Signals) -> None:
        """Unused while ``WorkerProcess`` holds the pidfd (it signals through it)."""
        raise ProcessLookupError(f"a forked worker is signalled through its pidfd, not {sig.name} by pid")

    def close_pipes(self) -> None:
        """Close the host's ends of the pipes (and the pidfd, if never taken); idempotent."""
        self.stdin.close()
        for transport in self._transports:
            transport.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class Forker(Protocol):
    """What forks a worker (``ForkServer``), as ``WorkerProcess.spawn`` uses it."""

    async def fork(self, name: str, python: Path, env: dict[str, str], channel: int) -> ForkedProcess | None:
        """Fork a worker for ``python``'s venv with ``env`` and control channel ``channel``; None: spawn it."""
        ...

"""Holding a bubblewrap sandbox until the host is ready for its worker to run.

``WorkerProcess.spawn`` starts bwrap with ``Launch.prefix()``; the host reads the sandbox's
pid 1 from ``--info-fd`` (on the event loop), joins it to the worker's resource groups, then
``release()``s it through ``--block-fd`` so the worker starts inside them.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence

from pyisolate.workers import tree

from ...errors import ExtensionLoadError

__all__ = ["Launch", "SandboxFailed"]

#: How long bwrap may take to build a sandbox and report its pid 1 (it takes a few ms).
_SANDBOX_TIMEOUT = 30.0


class SandboxFailed(Exception):
    """bwrap ended before it reported the sandbox's pid 1."""


class Launch:
    """The pipes through which the host holds a bwrap sandbox until the worker may start.

    ``--info-fd``: bwrap writes the sandbox's pid 1 on it, then closes it, once the namespaces
    are built. ``--block-fd``: pid 1 waits for a byte on it before it starts the worker. The
    host's ends are this object's; ``close()`` closes whatever is left of them.
    """

    def __init__(self, name: str, sandbox: Sequence[str]) -> None:
        self._name = name
        if not sandbox or sandbox[-1] != "--":
            raise ValueError(f"a bwrap argv prefix ends in '--', not {list(sandbox[-1:])!r}")
        self._sandbox = list(sandbox)
        self._fds: dict[str, int] = {}
        try:
            self._fds["info_r"], self._fds["info_w"] = os.pipe()
            self._fds["block_r"], self._fds["block_w"] = os.pipe()
        except BaseException:
            self.close()
            raise
        os.set_blocking(self._fds["info_r"], False)  # read on the event loop

    def prefix(self) -> list[str]:
        """bwrap's argv, told the descriptors it inherits (``passed``), ending in ``--``."""
        return [*self._sandbox[:-1], "--info-fd", str(self._fds["info_w"]), "--block-fd", str(self._fds["block_r"]),
                "--"]  # fmt: skip

    def passed(self) -> tuple[int, int]:
        """The descriptors bwrap inherits."""
        return self._fds["info_w"], self._fds["block_r"]

    def started(self) -> None:
        """bwrap runs (or failed to): close our copies of its ends, so that its exit ends the info."""
        self._close("info_w", "block_r")

    async def init(self, monitor: int) -> tuple[int, int] | None:
        """Wait for bwrap's info; return the sandbox's pid 1 and a pidfd of it, or None if it failed first.

        Raises:
            ExtensionLoadError: bwrap said nothing within ``_SANDBOX_TIMEOUT``.
        """
        loop = asyncio.get_running_loop()
        fd = self._fds["info_r"]
        done: asyncio.Future[None] = loop.create_future()
        data = bytearray()

        def on_readable() -> None:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                return
            except OSError as exc:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_exception(exc)
                return
            data.extend(chunk)
            if not chunk or len(data) > 65536:  # end of file; or not bwrap's few lines of JSON
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)

        loop.add_reader(fd, on_readable)
        try:
            async with asyncio.timeout(_SANDBOX_TIMEOUT):
                await done
        except TimeoutError:
            raise ExtensionLoadError(f"cannot start extension {self._name!r}: bwrap did not build its sandbox within "
                                     f"{_SANDBOX_TIMEOUT:.0f} s", extension=self._name) from None
        finally:
            loop.remove_reader(fd)
        if not data.strip():
            return None
        try:
            pid = json.loads(bytes(data))["child-pid"]
        except (ValueError, KeyError, TypeError):
            pid = None
        if type(pid) is not int:
            raise ExtensionLoadError(f"cannot start extension {self._name!r}: bwrap's --info-fd report has no "
                                     f"integer child-pid: {bytes(data[:200])!r}", extension=self._name)
        pidfd = tree.open_pidfd(pid)
        # Checked after the pidfd is opened, and alive after the check: the monitor's own child.
        if pidfd is None or tree.parent_of(pid) != monitor or tree.exited(pidfd):
            if pidfd is not None:
                os.close(pidfd)
            return None
        return pid, pidfd

    def release(self) -> None:
        """Let the sandbox start the worker."""
        try:
            os.write(self._fds["block_w"], b"x")
        except BrokenPipeError:
            pass  # bwrap is gone already: its exit is reported like the worker's
        self._close("block_w")

    def close(self) -> None:
        """Close the host's ends (idempotent); kill a sandbox still held first: it would start the worker."""
        self._close(*self._fds)

    def _close(self, *names: str) -> None:
        for name in names:
            fd = self._fds.pop(name, None)
            if fd is not None:
                os.close(fd)

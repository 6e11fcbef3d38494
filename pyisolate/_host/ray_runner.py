"""The Ray actor that runs one worker process on a node: start it, relay its output, report its end.

This module travels to the node by value (cloudpickle's ``register_pickle_by_value``), so the
node's Ray environment needs nothing of pyisolate to run it: it imports only the standard
library and, inside methods, ``ray`` itself. What crosses Ray is strings and ints: the argv and
environment going in; the node, pids, output lines and exit code coming back.

The process is started through a small shim that asks the kernel to SIGKILL it when the
actor's thread that started it ends (PR_SET_PDEATHSIG) and then execs the argv: so the worker
cannot outlive its actor, whether the actor is killed by ``ray.kill`` or its node goes down.
It runs in a session of its own, so that ``stop`` can end what it started too.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
from typing import Any

#: Lines kept for the host to fetch; older ones are dropped (and counted) when it falls behind.
MAX_LINES = 10_000
#: A longer line is cut here (the rest is dropped, not split into more lines).
MAX_LINE = 16 * 1024
#: Lines one ``lines()`` call returns at most.
BATCH = 1000

#: argv[1] is the pid the shim's parent must have (else the parent is already gone: exit at
#: once); argv[2:] is the command. 127 as a shell says "command not found".
SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(137)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as exc:\n"
    "    print(f'pyisolate: cannot run {sys.argv[2]!r}: {exc}', file=sys.stderr, flush=True)\n"
    "    os._exit(127)\n"
)


def node_environment(env: dict[str, str]) -> dict[str, str]:
    """This node's environment less Ray's own variables, with ``env`` over it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYLET_"))}
    base.update(env)
    return base


class Runner:
    """One worker process on this node; every method is a coroutine on the actor's one loop."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lines: collections.deque[tuple[str, str]] = collections.deque()
        self._dropped = 0
        self._readers: list[asyncio.Task[None]] = []
        self._changed: asyncio.Event | None = None

    async def start(self, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
        """Start ``argv`` with ``env`` over the node's environment; say where it runs."""
        import ray

        if self._proc is not None:
            raise RuntimeError("this runner already started its process")
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv must be a non-empty list of strings, got {argv!r}")
        self._changed = asyncio.Event()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SHIM, str(os.getpid()), *argv,
            stdin=asyncio.subprocess.PIPE,  # never written: EOF only when this actor is gone
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=node_environment(env), start_new_session=True,
        )  # fmt: skip
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [asyncio.create_task(self._read("stdout", self._proc.stdout)),
                         asyncio.create_task(self._read("stderr", self._proc.stderr))]
        context = ray.get_runtime_context()
        return {"pid": self._proc.pid, "runner_pid": os.getpid(), "node_id": context.get_node_id(),
                "node_ip": getattr(ray.util, "get_node_ip_address")()}  # untyped in Ray

    async def _read(self, stream: str, reader: asyncio.StreamReader) -> None:
        assert self._changed is not None
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    line = exc.partial
                except asyncio.LimitOverrunError as exc:  # a long line: keep its start, skip the rest
                    line = await reader.readexactly(exc.consumed)
                    while True:
                        try:
                            await reader.readuntil(b"\n")
                            break
                        except asyncio.LimitOverrunError as more:
                            await reader.readexactly(more.consumed)
                        except asyncio.IncompleteReadError:
                            break
                if not line:
                    return
                if len(self._lines) >= MAX_LINES:
                    self._lines.popleft()
                    self._dropped += 1
                text = line[:MAX_LINE].decode("utf-8", "replace").rstrip("\n")
                self._lines.append((stream, text))
                self._changed.set()
        finally:
            self._changed.set()

    async def lines(self) -> list[list[str]] | None:
        """The next lines of output, waiting for one; None once the process ended and all were read."""
        assert self._changed is not None
        while not self._lines and not all(r.done() for r in self._readers):
            self._changed.clear()
            await self._changed.wait()
        if not self._lines and self._dropped == 0:
            return None
        batch = []
        if self._dropped:
            batch.append(["stderr", f"pyisolate: {self._dropped} lines of output dropped (the host fell behind)"])
            self._dropped = 0
        while self._lines and len(batch) < BATCH:
            stream, text = self._lines.popleft()
            batch.append([stream, text])
        return batch

    async def wait(self) -> int:
        """The process's exit code once it has ended (negative: killed by that signal)."""
        assert self._proc is not None
        code = await self._proc.wait()
        self._kill_session(self._proc.pid)  # what it left in its session would be orphans on the node
        return code

    async def stop(self, grace: float) -> int:
        """SIGTERM the process, SIGKILL its session after ``grace`` seconds; its exit code."""
        proc = self._proc
        assert proc is not None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
            except TimeoutError:
                pass
        self._kill_session(proc.pid)
        return await proc.wait()

    @staticmethod
    def _kill_session(pid: int) -> None:
        """SIGKILL what is left in the process's session (its descendants that stayed in it)."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

"""Start a worker process, follow its stderr, and stop it with a bounded ladder."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["WorkerProcess"]

logger = logging.getLogger(__name__)

#: The child's first code: put the host's runtime (pyisolate, zmq, msgpack) at the END of
#: sys.path, after the venv's own site-packages, then run the worker. ``-I`` keeps out
#: PYTHONPATH, user site-packages and the current directory.
_BOOTSTRAP = (
    "import sys; sys.path.append(sys.argv.pop(1)); "
    "from pyisolate.workers.__main__ import main; main()"
)
# A worker gets a clean environment: these host variables, and those its config names.
_PASSED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "SHELL"})
_PASSED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "XDG_")
_TAIL_LINES = 40


class WorkerProcess:
    """One worker process. Owns the process, its pipes and the task that reads its stderr."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self._proc = proc
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        assert proc.stderr is not None
        self._reader = asyncio.get_running_loop().create_task(self._follow(proc.stderr))

    @classmethod
    async def spawn(cls, *, name: str, python: Path, runtime: Path, boot: dict[str, Any],
                    pass_env: tuple[str, ...] = (), env: dict[str, str] | None = None) -> WorkerProcess:
        """Start ``python`` as a worker and hand it ``boot`` on its stdin.

        The worker's environment holds only locale, home, temp-dir and accelerator variables of
        the host, the host variables named in ``pass_env``, and ``env``: no secrets by default.
        """
        venv = python.parent.parent
        env = {
            k: v for k, v in os.environ.items()
            if k in _PASSED or k.startswith(_PASSED_PREFIXES) or k in pass_env
        } | (env or {})
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
        proc = await asyncio.create_subprocess_exec(
            str(python), "-I", "-c", _BOOTSTRAP, str(runtime),
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            # Our own session: a Ctrl-C in the terminal reaches the host, which stops us in order.
            start_new_session=True,
        )
        assert proc.stdin is not None
        # The pipe stays open for the worker's life: its end-of-file tells the worker the host is gone.
        proc.stdin.write(json.dumps(boot).encode() + b"\n")
        logger.debug("started worker %r (pid %d)", name, proc.pid)
        return cls(name, proc)

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit status (negative: killed by that signal), or None while running."""
        return self._proc.returncode

    def stderr_tail(self) -> str:
        """The last lines the worker wrote to stderr."""
        return "\n".join(self._tail)

    async def wait(self) -> int:
        """Wait for exit and for the last of its stderr; return the exit status."""
        code = await self._proc.wait()
        try:
            async with asyncio.timeout(1.0):  # a grandchild may hold the pipe open
                await asyncio.shield(self._reader)
        except TimeoutError:
            pass
        return code

    async def stop(self, timeout: float) -> int:
        """Wait up to ``timeout`` for a requested exit, then SIGTERM, then SIGKILL."""
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self._proc.returncode is None:
                logger.debug("sending %s to worker %r", sig.name, self.name)
                self._signal(sig)
            try:
                async with asyncio.timeout(timeout):
                    return await self.wait()
            except TimeoutError:
                continue
        return await self.wait()  # SIGKILL cannot be ignored

    def kill(self) -> None:
        """SIGKILL the worker now (its exit is reported by whoever waits on it)."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            self._proc.send_signal(sig)
        except ProcessLookupError:
            pass

    async def aclose(self) -> None:
        """Kill the worker if it still runs, reap it and close its pipes; idempotent."""
        if self._proc.returncode is None:
            self._signal(signal.SIGKILL)
        await self._proc.wait()
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        if not self._reader.done():
            self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _follow(self, stream: asyncio.StreamReader) -> None:
        """Copy the worker's stderr to ours, each line tagged with its name; keep a tail."""
        prefix = f"[{self.name}] "
        pending = b""
        while chunk := await stream.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            self._emit(prefix, lines)
        if pending:
            self._emit(prefix, [pending])

    def _emit(self, prefix: str, lines: list[bytes]) -> None:
        out = sys.stderr
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            self._tail.append(line)
            out.write(prefix + line + "\n")
        out.flush()

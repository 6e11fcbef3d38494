"""Running uv, the installer every venv is built with: its binary, its command lines, and one run
of it whose output is read line by line and whose failure names the packages at fault."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.metadata
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..errors import EnvironmentBuildError
from .lines import LineSplitter

__all__ = ["install_command", "packages_at_fault", "run_uv", "uv_binary", "uv_version"]

_log = logging.getLogger(__name__)

_DROPPED_ENV_VARS = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
_TAIL_LINES = 40
_KEPT_LINES = 400  # of uv's output, searched for the packages at fault when it fails


@functools.cache
def uv_binary() -> str:
    """Return the path of the uv binary shipped by the ``uv`` package (no uv on PATH needed).

    Looked up once per process (a few dozen stats, so in a thread), under a lock: the lookup
    reads ``sysconfig``, whose first use is not safe in two threads at once (Python < 3.13).

    Returns:
        The absolute path of the uv executable.

    Raises:
        FileNotFoundError: the ``uv`` package or its binary is missing.
    """
    with _finding:
        if not _found:
            try:
                from uv import find_uv_bin
            except ImportError as exc:
                raise FileNotFoundError("the 'uv' package is not installed; pip install uv") from exc
            _found.append(str(find_uv_bin()))
        return _found[0]


_found: list[str] = []
_finding = threading.Lock()


@functools.cache
def uv_version() -> str:
    # From metadata, not `uv --version`: reusing a venv must start no subprocess at all.
    return importlib.metadata.version("uv")


def install_command(
    python: Path, deps: Sequence[str], excludes: Path | None, *, options: Sequence[str] = (), no_deps: bool = False
) -> list[str]:
    # Plain lines, parsed as they come: no colour codes, whatever the environment asks for.
    command = [uv_binary(), "pip", "install", "--python", str(python), "--no-config", "--color", "never"]
    if no_deps:
        command.append("--no-deps")
    command += options
    if excludes is not None:
        command += ["--excludes", str(excludes)]
    return [*command, *deps]


def packages_at_fault(deps: Sequence[str], output: str) -> list[str]:
    """Return the dependencies uv's output names, or all of them if it names none."""
    at_fault = []
    for spec in deps:
        try:
            name = Requirement(spec).name
            names = {name, canonicalize_name(name)}
        except InvalidRequirement:
            names = {spec}  # a local path
        patterns = (rf"(?<![\w.-]){re.escape(n)}(?![\w-])" for n in names)
        if any(re.search(p, output, re.IGNORECASE) for p in patterns):
            at_fault.append(spec)
    return at_fault or list(deps)


async def run_uv(
    command: list[str], *, name: str, deps: Sequence[str], on_start: Callable[[], None],
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run uv in its own process group, raising EnvironmentBuildError if it fails.

    Each line uv prints goes to ``on_line`` as it arrives. On cancellation (or any error while
    it runs, ``on_line``'s included) the whole group is killed and reaped.
    """
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV_VARS}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            process_group=0,  # a kill then also reaches whatever uv started (sdist builds)
        )
    except OSError as exc:
        raise EnvironmentBuildError(
            f"cannot run uv for extension {name!r}: {exc}",
            extension=name, packages=[], output_tail="",
        ) from exc  # fmt: skip
    assert proc.stdout is not None
    kept: collections.deque[str] = collections.deque(maxlen=_KEPT_LINES)
    splitter = LineSplitter()
    try:
        on_start()
        while chunk := await proc.stdout.read(65536):
            for line in splitter.feed(chunk):
                kept.append(line)
                if on_line is not None:
                    on_line(line)
        kept.extend(splitter.flush())
        await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.communicate()  # drain and reap: no zombie, no unclosed pipe transport
        _log.debug("killed uv (pid %d) building %s", proc.pid, name)
        raise
    if proc.returncode == 0:
        return
    output = "\n".join(kept)
    tail = "\n".join(list(kept)[-_TAIL_LINES:])
    if deps:
        packages = packages_at_fault(deps, output)
        what = f"uv could not install {', '.join(packages)}"
    else:
        packages, what = [], "uv could not create the venv"
    _log.warning("building venv of %s failed (uv exit code %s)", name, proc.returncode)
    raise EnvironmentBuildError(
        f"cannot build the environment of extension {name!r}: {what} "
        f"(uv exit code {proc.returncode})",
        extension=name, packages=packages, output_tail=tail,
    )  # fmt: skip

"""Host death, blocked loops, and errors that reach the caller from environment builds."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pyisolate import (
    EnvironmentBuildError,
    ExtensionBase,
    ExtensionConfig,
    ExtensionManager,
    ExtensionManagerConfig,
)
from tests.support import ext, ipc_dirs

HOST_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import pyisolate

    async def main():
        manager = pyisolate.ExtensionManager(
            pyisolate.ExtensionBase, pyisolate.ExtensionManagerConfig(venv_root_path=sys.argv[1]))
        extension = await manager.load_extension(
            pyisolate.ExtensionConfig(name="ok", module_path=sys.argv[2]))
        print(await extension.pid(), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait on a pidfd (works for processes that are not our children)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(fd, exited.set)
    try:
        async with asyncio.timeout(timeout):
            await exited.wait()
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_workers_exit_when_the_host_is_killed(venv_root, tmp_path):
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    before = ipc_dirs()
    host = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(venv_root), ext("ok"), stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(120):
            worker_pid = int(await host.stdout.readline())
        host.send_signal(signal.SIGKILL)
        async with asyncio.timeout(30):
            await host.wait()
        assert await wait_for_exit(worker_pid, timeout=10), "worker outlived its SIGKILLed host"
    finally:
        if host.returncode is None:
            host.kill()
        async with asyncio.timeout(30):
            await host.communicate()  # EOF once the worker, which shares the pipe, is gone too
        for leftover in ipc_dirs() - before:  # a SIGKILLed host cannot clean up; the next one sweeps
            shutil.rmtree(leftover, ignore_errors=True)


async def test_stale_ipc_directory_of_a_dead_host_is_swept(venv_root, tmp_path):
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    async with asyncio.timeout(30):
        await dead.wait()
    import tempfile

    stale = Path(tempfile.gettempdir()) / f"pyisolate-{dead.pid}-abc123"
    stale.mkdir()
    from pyisolate.broker.router import Broker

    broker = Broker(block_warning=None)
    broker.close()
    assert not stale.exists()


async def test_blocked_event_loop_is_logged_with_what_blocked_it(venv_root):
    seen = threading.Event()
    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "event loop blocked" in record.getMessage():
                messages.append(record.getMessage())
                seen.set()

    handler = Catch()
    logging.getLogger("pyisolate.broker").addHandler(handler)
    config = ExtensionManagerConfig(venv_root_path=venv_root, loop_block_warning=0.2)
    try:
        async with ExtensionManager(ExtensionBase, config) as manager:
            await manager.load_extension(ExtensionConfig(name="inproc", module_path=ext("plain"), isolated=False))

            def block_the_loop_right_here() -> None:
                seen.wait(30)  # the loop is blocked until the watchdog reports it

            block_the_loop_right_here()
    finally:
        logging.getLogger("pyisolate.broker").removeHandler(handler)
        sys.modules.pop("plain", None)
    assert seen.is_set()
    assert "block_the_loop_right_here" in messages[0]


async def test_uv_failure_names_the_package_and_carries_uv_output(venv_root):
    config = ExtensionManagerConfig(venv_root_path=venv_root)
    async with ExtensionManager(ExtensionBase, config) as manager:
        extension = manager.load_extension(
            ExtensionConfig(name="nopkg", module_path=ext("ok"), dependencies=["pyisolate-no-such-package-xyz==9.9"])
        )
        with pytest.raises(EnvironmentBuildError) as info:
            async with asyncio.timeout(120):
                await extension
    assert "pyisolate-no-such-package-xyz" in str(info.value)
    assert info.value.output_tail

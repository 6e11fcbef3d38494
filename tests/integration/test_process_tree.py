"""A worker's descendants and its ways out, through real processes.

The ``forker`` extension starts one grandchild of each kind (``fork``, ``subprocess.Popen``,
one in a session of its own, a double-forked daemon, one with a child of its own), each
of which would wait forever and keeps the worker's stdout and stderr open. Whatever ends
the worker, none of them may outlive it, and the host keeps no descriptor of theirs. The
test holds a pidfd of each from the moment it learns its pid, so "gone" is the kernel's
word, not a pid's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import textwrap

import pytest

from pyisolate import (
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionLoadError,
    ExtensionManager,
    ExtensionManagerConfig,
    RemoteError,
    RestartPolicy,
)
from tests.support import ext, ipc_dirs

KINDS = {"fork", "popen", "setsid", "daemon", "nested", "nested-child"}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own descriptor


def pidfds(pids: dict[str, int]) -> dict[str, int]:
    """Pidfds of processes known to be alive now (they wait forever until killed)."""
    return {kind: os.pidfd_open(pid) for kind, pid in pids.items()}


def alive_by_proc(pid: int) -> bool:
    """Whether ``pid`` is a live process: it exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


async def exited(fds: dict[str, int], timeout: float = 20) -> set[str]:
    """Wait until each pidfd's process has exited, at most ``timeout`` s; return those still alive."""
    loop = asyncio.get_running_loop()
    left = dict(fds)
    done = asyncio.Event()

    def on_exit(kind: str) -> None:
        loop.remove_reader(left.pop(kind))
        if not left:
            done.set()

    for kind, fd in fds.items():
        loop.add_reader(fd, on_exit, kind)
    try:
        if left:
            async with asyncio.timeout(timeout):
                await done.wait()
    except TimeoutError:
        pass
    finally:
        for fd in left.values():
            loop.remove_reader(fd)
    return set(left)


async def assert_all_gone(pids: dict[str, int], fds: dict[str, int]) -> None:
    try:
        survivors = await exited(fds)
        assert not survivors, f"grandchildren outlived their worker: {survivors} of {pids}"
        assert not [k for k, pid in pids.items() if alive_by_proc(pid)]
    finally:
        for fd in fds.values():
            os.close(fd)


def kill_quietly(pids: dict[str, int]) -> None:
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def forker(name: str = "forker", **kw) -> ExtensionConfig:
    return ExtensionConfig(name=name, module_path=ext("forker"), **kw)


async def end_by(how: str, manager: ExtensionManager, e) -> None:  # type: ignore[no-untyped-def,type-arg]
    """End the worker of ``e`` the way ``how`` says."""
    if how == "stop":
        await e.stop()
    elif how == "stop_all":
        await manager.stop_all()
    elif how in ("stop-sigterm", "stop-sigkill"):  # the stop hook hangs; SIGTERM works, or is ignored
        await e.misbehave_on_stop(how == "stop-sigkill")
        await e.stop()
    elif how == "heartbeat":
        with pytest.raises(ExtensionCrashedError, match="heartbeats"):
            await e.hold_the_gil()
    elif how == "sigterm-from-elsewhere":
        pending = asyncio.ensure_future(e.wait_forever())
        assert await e.echo(1) == 1  # the call has reached the worker
        os.kill(await e.pid(), signal.SIGTERM)
        with pytest.raises(ExtensionCrashedError) as info:
            await pending
        assert info.value.exit_code == -signal.SIGTERM
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["stop", "stop_all", "stop-sigterm", "stop-sigkill", "heartbeat", "sigterm-from-elsewhere"])
async def test_no_grandchild_outlives_its_worker_and_the_host_keeps_no_descriptor(venv_root, how):
    config = ExtensionManagerConfig(venv_root_path=venv_root, stop_timeout=0.5,
                                    heartbeat_interval=0.1, heartbeat_timeout=1.0)
    fds_before = fd_count()
    pids: dict[str, int] = {}
    try:
        async with ExtensionManager(ExtensionBase, config) as manager:
            async with asyncio.timeout(120):
                e = await manager.load_extension(forker())
                worker = manager._extensions["forker"].process
                pids = await e.spawn()
                assert set(pids) == KINDS
                fds = pidfds(pids)
                await end_by(how, manager, e)
                await assert_all_gone(pids, fds)
            if how == "stop-sigterm":
                assert worker.returncode == -signal.SIGTERM  # the worker's handler took them along
            elif how == "stop-sigkill":
                assert worker.returncode == -signal.SIGKILL  # the host killed them first
        assert fd_count() == fds_before
    finally:
        kill_quietly(pids)


async def test_a_host_killed_by_sigkill_takes_every_grandchild_along(venv_root, tmp_path):
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(
        """
        import asyncio, json, sys
        import pyisolate

        async def main():
            manager = pyisolate.ExtensionManager(
                pyisolate.ExtensionBase, pyisolate.ExtensionManagerConfig(venv_root_path=sys.argv[1]))
            e = await manager.load_extension(pyisolate.ExtensionConfig(name="forker", module_path=sys.argv[2]))
            print(json.dumps({"worker": await e.pid(), **await e.spawn()}), flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """))
    before = ipc_dirs()
    host = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(venv_root), ext("forker"), stdout=asyncio.subprocess.PIPE)
    pids: dict[str, int] = {}
    try:
        async with asyncio.timeout(120):
            pids = json.loads(await host.stdout.readline())
            assert set(pids) == KINDS | {"worker"}
            fds = pidfds(pids)
            host.send_signal(signal.SIGKILL)
            await host.wait()
            await assert_all_gone(pids, fds)
    finally:
        if host.returncode is None:
            host.kill()
        async with asyncio.timeout(30):
            await host.communicate()  # end-of-file: nobody holds the pipe any more
        kill_quietly(pids)
        for leftover in ipc_dirs() - before:  # a SIGKILLed host cannot clean up; the next one sweeps
            shutil.rmtree(leftover, ignore_errors=True)


@pytest.mark.parametrize("how", ["os._exit", "SIGKILL"])
async def test_a_worker_killed_outright_leaves_nothing_of_its_process_group(venv_root, how):
    """A worker that could not clean up: the host kills what stayed in its process group, and
    closes the pipes that the others (in sessions of their own) still hold."""
    fds_before = fd_count()
    pids: dict[str, int] = {}
    try:
        async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
            async with asyncio.timeout(120):
                e = await manager.load_extension(forker())
                pids = await e.spawn()
                fds = pidfds(pids)
                with pytest.raises(ExtensionCrashedError):
                    if how == "SIGKILL":
                        os.kill(await e.pid(), signal.SIGKILL)
                        await e.wait_forever()
                    else:
                        await e.crash(9)
                in_group = {k: fds.pop(k) for k in ("fork", "popen", "nested", "nested-child")}
                await assert_all_gone({k: pids[k] for k in in_group}, in_group)
                for fd in fds.values():
                    os.close(fd)
        assert fd_count() == fds_before  # though the others still hold the worker's stdout and stderr
    finally:
        kill_quietly(pids)  # those in sessions of their own: the limit docs/architecture.md states


@pytest.mark.parametrize("method", ["exit_async", "exit_plain", "exit_stream", "exit_in_task"])
async def test_sys_exit_in_a_method_ends_the_worker_with_that_code_like_a_crash(manager, method, caplog):
    caplog.set_level(logging.INFO, logger="pyisolate.extension")
    policy = RestartPolicy(max_restarts=3, within=600, backoff=0.01)
    pids: dict[str, int] = {}
    try:
        async with asyncio.timeout(120):
            e = await manager.load_extension(forker(restart=policy))
            first = await e.pid()
            pids = await e.spawn()
            fds = pidfds(pids)
            pending = asyncio.ensure_future(e.wait_forever())
            assert await e.echo(1) == 1  # both calls have reached the worker
            with pytest.raises(ExtensionCrashedError) as info:
                if method == "exit_stream":
                    async for item in e.exit_stream(3):
                        assert item == 1
                else:
                    await getattr(e, method)(3)
            with pytest.raises(ExtensionCrashedError):
                await pending  # every call pending fails alike
            await assert_all_gone(pids, fds)
            second = await e.pid()  # restarted, as after any crash
        assert info.value.exit_code == 3 and info.value.extension == "forker"
        tail = info.value.stderr_tail
        assert "SystemExit(3)" in tail and f"in {method}" in tail
        assert "Traceback" not in tail and "ZMQError" not in tail, tail
        stdout = [r.getMessage() for r in caplog.records if getattr(r, "stream", None) == "stdout"]
        assert "last words, no newline" in stdout  # flushed on the way out
        assert second != first
    finally:
        kill_quietly(pids)


async def test_sys_exit_in_the_stop_hook_ends_the_worker_at_once(venv_root):
    config = ExtensionManagerConfig(venv_root_path=venv_root, stop_timeout=60)
    pids: dict[str, int] = {}
    try:
        async with ExtensionManager(ExtensionBase, config) as manager:
            async with asyncio.timeout(120):
                e = await manager.load_extension(forker())
                worker = manager._extensions["forker"].process
                pids = await e.spawn()
                fds = pidfds(pids)
                await e.set_exit_on_stop(4)
            async with asyncio.timeout(20):  # not stop_timeout: its exit ends the wait for its answer
                await e.stop()
            await assert_all_gone(pids, fds)
            assert worker.returncode == 4
            tail = worker.stderr_tail()
            assert "SystemExit(4)" in tail and "Traceback" not in tail and "ZMQError" not in tail, tail
    finally:
        kill_quietly(pids)


@pytest.mark.parametrize("how", ["exit", "raise"])
async def test_a_worker_that_fails_to_load_takes_its_grandchildren_along(manager, tmp_path, how):
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    pids: dict[str, int] = {}
    fds: dict[str, int] = {}

    def rendezvous() -> None:  # the extension hands over the pids, and waits until we hold them
        nonlocal pids, fds
        with open(gate) as f:
            pids = json.loads(f.read())
        fds = pidfds(pids)
        with open(gate, "w"):
            pass

    try:
        loading = manager.load_extension(forker(env={"FORKER_ON_LOAD": how, "FORKER_GATE": str(gate)}))
        async with asyncio.timeout(120):
            await asyncio.to_thread(rendezvous)
            with pytest.raises(ExtensionLoadError) as info:
                await loading
        await assert_all_gone(pids, fds)
        if how == "exit":
            assert "exited with code 7 before it was ready" in str(info.value)
            assert "Traceback" not in info.value.remote_traceback
        else:
            assert "failing to load on purpose" in str(info.value)
    finally:
        os.close(os.open(gate, os.O_RDWR))  # frees a rendezvous thread left waiting by a failure
        kill_quietly(pids)


@pytest.mark.parametrize(
    ("module", "qualname", "args"),
    [("builtins", "SystemExit", [3]), ("builtins", "KeyboardInterrupt", []),
     ("builtins", "GeneratorExit", []), ("asyncio.exceptions", "CancelledError", []),
     ("builtins", "BaseException", ["base"])],
)
async def test_a_remote_base_exception_is_never_raised_as_itself_in_the_host(manager, module, qualname, args):
    async with asyncio.timeout(60):
        e = await manager.load_extension(ExtensionConfig(name="hostile", module_path=ext("hostile")))
        with pytest.raises(RemoteError) as info:
            await e.answer_with(module, qualname, args, " ".join(map(str, args)))
        assert info.value.remote_type == f"{module}.{qualname}"
        assert await e.echo("the host lives") == "the host lives"


def test_exit_codes_are_those_python_gives_system_exit(capsys):
    from pyisolate.workers.exits import exit_code

    assert [exit_code(SystemExit(c)) for c in (None, 0, 3, 256 + 3, -1, True)] == [0, 0, 3, 3, 255, 1]
    assert exit_code(SystemExit("bye")) == 1  # a message is printed, and the status is 1
    assert capsys.readouterr().err == "bye\n"

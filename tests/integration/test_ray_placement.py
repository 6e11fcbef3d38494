"""RayPlacement's launcher against a real Ray head that the module starts on this machine.

The head (``ray start --head``, a temp dir of its own, a custom resource ``pyi_test``) lives as
long as the module; its processes are ended by pid in the finalizer (``ray stop`` would end
every Ray cluster of this user on the machine). The pytest process is the Ray driver, as a
host is: connected once for the module, left at its end.

Loopback only: Ray 2.60's GCS and raylet listen on every interface whatever
``--node-ip-address`` says, so where it can (root, as in CI) the module runs in a network
namespace of its own that has nothing but ``lo``. The test thread enters it (a network
namespace is per thread), so the head, the driver, the host's tcp listener and the workers Ray
starts all live there; it leaves at the module's end. The venv the placed extension needs is
built before, outside it (the registry is not reachable from it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'pyisolate[ray]')")

import ray  # noqa: E402

import pyisolate  # noqa: E402
from pyisolate._host.placement import disconnect, launch  # noqa: E402

RESOURCE = "pyi_test"
#: Seconds a test waits for something the cluster does (start, stop, notice a death).
DEADLINE = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_pids(temp_dir: Path) -> set[int]:
    """The head's daemons (their command lines name its temp dir) and the processes they started."""
    daemons = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if str(temp_dir).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    daemons.add(int(entry))
            except OSError:
                pass
    found = set(daemons)
    for pid in daemons:
        for path in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                found.update(int(p) for p in path.read_text().split())
            except OSError:
                pass
    return found


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie nobody reaps counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Poll until every pid has ended or ``timeout`` passes; the ones left."""
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if not _gone(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


CLONE_NEWNET = 0x40000000
#: The machine's network namespace (the module is imported in it), by inode.
_MACHINE_NET = os.stat("/proc/thread-self/ns/net").st_ino
#: The temp dir of the head at each address (its processes' command lines name it).
_HEAD: dict[str, Path] = {}


def _links() -> list[str]:
    """The network interfaces this thread's namespace has."""
    links = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True).stdout
    return [line.split(":")[1].strip() for line in links.splitlines()]


@pytest.fixture(scope="module")
def loopback_only(venv_root: Path) -> Iterator[bool]:
    """This thread in a new network namespace with only ``lo`` up, for the module (True), or, where
    none can be made (not root), the machine's (False). Left, and checked left, at the end."""
    import ctypes

    from tests.support import ext

    built = subprocess.run([str(Path(sys.executable).with_name("pyisolate")), "env", "build", "--venv-root",
                            str(venv_root), str(ext("remote_probe"))], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            logging.getLogger(__name__).warning("no network namespace (%s): Ray listens on every interface",
                                                os.strerror(ctypes.get_errno()))
            yield False
            return
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10)
            assert _links() == ["lo"]
            yield True
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not go back to the machine's network namespace")
        assert os.stat("/proc/thread-self/ns/net").st_ino == os.fstat(home).st_ino
    finally:
        os.close(home)


@pytest.fixture(scope="module")
def ray_head(loopback_only: bool) -> Iterator[str]:
    """A one-node Ray cluster on loopback with one ``pyi_test`` resource; the driver connected to it."""
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="pyi-ray-"))  # short: Ray's unix sockets live in it
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = _ray_env()
    ray_cli = Path(sys.executable).with_name("ray")
    try:
        subprocess.run(
            [str(ray_cli), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             f"--resources={json.dumps({RESOURCE: 1})}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
             "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        _HEAD[address] = temp_dir
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        disconnect()
        _end_cluster(temp_dir)


def _ray_env() -> dict[str, str]:
    """``ray start``'s environment: no usage stats; a node that stops answering is dead within ~1.5 s."""
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "500",
            "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}


def _end_cluster(temp_dir: Path) -> None:
    """End the processes of the Ray node(s) started with ``temp_dir``, by pid: SIGTERM, then SIGKILL."""
    pids = _cluster_pids(temp_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in _wait_gone(pids, 3.0):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert _wait_gone(pids, 10.0) == set(), "the Ray node's processes did not end"
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def no_fd_leaks() -> Iterator[None]:
    """Ray's driver keeps gRPC channels (sockets, eventfds) to each actor's worker it has talked
    to, owned by Ray and closed with ``ray.shutdown()``; every other descriptor is still checked."""
    from tests.support import open_fds

    def ours() -> dict[int, str]:
        return {fd: t for fd, t in open_fds().items() if not t.startswith(("socket:", "anon_inode:"))}

    before = ours()
    yield
    left = {fd: target for fd, target in ours().items() if before.get(fd) != target}
    assert not left, f"a test left file descriptors open: {left}"


def _placement(address: str, **kw: object) -> pyisolate.RayPlacement:
    return pyisolate.RayPlacement(resources={RESOURCE: 1}, num_cpus=0, address=address, **kw)  # type: ignore[arg-type]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def _read_json(path: Path) -> dict[str, int]:
    """The JSON a process writes at ``path`` (atomically, by rename) once it is ready."""
    async with asyncio.timeout(DEADLINE):
        while not path.exists():
            await asyncio.sleep(0.02)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_the_cluster_lives_in_a_namespace_with_loopback_alone(ray_head: str, loopback_only: bool) -> None:
    if not loopback_only:
        pytest.skip("no network namespace could be made (not root): the head runs in the machine's")
    ours = os.stat("/proc/thread-self/ns/net").st_ino
    assert ours != _MACHINE_NET
    pids = _cluster_pids(_HEAD[ray_head])
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids}
    assert {"gcs_server", "raylet"} <= names, names
    assert {os.stat(f"/proc/{pid}/ns/net").st_ino for pid in pids} == {ours}  # every one of them
    assert _links() == ["lo"]


async def test_runs_the_command_on_a_node_with_the_resource(ray_head: str, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import ray

    out = tmp_path / "ran.json"
    code = ("import json, os, sys; "
            f"open({str(out)!r}, 'w').write(json.dumps({{'pid': os.getpid(), 'x': os.environ.get('PYI_X'), "
            "'ray': sorted(k for k in os.environ if k.startswith('RAY_'))})); "
            "print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)")
    caplog.set_level(logging.INFO, logger="pyisolate.extension.placed")
    async with asyncio.timeout(DEADLINE):
        proc = await launch(_placement(ray_head, env={"PYI_X": "from-placement"}), _python(code), {}, name="placed")
        try:
            assert await proc.wait() == 3
        finally:
            await proc.aclose()
    ran = json.loads(out.read_text())
    assert ran == {"pid": proc.pid, "x": "from-placement", "ray": []}
    head = next(n for n in ray.nodes() if n["Alive"])
    assert (proc.node_id, proc.node_ip) == (head["NodeID"], head["NodeManagerAddress"])
    assert proc.returncode == 3
    assert "to stderr" in proc.stderr_tail()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pyisolate.extension.placed"]
    assert ("INFO", "to stdout") in lines and ("WARNING", "to stderr") in lines


async def test_env_of_the_launch_wins_over_the_placement(ray_head: str, tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    code = f"import os; open({str(out)!r}, 'w').write(os.environ['PYI_X'])"
    async with asyncio.timeout(DEADLINE):
        proc = await launch(_placement(ray_head, env={"PYI_X": "placement"}), _python(code), {"PYI_X": "launch"},
                            name="env")
        try:
            assert await proc.wait() == 0
        finally:
            await proc.aclose()
    assert out.read_text() == "launch"


async def test_a_command_that_cannot_run_exits_127(ray_head: str) -> None:
    async with asyncio.timeout(DEADLINE):
        proc = await launch(_placement(ray_head), ["/nonexistent/pyisolate-worker"], {}, name="missing")
        try:
            assert await proc.wait() == 127
        finally:
            await proc.aclose()
    assert "cannot run '/nonexistent/pyisolate-worker'" in proc.stderr_tail()


# Ignores SIGTERM, starts a grandchild in its session, says both pids, then sleeps.
_STUBBORN = """
import json, os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
path = sys.argv[1]
open(path + ".tmp", "w").write(json.dumps({"pid": os.getpid(), "grandchild": child.pid}))
os.rename(path + ".tmp", path)
time.sleep(600)
"""


async def test_stop_kills_a_process_that_ignores_sigterm_and_its_session(ray_head: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    async with asyncio.timeout(DEADLINE):
        proc = await launch(_placement(ray_head), [*_python(_STUBBORN), str(ready)], {}, name="stubborn")
        try:
            pids = await _read_json(ready)
            assert pids["pid"] == proc.pid
            started = time.monotonic()
            code = await proc.stop(grace=0.5)
            took = time.monotonic() - started
        finally:
            await proc.aclose()
    assert code == -signal.SIGKILL
    assert took >= 0.5  # it had its grace period first
    left = await asyncio.to_thread(_wait_gone, {proc.pid, pids["grandchild"], proc.runner_pid}, DEADLINE)
    assert left == set(), "the process, its grandchild or the Ray actor outlived stop()"


async def test_stop_asks_first(ray_head: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = f"import time; open({str(ready)!r}, 'w').close(); time.sleep(600)"
    async with asyncio.timeout(DEADLINE):
        proc = await launch(_placement(ray_head), _python(code), {}, name="polite")
        try:
            await _read_json_exists(ready)
            assert await proc.stop(grace=DEADLINE) == -signal.SIGTERM
        finally:
            await proc.aclose()
    assert await asyncio.to_thread(_wait_gone, {proc.pid, proc.runner_pid}, DEADLINE) == set()


async def _read_json_exists(path: Path) -> None:
    async with asyncio.timeout(DEADLINE):
        while not path.exists():
            await asyncio.sleep(0.02)


async def test_losing_the_ray_actor_is_a_crash_and_takes_the_process_along(ray_head: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = f"import sys, time; print('last words', file=sys.stderr, flush=True); open({str(ready)!r}, 'w').close(); " \
           "time.sleep(600)"
    async with asyncio.timeout(DEADLINE):
        proc = await launch(_placement(ray_head), _python(code), {}, name="lost")
        try:
            await _read_json_exists(ready)
            os.kill(proc.runner_pid, signal.SIGKILL)  # what the node going down does to the actor
            with pytest.raises(pyisolate.ExtensionCrashedError, match="was lost with its Ray actor") as caught:
                await proc.wait()
        finally:
            await proc.aclose()
    assert caught.value.extension == "lost" and caught.value.exit_code is None
    assert await asyncio.to_thread(_wait_gone, {proc.pid}, DEADLINE) == set(), "the worker outlived its actor"


async def test_a_request_no_node_can_take_fails_within_start_timeout(ray_head: str) -> None:
    placement = pyisolate.RayPlacement(resources={"GPU": 1}, address=ray_head, start_timeout=1.5)
    started = time.monotonic()
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(pyisolate.PlacementError) as caught:
            await launch(placement, _python("pass"), {}, name="gpu")
    assert time.monotonic() - started < 1.5 + 10
    text = str(caught.value)
    assert "'gpu'" in text and "GPU=1" in text and "within 1.5 s" in text
    assert f"{RESOURCE}=1" in text  # what the node offers



def test_an_address_with_no_cluster_fails_at_once(tmp_path: Path) -> None:
    # In a process of its own: this one is already the driver of the module's cluster.
    port = _free_port()
    program = (
        "import asyncio, sys, pyisolate\n"
        "from pyisolate._host.placement import launch\n"
        f"placement = pyisolate.RayPlacement(address='127.0.0.1:{port}')\n"
        "try:\n"
        "    asyncio.run(launch(placement, [sys.executable, '-c', 'pass'], {}, name='nowhere'))\n"
        "except pyisolate.PlacementError as exc:\n"
        "    print(exc)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert f"cannot connect to the Ray cluster at '127.0.0.1:{port}'" in done.stdout, done.stderr
    assert "ray start --head" in done.stdout
    assert time.monotonic() - started < 20


async def test_a_node_going_down_is_a_crash(ray_head: str, tmp_path: Path) -> None:
    """A second node joins with a resource of its own; its raylet is SIGKILLed under the worker."""
    temp_dir = Path(tempfile.mkdtemp(prefix="pyi-ray-"))  # short: Ray's unix sockets live in it (108 bytes a path)
    ray_cli = Path(sys.executable).with_name("ray")
    try:
        subprocess.run(
            [str(ray_cli), "start", f"--address={ray_head}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             f"--resources={json.dumps({'pyi_node2': 1})}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=_ray_env(), check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        raylet = next(p for p in _cluster_pids(temp_dir)
                      if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet"))
        ready = tmp_path / "ready"
        code = f"import time; open({str(ready)!r}, 'w').close(); time.sleep(600)"
        placement = pyisolate.RayPlacement(resources={"pyi_node2": 1}, num_cpus=0, address=ray_head)
        async with asyncio.timeout(DEADLINE):
            proc = await launch(placement, _python(code), {}, name="node2")
            try:
                assert proc.node_id != next(n["NodeID"] for n in ray.nodes() if "pyi_test" in n["Resources"])
                await _read_json_exists(ready)
                os.kill(raylet, signal.SIGKILL)
                with pytest.raises(pyisolate.ExtensionCrashedError, match="was lost with its Ray actor") as caught:
                    await proc.wait()
            finally:
                await proc.aclose()
        assert caught.value.exit_code is None
        assert await asyncio.to_thread(_wait_gone, {proc.pid}, DEADLINE) == set(), "the worker outlived its node"
    finally:
        _end_cluster(temp_dir)


# -- an extension placed by RayPlacement ----------------------------------------------------


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


async def test_an_extension_placed_on_the_cluster_serves_is_relaunched_after_a_loss_and_ends_with_it(
        ray_head: str, venv_root: Path, tmp_path: Path) -> None:
    import zmq

    from pyisolate import CurveConfig, ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig
    from tests.support import ext

    _, server_secret = zmq.curve_keypair()
    (shared := tmp_path / "shared").mkdir()
    (shared / "data.txt").write_text("shared data")
    config = ExtensionManagerConfig(venv_root_path=venv_root, listen="tcp://127.0.0.1:*",
                                    curve=CurveConfig(server_secret_key=server_secret.decode()),  # no worker keys
                                    heartbeat_interval=0.5, heartbeat_timeout=5.0, start_timeout=240,
                                    sandbox=pyisolate.SandboxPolicy(readonly_paths=(shared,)),
                                    limits={"open_files": 333})
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(300):
            probe = await manager.load_extension(ExtensionConfig(
                name="remote_probe", module_path=ext("remote_probe"), placement=_placement(ray_head),
                restart=pyisolate.RestartPolicy(max_restarts=2, within=600, backoff=0.01)))
        worker = probe._pyisolate_backend.current
        first = worker.placed.process
        listener = manager.broker.listener
        async with asyncio.timeout(DEADLINE):
            assert await probe.echo("through ray") == "through ray"

            async def host_side(value):
                return value + 1

            assert await probe.call_back(host_side, 41) == 42  # and back to the host
            # Confined on its node by the host's policy: what it grants and nothing else.
            (secret := tmp_path / "node-secret.txt").write_text("the node's")
            assert (await probe.read(str(secret))).startswith("PermissionError")
            assert await probe.read(str(shared / "data.txt")) == "shared data"
            assert await probe.open_files_limit() == 333  # and by its limits
            # Its worker is the child of the command the Ray actor runs, not of the host.
            assert _parent_of(await probe.pid()) == first.pid
            assert len(listener._allowed) == 1  # the launch's own key, for this name only
            hanging = asyncio.ensure_future(probe.hang())
            assert await probe.echo(1) == 1  # hang has arrived: one pipe, in order
            os.kill(first.runner_pid, signal.SIGKILL)  # the Ray actor (its node) is lost
            with pytest.raises(pyisolate.ExtensionCrashedError, match="Ray actor"):
                await hanging
        async with asyncio.timeout(240):
            await probe  # restarted: launched again, joined again
        second = worker.placed.process
        assert second is not first and second.runner_pid != first.runner_pid
        assert await asyncio.to_thread(_wait_gone, {first.pid}, DEADLINE) == set()
        assert await probe.echo("again") == "again" and _parent_of(await probe.pid()) == second.pid
        assert len(listener._allowed) == 1  # the first launch's key was revoked
        # Its worker alone dies: the launch starts another, which rejoins; the host launches nothing.
        hanging = asyncio.ensure_future(probe.hang())
        os.kill(await probe.pid(), signal.SIGKILL)  # answered after hang arrived: one pipe, in order
        async with asyncio.timeout(120):
            with pytest.raises(pyisolate.ExtensionCrashedError):
                await hanging
            await probe
        assert worker.placed.process is second and _parent_of(await probe.pid()) == second.pid
        async with asyncio.timeout(DEADLINE):
            await probe.stop()
        assert await asyncio.to_thread(_wait_gone, {second.pid, second.runner_pid}, DEADLINE) == set()
        assert listener._allowed == {}


async def test_a_placed_worker_that_cannot_start_fails_the_load_at_once(ray_head: str, venv_root: Path,
                                                                        tmp_path: Path) -> None:
    import zmq

    from pyisolate import CurveConfig, ExtensionBase, ExtensionConfig, ExtensionManager, ExtensionManagerConfig

    _, server_secret = zmq.curve_keypair()
    config = ExtensionManagerConfig(venv_root_path=venv_root, listen="tcp://127.0.0.1:*",
                                    curve=CurveConfig(server_secret_key=server_secret.decode()), start_timeout=600)
    async with ExtensionManager(ExtensionBase, config) as manager:
        async with asyncio.timeout(DEADLINE):  # not the start_timeout: the launch's end says it all
            with pytest.raises(pyisolate.PyisolateError, match="ended with its Ray launch") as caught:
                await manager.load_extension(ExtensionConfig(
                    name="nowhere", module_path=tmp_path / "not-on-the-node", placement=_placement(ray_head)))
        listener = manager.broker.listener
        # The failed extension is stopped with the manager: its launch ends, its key goes.
        launch = manager._extensions["nowhere"].placed.process
    assert listener._allowed == {}
    assert await asyncio.to_thread(_wait_gone, {launch.runner_pid}, DEADLINE) == set()
    assert "not-on-the-node" in caught.value.remote_traceback  # what the command said there, relayed

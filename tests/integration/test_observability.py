"""Seeing inside a running host: statistics of real calls, the admin endpoint (its access rule
and its input checks), and ``pyisolate top``, ``stack`` and ``profile`` run as subprocesses
against live workers."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import textwrap
from pathlib import Path

import msgpack
import pytest

import pyisolate
from pyisolate import (
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionManager,
    ExtensionManagerConfig,
    RestartPolicy,
)
from pyisolate._wire import encode
from tests.integration.test_sandbox_unprivileged import NOBODY, SYSTEM_PYTHON, nobody_python  # noqa: F401
from tests.support import ext

linux_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not SYSTEM_PYTHON.exists(),
                                reason="needs root, setpriv and /usr/bin/python3 to act as another user")


async def load(manager: ExtensionManager, name: str = "observed", **options: object) -> pyisolate.Extension:
    return await manager.load_extension(ExtensionConfig(name=name, module_path=ext("observed"), **options))


@pytest.fixture
async def admin_manager(venv_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PYISOLATE_ADMIN", raising=False)
    config = ExtensionManagerConfig(venv_root_path=venv_root, admin=True, stop_timeout=1.0)
    async with ExtensionManager(ExtensionBase, config) as manager:
        yield manager


async def cli(*args: str, timeout: float = 90) -> tuple[int, str, str]:
    """Run ``python -m pyisolate ARGS`` while this loop keeps serving; its exit code and output."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "pyisolate", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def request(path: str, payload: bytes) -> object:
    """Send raw bytes to an admin socket and decode its one answer (None: it closed without one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    if not data:
        return None
    (size,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + size
    return msgpack.unpackb(data[4:])


def frame(value: object) -> bytes:
    data = msgpack.packb(value)
    return struct.pack(">I", len(data)) + data


# -- statistics ----------------------------------------------------------------------------


async def test_stats_count_the_calls_their_errors_and_their_bytes(manager):
    observed = await load(manager)
    payloads = [b"", b"x" * 10, b"y" * 1000, bytes(5000)]
    for payload in payloads:
        assert await observed.echo(payload) == payload
    after_echo = pyisolate.stats(observed)
    for kind in ("value", "key", "value"):
        with pytest.raises((ValueError, KeyError)):
            await observed.fail(kind)
    stats = pyisolate.stats(observed)

    assert stats["name"] == "observed" and stats["state"] == "ready" and stats["isolated"] is True
    assert stats["calls"] == 7
    assert stats["errors"] == {"ValueError": 2, "KeyError": 1}
    assert stats["methods"]["echo"]["calls"] == 4 and stats["methods"]["echo"]["errors"] == 0
    assert stats["methods"]["fail"]["calls"] == 3 and stats["methods"]["fail"]["errors"] == 3
    # Bytes as they travel: each call's arguments out, each answer's value in.
    assert after_echo["bytes_out"] == sum(len(encode([[p], {}])[0]) for p in payloads)
    assert after_echo["bytes_in"] == sum(len(encode(p)[0]) for p in payloads)
    assert stats["bytes_out"] == after_echo["bytes_out"] + sum(len(encode([[k], {}])[0]) for k in ("value", "key",
                                                                                                  "value"))
    assert stats["bytes_in"] > after_echo["bytes_in"]  # the three exceptions came back
    assert stats["in_flight"] == 0 and stats["queued"] == 0 and stats["restarts"] == 0
    assert manager.stats()["extensions"]["observed"]["calls"] == 7


async def test_p99_shows_a_slow_method(manager):
    observed = await load(manager)
    for i in range(40):
        await observed.echo(i)
    await observed.slow(0.3)
    stats = pyisolate.stats(observed)
    slow, echo = stats["methods"]["slow"], stats["methods"]["echo"]
    assert 0.3 <= slow["p50"] == slow["p99"] < 0.3 * 1.19 + 0.25  # one bucket (19%) plus the call's own cost
    assert echo["p99"] < 0.3
    assert stats["p99"] == slow["p99"]  # 1 of 41 calls is more than 1%: the overall p99 is the slow one
    assert stats["p50"] < 0.3  # ... and its median an echo


async def test_in_flight_and_queued_calls_are_seen_while_they_wait(venv_root):
    config = ExtensionManagerConfig(venv_root_path=venv_root, max_in_flight=1)
    async with ExtensionManager(ExtensionBase, config) as manager:
        observed = await load(manager)
        calls = [asyncio.ensure_future(observed.slow(60)) for _ in range(3)]
        for _ in range(10):  # each task sends its call (or queues for a slot) in its first step
            await asyncio.sleep(0)
        stats = pyisolate.stats(observed)
        assert (stats["in_flight"], stats["queued"]) == (1, 2)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        stats = pyisolate.stats(observed)
        assert stats["queued"] == 0
        assert stats["errors"] == {"CancelledError": 3} and stats["calls"] == 3


async def test_an_in_process_extension_counts_its_calls(manager):
    local = await load(manager, "local", isolated=False)
    assert await local.echo(b"x") == b"x"
    assert await local.echo(b"y") == b"y"
    with pytest.raises(ValueError):
        await local.fail("value")
    stats = pyisolate.stats(local)
    assert stats["isolated"] is False and stats["pid"] == os.getpid() and stats["state"] == "ready"
    assert stats["calls"] == 3 and stats["errors"] == {"ValueError": 1}
    assert stats["methods"]["echo"]["calls"] == 2 and stats["methods"]["fail"]["errors"] == 1
    assert manager.stats()["extensions"]["local"]["calls"] == 3


async def test_restarts_memory_and_cpu_time_of_the_worker(manager):
    observed = await load(manager, restart=RestartPolicy(max_restarts=2, within=600, backoff=0.01))
    first = await observed.pid()
    await observed.busy_for(0.4)
    stats = pyisolate.stats(observed)
    assert stats["pid"] == first
    resident = await observed.resident_bytes()
    assert abs(stats["rss"] - resident) < resident * 0.2 and stats["cpu_seconds"] >= 0.3
    if os.geteuid() == 0:  # PSS needs ptrace rights over the non-dumpable worker: root has them
        assert 0 < stats["pss"] <= stats["rss"]
    with pytest.raises(ExtensionCrashedError):
        await observed.crash()
    async with asyncio.timeout(60):
        await observed
    second = await observed.pid()
    stats = pyisolate.stats(observed)
    assert second != first and stats["pid"] == second
    assert stats["restarts"] == 1
    assert stats["errors"] == {"ExtensionCrashedError": 1}
    assert stats["calls"] == 5  # counts survive the restart
    async with asyncio.timeout(60):
        await observed.reload()
    stats = pyisolate.stats(observed)
    assert stats["reloads"] == 1 and stats["pid"] != second
    assert stats["restarts"] == 1  # the extension's restarts, not only its new worker's


async def test_shared_memory_bytes_in_and_out(manager):
    torch = pytest.importorskip("torch")
    tensors = await manager.load_extension(ExtensionConfig(name="tensors", module_path=ext("tensors"),
                                                           share_torch=True))  # fmt: skip
    before = pyisolate.stats(tensors)
    await tensors.describe(torch.zeros(1 << 20, dtype=torch.uint8))
    made = await tensors.make(1 << 18)
    stats = pyisolate.stats(tensors)
    assert stats["shm_bytes_out"] - before["shm_bytes_out"] >= 1 << 20
    assert stats["shm_bytes_in"] - before["shm_bytes_in"] == made.numel() * 4
    assert stats["bytes_out"] < 1 << 16  # the data went through shared memory, not the socket


async def test_stats_false_counts_no_calls(venv_root):
    config = ExtensionManagerConfig(venv_root_path=venv_root, stats=False)
    async with ExtensionManager(ExtensionBase, config) as manager:
        observed = await load(manager)
        for i in range(5):
            await observed.echo(i)
        snapshot = manager.stats()
        stats = snapshot["extensions"]["observed"]
        assert snapshot["counting"] is False
        assert stats["calls"] == 0 and stats["methods"] == {}
        assert stats["pid"] == await observed.pid() and stats["rss"] > 0


def test_stats_of_a_sync_manager_and_its_handles(venv_root):
    with pyisolate.SyncExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        observed = manager.load_extension(ExtensionConfig(name="observed", module_path=ext("observed")))
        assert [observed.echo(i) for i in range(2)] == [0, 1]
        assert pyisolate.stats(observed)["calls"] == 2
        assert manager.stats()["extensions"]["observed"]["methods"]["echo"]["calls"] == 2


def test_stats_needs_a_handle():
    with pytest.raises(TypeError, match="extension handle"):
        pyisolate.stats("observed")


# -- the admin endpoint and `pyisolate top` ------------------------------------------------


async def test_top_json_and_table_of_a_live_host(admin_manager):
    observed = await load(admin_manager)
    for i in range(3):
        await observed.echo(i)
    code, out, err = await cli("top", "--json", "--host", str(os.getpid()))
    assert code == 0, err
    snapshot = json.loads(out)
    assert snapshot["pid"] == os.getpid()
    assert snapshot["extensions"]["observed"]["calls"] == 3
    assert snapshot["extensions"]["observed"]["pid"] == await observed.pid()  # the 4th call

    code, out, err = await cli("top", "--once", "--interval", "0.2", "--host", str(os.getpid()))
    assert code == 0, err
    heading, columns, row = out.splitlines()
    assert heading == f"pyisolate host {os.getpid()}: 1 extension(s)"
    assert columns.split()[:3] == ["NAME", "STATE", "PID"]
    assert row.split()[:5] == ["observed", "ready", str(await observed.pid()), "0.0", "4"]


async def test_a_host_with_two_managers_is_attached_to_by_the_path_of_one(admin_manager, venv_root):
    observed = await load(admin_manager)
    await observed.echo(1)
    config = ExtensionManagerConfig(venv_root_path=venv_root, admin=True, stop_timeout=1.0)
    async with ExtensionManager(ExtensionBase, config) as other:
        await load(other)  # the same extension in the second manager, not called
        code, _, err = await cli("top", "--json", "--host", str(os.getpid()))
        assert code == 1 and "2 managers" in err and "--host PATH" in err  # the pid alone names neither
        assert admin_manager.admin_path in err and other.admin_path in err
        for manager, calls in ((admin_manager, 1), (other, 0)):
            code, out, err = await cli("top", "--json", "--host", manager.admin_path)
            assert code == 0, err
            assert json.loads(out)["extensions"]["observed"]["calls"] == calls


async def test_admin_endpoint_is_off_unless_enabled(manager, monkeypatch):
    monkeypatch.delenv("PYISOLATE_ADMIN", raising=False)
    await load(manager)
    assert manager.admin_path is None
    assert not any(Path(d, "admin").exists() for d in Path(tempfile.gettempdir()).glob(f"pyisolate-{os.getpid()}-*"))
    code, _, err = await cli("top", "--json", "--host", str(os.getpid()))
    assert code == 1 and "admin=True" in err and "PYISOLATE_ADMIN=1" in err


async def test_admin_endpoint_answers_malformed_requests_with_an_error(admin_manager):
    await load(admin_manager)
    path = admin_manager.admin_path
    assert path is not None and (os.stat(path).st_mode & 0o777) == 0o600

    def ask(payload: bytes) -> object:
        return request(path, payload)

    cases = {
        struct.pack(">I", 3) + b"\xc1\xc1\xc1": "not a msgpack value",  # 0xc1: never used
        struct.pack(">I", 1 << 20) + b"x": "over the limit",
        frame([1, 2]): "a request is a map",
        frame({"op": "nope"}): "unknown op 'nope'",
        frame({"op": "stack"}): "needs the field(s) target",
        frame({"op": "stack", "target": 5}): "must be a str",
        frame({"op": "stats", "extra": 1}): "takes no field 'extra'",
        frame({1: "stats"}): "not a msgpack value",  # int keys refused (strict_map_key)
        frame(msgpack.ExtType(1, b"x")): "not a msgpack value",
        frame({"op": "stack", "target": "nope"}): "no extension worker named 'nope'",
    }
    for payload, error in cases.items():
        answer = await asyncio.to_thread(ask, payload)
        assert isinstance(answer, dict) and answer["ok"] is False and error in answer["error"], (payload, answer)
    assert await asyncio.to_thread(ask, struct.pack(">I", 100) + b"short") is None  # cut off: no answer
    answer = await asyncio.to_thread(ask, frame({"op": "stats"}))  # and it still serves
    assert answer["ok"] is True and "observed" in answer["stats"]["extensions"]


@linux_root
async def test_another_user_cannot_attach(admin_manager, nobody_python):  # noqa: F811
    await load(admin_manager)
    path = admin_manager.admin_path
    # The directory keeps another user out before any request...
    probe = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(SYSTEM_PYTHON), "-I", "-c",
        f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})", stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        _, err = await probe.communicate()
    assert probe.returncode != 0 and b"PermissionError" in err
    # ... and `pyisolate top` run by that user does not even find this host.
    proc = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(nobody_python), "-I", "-m",
        "pyisolate", "top", "--json", "--host", str(os.getpid()), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "HOME": "/"})
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 1 and out == b"" and f"no host with pid {os.getpid()}".encode() in err


NOBODY_HOST = textwrap.dedent("""
    import asyncio, sys
    import pyisolate

    async def main():
        config = pyisolate.ExtensionManagerConfig(venv_root_path=sys.argv[1], admin=True)
        async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
            observed = await manager.load_extension(pyisolate.ExtensionConfig(
                name="observed", module_path=sys.argv[2], isolated=sys.argv[3] == "isolated"))
            if sys.argv[3] == "isolated":
                asyncio.ensure_future(observed.busy_for(60))
            print(manager.admin_path, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main())
""")


def as_nobody(python: Path, *args: str | Path, work: Path, **options: object):
    """Start ``python -I ARGS`` as ``nobody`` (py-spy on PATH: this tree's venv's, which any user may run)."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(work),
           "UV_CACHE_DIR": str(work / "uv-cache"), "LANG": "C.UTF-8"}  # fmt: skip
    return asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(python), "-I", *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=work, **options)


@pytest.fixture
def nobody_work():
    """A folder ``nobody`` owns, with the host script and the extension."""
    work = Path(tempfile.mkdtemp(prefix="pyisolate-admin-"))
    try:
        shutil.copytree(ext("observed"), work / "observed", ignore=shutil.ignore_patterns("__pycache__"))
        (work / "host.py").write_text(NOBODY_HOST)
        (work / "venvs").mkdir()
        for item in [work, *work.rglob("*")]:
            os.chown(item, NOBODY, NOBODY)
        work.chmod(0o755)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def start_nobody_host(python: Path, work: Path, how: str):
    host = await as_nobody(python, work / "host.py", work / "venvs", work / "observed", how, work=work,
                           stdin=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(240):
            path = (await host.stdout.readline()).decode().strip()
    except BaseException:
        host.kill()
        await host.wait()
        raise
    if not path.endswith("/admin"):
        host.kill()
        _, err = await host.communicate()
        pytest.fail(f"the host did not start: {path!r}\n{err.decode()[-3000:]}")
    return host, path


async def end_nobody_host(host) -> bytes:
    host.stdin.close()
    try:
        async with asyncio.timeout(60):
            _, err = await host.communicate()
    finally:
        if host.returncode is None:
            host.kill()
            await host.wait()
    assert host.returncode == 0, err.decode()[-2000:]
    return err


@linux_root
async def test_the_endpoint_refuses_a_peer_of_another_uid(nobody_python, nobody_work):  # noqa: F811
    """Root passes the directory's mode, so the peer-credentials check is what refuses it."""
    host, path = await start_nobody_host(nobody_python, nobody_work, "in-process")
    answer = await asyncio.to_thread(request, path, frame({"op": "stats"}))
    assert answer == {"ok": False, "error": f"refused: uid {os.geteuid()} is not the host's user"}
    err = await end_nobody_host(host)
    assert f"refused a connection from uid {os.geteuid()}".encode() in err


@linux_root
async def test_an_unprivileged_user_sees_its_host_but_cannot_trace_its_workers(nobody_python, nobody_work):  # noqa: F811
    """As documented: without CAP_SYS_PTRACE the non-dumpable worker's PSS is not readable and
    py-spy may not attach; the command says why and what to do. RSS and CPU time are there."""
    host, _ = await start_nobody_host(nobody_python, nobody_work, "isolated")
    try:
        top = await as_nobody(nobody_python, "-m", "pyisolate", "top", "--json", "--host", str(host.pid),
                              work=nobody_work)
        async with asyncio.timeout(60):
            out, err = await top.communicate()
        assert top.returncode == 0, err.decode()
        stats = json.loads(out)["extensions"]["observed"]
        assert stats["state"] == "ready" and stats["pss"] is None and stats["rss"] > 0
        profile = await as_nobody(nobody_python, "-m", "pyisolate", "profile", "observed", "--seconds", "1",
                                  "--host", str(host.pid), "-o", nobody_work / "p.json", work=nobody_work)
        async with asyncio.timeout(60):
            out, err = await profile.communicate()
        assert profile.returncode == 1 and not (nobody_work / "p.json").exists()
        assert b"py-spy could not profile pid" in err and b"CAP_SYS_PTRACE" in err and b"non-dumpable" in err
    finally:
        await end_nobody_host(host)


# -- `pyisolate stack` and `pyisolate profile` ---------------------------------------------


async def test_stack_of_a_worker_stuck_in_a_busy_method(admin_manager):
    observed = await load(admin_manager)
    stuck = asyncio.ensure_future(observed.spin_forever())
    try:
        for _ in range(10):  # the call is sent in the task's first step
            await asyncio.sleep(0)
        code, out, err = await cli("stack", "observed", "--host", str(os.getpid()))
        assert code == 0, err
        assert f"worker pid {await observed.pid()}" in out
        assert "in spin_forever" in out and "observed/__init__.py" in out
        assert "Current thread" in out  # every thread: the loop's too
        assert err == ""  # the dump was complete (the end marker came)
    finally:
        stuck.cancel()


async def test_stack_of_a_worker_whose_loop_is_blocked(admin_manager):
    observed = await load(admin_manager)
    stuck = asyncio.ensure_future(observed.block_loop_forever())
    try:
        for _ in range(10):
            await asyncio.sleep(0)
        code, out, err = await cli("stack", "observed", "--host", str(os.getpid()))
        assert code == 0, err
        assert "in block_loop_forever" in out
    finally:
        stuck.cancel()


async def test_stats_and_stack_of_a_worker_under_bwrap(venv_root, monkeypatch):
    """Under bwrap the host holds bwrap's monitor: stats and stack reach the worker itself."""
    from tests.integration.test_bwrap import WHY_NOT

    if WHY_NOT is not None and not os.environ.get("PYISOLATE_TEST_REQUIRE_BWRAP"):
        pytest.skip(f"no bubblewrap sandbox here: {WHY_NOT}")
    monkeypatch.delenv("PYISOLATE_ADMIN", raising=False)
    config = ExtensionManagerConfig(venv_root_path=venv_root, admin=True, sandbox_backends=("landlock", "bwrap"),
                                    sandbox_mode="required", stop_timeout=1.0)  # fmt: skip
    async with ExtensionManager(ExtensionBase, config) as manager:
        observed = await load(manager)
        assert await observed.pid() == 2  # as it sees itself, in its pid namespace
        stats = pyisolate.stats(observed)
        assert stats["pid"] != manager._extensions["observed"].process.pid  # not the monitor
        with open(f"/proc/{stats['pid']}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:"))
        assert nspid.split()[-1] == "2"  # the worker's pid in the host's namespace, and 2 in its own
        stuck = asyncio.ensure_future(observed.spin_forever())
        try:
            for _ in range(10):
                await asyncio.sleep(0)
            code, out, err = await cli("stack", "observed", "--host", str(os.getpid()))
            assert code == 0, err
            assert "in spin_forever" in out and f"worker pid {stats['pid']}" in out
        finally:
            stuck.cancel()


async def test_stack_of_a_worker_stuck_in_c_code_holding_the_gil(admin_manager):
    observed = await load(admin_manager)
    stuck = asyncio.ensure_future(observed.hold_gil())
    try:
        for _ in range(10):
            await asyncio.sleep(0)
        code, out, err = await cli("stack", "observed", "--host", str(os.getpid()))
        assert code == 0, err
        assert "in hold_gil" in out and "Current thread" in out  # written by the C handler, GIL or not
    finally:
        stuck.cancel()


async def test_stack_of_the_host(admin_manager):
    await load(admin_manager)
    code, out, err = await cli("stack", "host", "--host", str(os.getpid()))
    assert code == 0, err
    assert f"host {os.getpid()}" in out and "(pyisolate-admin)" in out and "(MainThread)" in out
    assert "in run_forever" in out  # the host's event loop, waiting in its selector
    code, _, err = await cli("stack", "nope", "--host", str(os.getpid()))
    assert code == 1 and "no extension worker named 'nope'; known: observed" in err


async def test_profile_writes_speedscope_json_with_the_busy_function(admin_manager, tmp_path):
    observed = await load(admin_manager)
    busy = asyncio.ensure_future(observed.busy_for(30))
    try:
        for _ in range(10):
            await asyncio.sleep(0)
        output = tmp_path / "profile.json"
        code, out, err = await cli("profile", "observed", "--seconds", "2", "-o", str(output),
                                   "--host", str(os.getpid()))
        assert code == 0, err
        assert str(output) in out
    finally:
        busy.cancel()
    profile = json.loads(output.read_text())
    assert profile["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = [f["name"] for f in profile["shared"]["frames"]]
    busy_index = next(i for i, name in enumerate(frames) if name.endswith("busy_for"))
    samples = [s for p in profile["profiles"] for s in p["samples"]]
    assert sum(busy_index in stack for stack in samples) >= 20  # sampled at 100/s for 2 s, mostly in it


def test_profile_without_py_spy_says_what_to_install(monkeypatch, capsys):
    from pyisolate._cli import inspect
    from pyisolate._cli.main import main

    monkeypatch.setattr(inspect, "py_spy", lambda: None)
    assert main(["profile", "observed"]) == 1
    assert "pip install 'pyisolate[profile]'" in capsys.readouterr().err

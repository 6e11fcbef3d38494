"""Remote workers: the broker's tcp + CURVE listener, `pyisolate worker`, ExtensionConfig(remote=True).

The worker runs as `python -m pyisolate worker --connect ...`, on loopback, or in a network
namespace of its own joined to ours by a veth pair (root only), where cutting the link is a
real partition.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy
import pytest
import zmq

from pyisolate import (
    ExtensionBase,
    ExtensionConfig,
    ExtensionCrashedError,
    ExtensionLoadError,
    ExtensionManager,
    ExtensionManagerConfig,
    RestartPolicy,
    SandboxPolicy,
    remote_worker_command,
)
from pyisolate._curve import CurveConfig, KeyPair, create_key_files
from pyisolate.broker.protocol import BROKER, PROTOCOL_VERSION, Kind, pack_header, unpack_header
from pyisolate.errors import ConfigError

from tests.support import ext

NAME = "remote_probe"
PROBE = Path(ext("remote_probe"))


class Keys:
    """A host key pair and the probe's, as files."""

    def __init__(self, directory: Path) -> None:
        self.host_public, self.host_secret, self.host = create_key_files(directory, "host")
        self.probe_public, self.probe_secret, self.probe = create_key_files(directory, NAME)
        self.stranger_public, self.stranger_secret, self.stranger = create_key_files(directory, "stranger")

    def curve(self) -> CurveConfig:
        return CurveConfig(server_secret_key=self.host_secret, workers={NAME: self.probe_public})


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def config(venv_root: Path, keys: Keys, address: str = "127.0.0.1", **kw: object) -> ExtensionManagerConfig:
    return ExtensionManagerConfig(venv_root_path=venv_root, listen=f"tcp://{address}:*", curve=keys.curve(), **kw)


class RemoteWorker:
    """`pyisolate worker` in a child process (optionally in network namespace ``netns``)."""

    def __init__(self, endpoint: str, keys: Keys, venv_root: Path, netns: str | None = None,
                 options: tuple[str, ...] = (), argv: list[str] | None = None) -> None:
        argv = argv or [sys.executable, "-m", "pyisolate", "worker", "--connect", endpoint, "--server-key",
                        str(keys.host_public), "--key", str(keys.probe_secret), "--venv-root", str(venv_root),
                        *options, str(PROBE)]
        self.argv = ["ip", "netns", "exec", netns, *argv] if netns else argv
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> RemoteWorker:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=subprocess.DEVNULL)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()  # it stops its worker on SIGTERM
        async with asyncio.timeout(15):
            await self.proc.wait()


async def load_remote(manager: ExtensionManager[ExtensionBase], **kw: object):  # type: ignore[no-untyped-def]
    return manager.load_extension(ExtensionConfig(name=NAME, module_path="/elsewhere/remote_probe", remote=True, **kw))


# -- loopback ------------------------------------------------------------------------------


async def test_a_remote_worker_joins_and_serves_calls_both_ways_with_frames(venv_root: Path, keys: Keys) -> None:
    torch = pytest.importorskip("torch")
    async with ExtensionManager(ExtensionBase, config(venv_root, keys)) as manager:
        async with asyncio.timeout(120):  # a local worker that joins before the remote one is announced
            early = await manager.load_extension(ExtensionConfig.from_path(PROBE, name="early_probe"))
        probe = await load_remote(manager)
        assert manager.listen_endpoint is not None
        events: list[object] = []
        manager.on_event("hello", lambda extension, value: events.append((extension, value)))
        async with RemoteWorker(manager.listen_endpoint, keys, venv_root) as worker:
            async with asyncio.timeout(120):
                await probe
            assert await probe.echo({"t": (1, b"x"), 2: {3}}) == {"t": (1, b"x"), 2: {3}}
            big = {"bytes": b"\x01" * (1 << 20), "text": "y" * (1 << 18)}  # bodies past the copy threshold
            assert await probe.echo(big) == big

            async def plus_one(x: int) -> int:  # runs here, called by the remote worker
                return x + 1

            assert await probe.call_back(plus_one, 41) == 42
            await probe.shout("hello", [1, 2])
            array = numpy.arange(1 << 18, dtype=numpy.float64)  # 2 MiB: a segment, were it local
            assert numpy.array_equal(await probe.double(array), array * 2)
            tensor = torch.arange(1 << 18, dtype=torch.float32)
            doubled = await probe.double(tensor)
            assert torch.equal(doubled, tensor * 2)
            strided = torch.arange(20.0).reshape(4, 5)[:, 1::2]  # not contiguous: sent dense
            assert torch.equal(await probe.echo(strided), strided)
            # Local workers send to the remote one directly: as frames, since each was told that
            # it is on another machine (when it was announced, or as they joined after).
            local = await manager.load_extension(ExtensionConfig.from_path(PROBE, name="local_probe"))
            assert numpy.array_equal(await local.relay_double(NAME, array), array * 2)
            assert numpy.array_equal(await early.relay_double(NAME, array), array * 2)
            # (a fresh tensor: one the host sends a local worker moves into shared memory, for good)
            assert torch.equal(await local.relay_double(NAME, torch.arange(1 << 18, dtype=torch.float32)), tensor * 2)
            # Nothing went through shared memory: the host shared no segment with it.
            from pyisolate._wire import shm

            assert shm.shared_out.get(NAME.encode(), 0) == 0
            async with asyncio.timeout(10):
                while not events:
                    await asyncio.sleep(0.02)
            assert events == [(NAME, [1, 2])]
            assert manager.broker.listener is not None and manager.broker.listener.authenticated == 1
            with pytest.raises(ConfigError, match="a remote worker cannot be reloaded from the host"):
                await probe.reload()
            await probe.stop()
            assert worker.proc is not None
            async with asyncio.timeout(15):
                assert await worker.proc.wait() == 0  # the host stopped it: the command is done


async def test_a_remote_worker_is_confined_on_its_own_machine(venv_root: Path, keys: Keys, tmp_path: Path) -> None:
    """The worker machine's files and ports are out of a hostile extension's reach, bar what
    ``pyisolate worker``'s options grant (here: the host's policy, through
    ``remote_worker_command``); the one connection it needs, to the host, works."""
    secret = tmp_path / "secret.txt"  # say, the worker machine's own credentials
    secret.write_text("the machine's secret")
    (granted := tmp_path / "granted").mkdir()
    (granted / "data.txt").write_text("granted data")
    with socket.create_server(("127.0.0.1", 0)) as other:  # another service on the worker machine
        port = other.getsockname()[1]
        host = config(venv_root, keys, sandbox=SandboxPolicy(readonly_paths=(granted,)), limits={"open_files": 321})
        async with ExtensionManager(ExtensionBase, host) as manager:
            for confined in (True, False):
                probe = await load_remote(manager)
                endpoint = manager.listen_endpoint
                assert endpoint is not None
                argv = remote_worker_command(host, NAME, connect=endpoint, key_file=keys.probe_secret,
                                             extension_dir=PROBE, venv_root=venv_root, python=sys.executable)
                assert {f"--sandbox-read={granted}", "--sandbox-mode=preferred", "--limit=open_files=321"} <= set(argv)
                if not confined:
                    argv.insert(-1, "--sandbox-mode=disabled")  # the last one given counts
                elif os.geteuid() == 0 and shutil.which("setpriv"):  # as a user without privileges runs it
                    argv = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", *argv]
                async with RemoteWorker(endpoint, keys, venv_root, argv=argv):
                    async with asyncio.timeout(120):
                        await probe
                    assert await probe.echo("through the host's port") == "through the host's port"
                    assert await probe.read(str(granted / "data.txt")) == "granted data"
                    if confined:
                        assert await probe.read(str(secret)) == "PermissionError: Permission denied"
                        assert (await probe.read(str(keys.probe_secret))).startswith("PermissionError")  # its own key
                        assert (await probe.connect(port)).startswith("PermissionError")
                        assert await probe.open_files_limit() == 321  # the host's limits hold there too
                    else:  # the same probes do reach them unconfined: they can tell
                        assert await probe.read(str(secret)) == "the machine's secret"
                        assert await probe.connect(port) == "connected"
                        assert await probe.open_files_limit() != 321
                    await probe.stop()


async def test_a_manifest_asking_more_than_the_worker_machine_allows_is_refused(venv_root: Path, keys: Keys,
                                                                                   tmp_path: Path) -> None:
    """A ceiling the manifest does not fit is refused before anything starts, naming the option."""
    (extension := tmp_path / "wants_network").mkdir()
    (extension / "__init__.py").write_text("from pyisolate import ExtensionBase\n\nclass E(ExtensionBase):\n    pass\n")
    (extension / "pyproject.toml").write_text(
        '[project]\nname = "wants-network"\nversion = "0"\n\n[tool.pyisolate]\nname = "wants_network"\n'
        "[tool.pyisolate.sandbox]\nnetwork = true\n")
    argv = [sys.executable, "-m", "pyisolate", "worker", "--connect", "tcp://127.0.0.1:9", "--server-key",
            str(keys.host_public), "--key", str(keys.probe_secret), "--venv-root", str(venv_root), str(extension)]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "asks for network access" in refused.stderr and "--sandbox-network" in refused.stderr
    with (extension / "pyproject.toml").open("a") as manifest:
        manifest.write('[tool.pyisolate.limits]\nmemory = "8GiB"\n')
    refused = subprocess.run([*argv[:-1], "--sandbox-network", "--limit=memory=4GiB", argv[-1]], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "8 GiB is more than this worker machine's ceiling (--limit) of 4 GiB" in refused.stderr


def test_worker_refuses_a_connect_address_it_could_not_use(keys: Keys, venv_root: Path) -> None:
    def worker(connect: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pyisolate", "worker", "--connect", connect, "--server-key",
                               str(keys.host_public), "--key", str(keys.probe_secret), "--venv-root", str(venv_root),
                               *options, str(PROBE)],
                              capture_output=True, text=True, timeout=60)

    for bad in ("127.0.0.1:5555", "tcp://127.0.0.1", "tcp://:5555", "tcp://127.0.0.1:99999"):
        refused = worker(bad)
        assert refused.returncode == 2 and "--connect takes tcp://HOST:PORT" in refused.stderr, (bad, refused.stderr)
    ipv6 = worker("tcp://[::1]:5555")  # the sandbox lets TCP out over IPv4 only
    assert ipv6.returncode == 2 and "IPv4 only" in ipv6.stderr and "--sandbox-network" in ipv6.stderr
    unconfined = worker("tcp://[::1]:5555", "--sandbox-network", "--join-timeout", "0.1")  # tries, nobody there
    assert unconfined.returncode == 1 and "could not join tcp://[::1]:5555" in unconfined.stderr


class NameServer:
    """A DNS server on 127.0.0.1:53 (UDP) that knows one name, as an A record; it counts the
    questions for that name. The owner of its socket and thread: ``with NameServer(...)``."""

    def __init__(self, name: str, address: str) -> None:
        self.name, self.address, self.asked = name, address, 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def __enter__(self) -> NameServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()  # recvfrom fails: the thread ends
        self.thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            end = 12
            labels = []
            while query[end]:
                labels.append(query[end + 1:end + 1 + query[end]].decode())
                end += query[end] + 1
            qtype, question = query[end + 1:end + 3], query[12:end + 5]
            known = ".".join(labels) == self.name
            self.asked += known
            answers = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(self.address)
            found = known and qtype == b"\x00\x01"  # A; AAAA gets "no such record"
            flags = b"\x81\x80" if known else b"\x81\x83"  # an answer, or NXDOMAIN
            header = query[:2] + flags + b"\x00\x01" + (b"\x00\x01" if found else b"\x00\x00") + b"\x00" * 4
            self.sock.sendto(header + question + (answers if found else b""), peer)


@pytest.mark.skipif(os.geteuid() != 0, reason="binds port 53 and mounts over /etc/resolv.conf: root only")
async def test_a_confined_worker_joins_a_host_known_by_a_dns_name(venv_root: Path, keys: Keys, tmp_path: Path) -> None:
    """A confined worker cannot look names up (DNS is UDP, which its sandbox refuses):
    ``pyisolate worker`` looks the host's name up for it and hands it the address."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
    with NameServer("pyisolate-host.test", "127.0.0.1") as dns:
        async with ExtensionManager(ExtensionBase, config(venv_root, keys)) as manager:
            probe = await load_remote(manager)
            assert manager.listen_endpoint is not None
            port = manager.listen_endpoint.rsplit(":", 1)[1]
            worker = [sys.executable, "-m", "pyisolate", "worker", "--connect", f"tcp://pyisolate-host.test:{port}",
                      "--server-key", str(keys.host_public), "--key", str(keys.probe_secret), "--join-timeout", "20",
                      "--venv-root", str(venv_root), str(PROBE)]
            # The worker's command alone sees this name server (its own mount namespace).
            argv = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv),
                    *worker]
            async with RemoteWorker(manager.listen_endpoint, keys, venv_root, argv=argv):
                async with asyncio.timeout(60):
                    await probe
                assert await probe.echo("by name") == "by name"
                assert dns.asked >= 1  # through DNS, not /etc/hosts
                await probe.stop()


async def test_a_peer_without_an_allowed_key_gets_no_frame_through(venv_root: Path, keys: Keys) -> None:
    async with ExtensionManager(ExtensionBase, config(venv_root, keys)) as manager:
        probe = await load_remote(manager)
        endpoint, broker = manager.listen_endpoint, manager.broker
        assert endpoint is not None and broker.listener is not None
        before = (broker.dropped, broker.refused_joins, broker.refused)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.curve_serverkey = keys.host.public.encode()
            sock.curve_publickey, sock.curve_secretkey = keys.stranger.public.encode(), keys.stranger.secret.encode()
            sock.connect(endpoint)
            hello = msgpack.packb({"name": NAME, "secret": b"", "pid": 1})
            sock.send_multipart([BROKER, pack_header(Kind.HELLO, 0, PROTOCOL_VERSION), hello], flags=zmq.NOBLOCK)
            sock.send_multipart([b"host", pack_header(Kind.CALL, 1, "stop_all", 0, "", 0), b""], flags=zmq.NOBLOCK)
            async with asyncio.timeout(10):
                while broker.listener.denied == 0:
                    await asyncio.sleep(0.02)
            # Denied at the CURVE handshake: nothing came back, and the broker never saw a frame.
            assert not await asyncio.to_thread(sock.poll, 500)
        finally:
            sock.close(linger=0)
            ctx.term()
        assert broker.listener.authenticated == 0
        assert (broker.dropped, broker.refused_joins, broker.refused) == before
        assert broker.registry.rid_of(NAME.encode()) is None and probe.state == "starting"


def broker_has_no(manager: ExtensionManager[ExtensionBase], name: str) -> bool:
    return manager.broker.registry.rid_of(name.encode()) is None


def _join(endpoint: str, server: str, pair: KeyPair, name: str) -> list[bytes]:
    """Join as ``name`` with ``pair``; the broker's answer."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = server.encode()
        sock.curve_publickey, sock.curve_secretkey = pair.public.encode(), pair.secret.encode()
        sock.connect(endpoint)
        hello = msgpack.packb({"name": name, "secret": b"", "pid": 1})
        sock.send_multipart([BROKER, pack_header(Kind.HELLO, 0, PROTOCOL_VERSION), hello])
        assert sock.poll(10_000), "no answer from the broker"
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)
        ctx.term()


async def test_an_allowed_key_joins_only_as_its_own_extension(venv_root: Path, keys: Keys, tmp_path: Path) -> None:
    """The probe's key cannot take another remote extension's name, nor a local worker's."""
    other_public, _, _ = create_key_files(tmp_path / "more", "other")
    curve = CurveConfig(server_secret_key=keys.host_secret, workers={NAME: keys.probe_public, "other": other_public})
    cfg = ExtensionManagerConfig(venv_root_path=venv_root, listen="tcp://127.0.0.1:*", curve=curve, start_timeout=60)
    async with ExtensionManager(ExtensionBase, cfg) as manager:
        other = manager.load_extension(ExtensionConfig(name="other", module_path="/x", remote=True))
        local = manager.load_extension(ExtensionConfig(name="local_ok", module_path=ext("ok")))
        assert manager.listen_endpoint is not None
        async with asyncio.timeout(120):
            await local
        for name in ("other", "local_ok"):
            frames = await asyncio.to_thread(_join, manager.listen_endpoint, keys.host.public, keys.probe, name)
            kind, _, extra = unpack_header(frames[1])
            assert kind is Kind.REFUSED, name
            assert f"allowed to join as {NAME!r} only" in str(extra[0])
        # Nor can a process on the host's own ipc socket take a remote extension's name.
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(manager.broker.endpoint)
            hello = msgpack.packb({"name": "other", "secret": b"", "pid": 1})
            sock.send_multipart([BROKER, pack_header(Kind.HELLO, 0, PROTOCOL_VERSION), hello])
            assert await asyncio.to_thread(sock.poll, 10_000)
            kind, _, extra = unpack_header(sock.recv_multipart()[1])
        finally:
            sock.close(linger=0)
            ctx.term()
        assert kind is Kind.REFUSED and "only as a remote worker" in str(extra[0])
        assert broker_has_no(manager, "other") and other.state == "starting"
        assert await local.echo(1) == 1


async def test_a_remote_extension_whose_worker_never_joins_fails_naming_the_command(venv_root: Path,
                                                                                 keys: Keys) -> None:
    async with ExtensionManager(ExtensionBase, config(venv_root, keys, start_timeout=0.5)) as manager:
        probe = await load_remote(manager)
        with pytest.raises(ExtensionLoadError) as info:
            async with asyncio.timeout(10):
                await probe
    message = str(info.value)
    assert "did not join" in message and "pyisolate worker --connect" in message and keys.host.public in message


def test_config_refuses_tcp_without_curve_and_bad_keys(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError, match="needs curve"):
        ExtensionManagerConfig(venv_root_path=tmp_path, listen="tcp://0.0.0.0:5555")
    with pytest.raises(ConfigError, match="tcp endpoint"):
        ExtensionManagerConfig(venv_root_path=tmp_path, listen="ipc:///tmp/x", curve=keys.curve())
    with pytest.raises(ConfigError, match="neither a key"):
        CurveConfig(server_secret_key="short", workers={})
    with pytest.raises(ConfigError, match="holds no secret key"):
        CurveConfig(server_secret_key=keys.host_public, workers={})
    with pytest.raises(ConfigError, match="same public key"):
        CurveConfig(server_secret_key=keys.host_secret, workers={"a": keys.probe.public, "b": keys.probe_public})
    with pytest.raises(ConfigError, match="no file at"):
        CurveConfig(server_secret_key=keys.host_secret, workers={"a": str(tmp_path / "missing.key")})


async def test_remote_needs_the_listener_and_a_key_for_its_name(venv_root: Path, keys: Keys) -> None:
    async with ExtensionManager(ExtensionBase, ExtensionManagerConfig(venv_root_path=venv_root)) as manager:
        with pytest.raises(ConfigError, match="does not listen"):
            await load_remote(manager)
    async with ExtensionManager(ExtensionBase, config(venv_root, keys)) as manager:
        with pytest.raises(ConfigError, match="allows no key"):
            manager.load_extension(ExtensionConfig(name="unlisted", module_path="/x", remote=True))
    with pytest.raises(ConfigError, match="the host cannot watch it"):
        ExtensionConfig(name=NAME, module_path="/x", remote=True, watch=True)


def test_keys_command_writes_private_files_and_prints_the_public_key(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pyisolate", "keys", "host", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    secret, public = tmp_path / "host.key_secret", tmp_path / "host.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o600
    pair = CurveConfig(server_secret_key=secret).server
    assert f"public key {pair.public}" in out and pair.secret not in out
    again = subprocess.run([sys.executable, "-m", "pyisolate", "keys", "host", "--dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "never overwritten" in again.stderr


# -- across network namespaces -------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to ours by a veth pair: (namespace, our address, our link)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    tag = os.getpid() % 250 + 1
    ns, ours, theirs = f"psi-remote-{os.getpid()}", f"psivh{os.getpid()}"[:15], f"psivw{os.getpid()}"[:15]
    host_address, worker_address = f"10.231.{tag}.1", f"10.231.{tag}.2"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        _ip("link", "set", theirs, "netns", ns)
        _ip("addr", "add", f"{host_address}/24", "dev", ours)
        _ip("link", "set", ours, "up")
        _ip("-n", ns, "addr", "add", f"{worker_address}/24", "dev", theirs)
        _ip("-n", ns, "link", "set", theirs, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, host_address, ours
    finally:
        subprocess.run(["ip", "link", "del", ours], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


async def _build_probe_venv(venv_root: Path) -> None:
    """Build the probe's venv from here: the namespace the worker runs in has no way out to an index."""
    from pyisolate._envs import ensure_venv

    probe = ExtensionConfig.from_path(PROBE)
    async with asyncio.timeout(300):
        await ensure_venv(venv_root=venv_root, name=probe.name, dependencies=probe.dependencies,
                          share_torch=probe.share_torch, sources=probe.sources)


async def test_a_partition_fails_calls_typed_and_the_worker_rejoins(venv_root: Path, keys: Keys,
                                                                   netns: tuple[str, str, str]) -> None:
    torch = pytest.importorskip("torch")
    await _build_probe_venv(venv_root)
    ns, address, link = netns
    cfg = config(venv_root, keys, address, heartbeat_interval=0.25, heartbeat_timeout=2.0, start_timeout=60)
    async with ExtensionManager(ExtensionBase, cfg) as manager:
        probe = await load_remote(manager, restart=RestartPolicy(max_restarts=3, within=120, backoff=0.1))
        assert manager.listen_endpoint is not None
        async with RemoteWorker(manager.listen_endpoint, keys, venv_root, netns=ns):
            async with asyncio.timeout(120):
                await probe
            first_pid = await probe.pid()
            tensor = torch.ones(1 << 18)
            assert torch.equal(await probe.double(tensor), tensor * 2)

            async def plus_one(x: int) -> int:  # called by the worker in the other namespace
                return x + 1

            assert await probe.call_back(plus_one, 1) == 2
            held = asyncio.ensure_future(probe.hang())
            await probe.echo(0)  # the held call is at the worker by now
            _ip("link", "set", link, "down")
            loop = asyncio.get_running_loop()
            cut = loop.time()
            with pytest.raises(ExtensionCrashedError, match="stopped answering heartbeats"):
                async with asyncio.timeout(10):
                    await held
            assert loop.time() - cut < cfg.heartbeat_timeout + 2 * cfg.heartbeat_interval + 1.0
            waiting = asyncio.ensure_future(probe.echo("after"))  # waits: the policy restarts (a rejoin)
            _ip("link", "set", link, "up")
            async with asyncio.timeout(60):
                assert await waiting == "after"
            assert await probe.pid() != first_pid  # a new worker process joined
            assert torch.equal(await probe.double(tensor), tensor * 2)
            await probe.stop()


async def test_a_remote_worker_that_dies_is_a_crash_and_its_restart_is_a_rejoin(venv_root: Path, keys: Keys) -> None:
    cfg = config(venv_root, keys, heartbeat_interval=0.25, heartbeat_timeout=5.0)
    async with ExtensionManager(ExtensionBase, cfg) as manager:
        probe = await load_remote(manager, restart=RestartPolicy(max_restarts=3, within=120, backoff=0.1))
        assert manager.listen_endpoint is not None
        async with RemoteWorker(manager.listen_endpoint, keys, venv_root):
            async with asyncio.timeout(120):
                await probe
            pid = await probe.pid()
            held = asyncio.ensure_future(probe.hang())
            await probe.echo(0)
            os.kill(pid, signal.SIGKILL)  # its machine's process dies; `pyisolate worker` starts another
            with pytest.raises(ExtensionCrashedError, match="remote"):
                async with asyncio.timeout(15):
                    await held
            async with asyncio.timeout(60):
                assert await probe.pid() not in (pid, 0)
            await probe.stop()

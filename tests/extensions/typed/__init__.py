"""Uses the host application's registered types (tests/app_types/typedapp) and handles."""

from __future__ import annotations

import gc
import os

import pyisolate
from pyisolate import ExtensionBase
from pyisolate._rpc.context import worker_endpoint
from typedapp.results import Device, FolderType, Level, Model, Point, SavedResult, Unregistered


class Typed(ExtensionBase):
    def on_module_loaded(self, module):
        self.kept = None
        self.many = None
        self.own = []

    async def echo(self, value):
        return value

    async def kinds(self, values):
        return [f"{type(v).__module__}.{type(v).__qualname__}" for v in values]

    async def make(self):
        return [SavedResult("a.png", "sub", FolderType.temp, b"x" * 100_000), Level.high, Point(1, 2),
                Device("cuda:1"), {"nested": (FolderType.output,)}]

    async def unregistered(self):
        return Unregistered()

    async def use_model(self, model):
        return [await model.describe(), await model.predict(21), repr(model)]

    def use_model_plain(self, model):
        # plain code written for the local object: the calls block and return values
        return [model.describe(), model.predict(21)]

    async def attribute(self, model, name):
        try:
            getattr(model, name)
        except AttributeError as exc:
            return str(exc)
        return "reachable"

    async def keep(self, model):
        self.kept = model
        return None

    async def kept_is_same(self):
        return self.kept

    async def pass_on(self, model, other):
        return await pyisolate.get_actor(other).use_model(model)

    async def take_many(self, handles):
        self.many = handles
        return sum(1 for h in handles if isinstance(h, pyisolate._rpc.HandleProxy))

    def drop(self):
        self.kept = self.many = None
        self.own = []
        gc.collect()  # finalizers queue RELEASEs on the loop ahead of this answer
        return None

    async def make_own(self, n):
        self.own = [Model(f"own{i}") for i in range(n)]
        return [pyisolate.handle(m) for m in self.own]

    async def forget_own(self):
        self.own = []
        return None

    async def counts(self):
        endpoint = worker_endpoint()
        return {"exports": len(endpoint.exports), "proxies": endpoint.values.live_proxies()}

    async def write_into(self, path):
        with open(path, "w") as handle:
            handle.write("x")
        return "written"

    async def raw_call(self, ref_id, method):
        """Call a handle's reference by id, with any method name, as a hostile worker could."""
        return await worker_endpoint().remote_call(b"host", method, (), {}, ref_id)

    async def child(self):
        return os.environ.get("PYISOLATE_CHILD")

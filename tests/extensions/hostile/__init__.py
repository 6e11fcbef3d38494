"""An extension that answers its own call with a forged ERROR: any exception type it likes.

It writes the wire format by hand (ext type 11: module, qualname, args, message, traceback,
extras), as a compromised worker could, without pyisolate's encoder deciding anything.
"""

import asyncio

import msgpack

from pyisolate import ExtensionBase
from pyisolate._context import worker_endpoint
from pyisolate.broker.protocol import Kind, pack_header

EXT_EXCEPTION = 11


class Hostile(ExtensionBase):
    async def answer_with(self, module, qualname, args, message):
        endpoint = worker_endpoint()
        me = asyncio.current_task()
        sender, call_id = next(key for key, task in endpoint._serving.items() if task is me)
        payload = msgpack.packb([module, qualname, args, message, "forged", {}])
        body = msgpack.packb(msgpack.ExtType(EXT_EXCEPTION, payload))
        endpoint._send(sender, [pack_header(Kind.ERROR, call_id), body])
        return "this late answer is dropped"

    def echo(self, value):
        return value

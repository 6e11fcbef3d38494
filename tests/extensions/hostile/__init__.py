"""A plugin written to attack: it sends whatever frames it likes, at any rate, to anyone.

It talks to its worker's socket directly (``endpoint._send`` is the raw connection), so none
of the checks an honest endpoint makes on its own side apply: only the broker's and the
receivers' do.
"""

import asyncio
import mmap

import pyisolate
from pyisolate import ExtensionBase
from pyisolate._wire.codec import encode
from pyisolate.broker.protocol import Kind, pack_header


def _endpoint():
    return pyisolate._rpc.context.worker_endpoint()


def _raw(dest, kind, call_id=0, *extra, body=b"", buffers=()):
    _endpoint()._send(dest.encode(), [pack_header(Kind(kind), call_id, *extra), body, *buffers])


def _tell(fifo):
    """Write one byte to a FIFO the test reads (it waits there while its own loop is blocked)."""
    with open(fifo, "wb") as f:
        f.write(b"!")


def _my_call_from(caller):
    """The id of the call this method is serving for ``caller`` (the newest one)."""
    return max(cid for (sender, cid) in _endpoint().server._serving if sender == caller.encode())


class _ForgedRefs:
    """Codec hooks that claim any reference: what an honest endpoint would refuse to encode."""

    shm_dest, shm_sender, shm_sender_in_host, shm_owe = b"", "", False, None

    def __init__(self, owner, ref_id):
        self.ref = (owner, ref_id, 0)

    def export(self, obj):
        return self.ref if callable(obj) else None

    def resolve(self, owner, ref_id, flags):
        raise AssertionError("not used")


def _forged_cuda_tensor():
    """A CUDA tensor handle (ext 13) naming storage that does not exist."""
    import msgpack

    handle = [0, b"ipc-handle", 64, 0, b"ref-counter", 0, b"event", False]
    return msgpack.ExtType(13, msgpack.packb(["cuda", "float32", [4], [1], 0, False, handle]))


class Hostile(ExtensionBase):
    async def echo(self, value):
        return value

    async def raw(self, dest, kind, call_id=0, *extra):
        """Send one message of any kind, with any header fields, to ``dest``."""
        _raw(dest, kind, call_id, *extra)
        return True

    async def forge_answers(self, dest, first, last, value):
        """Send RESULTs for call ids first..last to ``dest`` as if we were the one it called."""
        for call_id in range(first, last + 1):
            _raw(dest, Kind.RESULT, call_id, body=encode(value)[0])
        return True

    async def flood_calls(self, dest, method, n, args=(1,)):
        """Send ``n`` CALLs to ``dest`` at once, ignoring max_in_flight, and never wait for answers."""
        body = encode([list(args), {}])[0]
        for i in range(n):
            _raw(dest, Kind.CALL, 1_000_000 + i, method, 0, "hostile", 1_000_000 + i, body=body)
        return n

    async def flood_messages(self, dest, kind, n):
        """Send ``n`` small messages of ``kind`` to ``dest`` as fast as the socket takes them."""
        for i in range(n):
            _raw(dest, kind, i, 1, 1)
        return n

    async def big_frame(self, dest, size):
        """Send one buffer frame of ``size`` bytes (untouched zero pages: nothing is allocated here)."""
        frame = mmap.mmap(-1, size)
        _endpoint()._send(dest.encode(), [pack_header(Kind.EVENT, 0, "big"), encode(None)[0], memoryview(frame)])
        return True

    async def answer_big(self, size):
        """Answer this very call with a buffer frame of ``size`` bytes, then never answer properly."""
        frame = mmap.mmap(-1, size)
        call_id = _my_call_from("host")
        _endpoint()._send(b"host", [pack_header(Kind.RESULT, call_id), encode(None)[0], memoryview(frame)])
        await asyncio.Event().wait()

    async def answer_in_frames(self, count, size):
        """Answer this call with ``count`` frames of ``size`` bytes each (each under the frame limit)."""
        call_id = _my_call_from("host")
        frames = [b"\0" * size for _ in range(count)]
        _endpoint()._send(b"host", [pack_header(Kind.RESULT, call_id), encode(None)[0], *frames])
        await asyncio.Event().wait()

    async def stream_flood(self, items):
        """Answer this call as a stream, then send ``items`` ITEMs without waiting for any credit."""
        call_id = _my_call_from("host")
        _raw("host", Kind.RESULT, call_id, "stream")
        body = encode(0)[0]
        for _ in range(items):
            _raw("host", Kind.ITEM, call_id, body=body)
        pyisolate.emit("flooded", items)  # behind every item: the host has them all when it sees this
        await asyncio.Event().wait()

    async def answer_cuda_tensor(self):
        """Answer this call with a made-up CUDA tensor handle, then never answer properly."""
        import msgpack

        call_id = _my_call_from("host")
        _endpoint()._send(b"host", [pack_header(Kind.RESULT, call_id), msgpack.packb(_forged_cuda_tensor())])
        await asyncio.Event().wait()

    async def send_cuda_tensor(self, dest, method):
        """Call ``dest.method(tensor)`` with a made-up CUDA tensor handle; say how it ended."""
        import msgpack

        try:
            return await self._call_raw(dest, method, msgpack.packb([[_forged_cuda_tensor()], {}]))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    async def send_foreign_reference(self, dest, method, owner, ref_id):
        """Call ``dest.method(ref)`` with a reference owned by ``owner``: a third actor's callable."""
        body = encode([[lambda: None], {}], _ForgedRefs(owner, ref_id))[0]
        return await self._call_raw(dest, method, body)

    async def call_ref(self, owner, ref_id):
        """Call reference ``ref_id`` of ``owner`` as if it had been given to us."""
        return await self._call_raw(owner, "", encode([[], {}])[0], ref_id)

    async def call_traced_by_hand(self, dest, method, acks, trace, *args):
        """Call ``dest.method(*args)`` with a hand-made CALL header: ``acks`` as its fifth field
        and ``trace`` (any value at all) as its sixth, the trace context."""
        return await self._call_raw(dest, method, encode([list(args), {}])[0], 0, (acks, trace))

    async def send_spans(self, body):
        """Send the host a SPANS message with ``body`` (any bytes) as its body."""
        _raw("host", Kind.SPANS, 0, body=body)
        return True

    async def _call_raw(self, dest, method, body, ref_id=0, extra=()):
        endpoint = _endpoint()
        calls = endpoint.calls
        calls._next_id += 1
        call_id = calls._next_id
        future = asyncio.get_running_loop().create_future()
        calls.pending[call_id] = (future, dest.encode())
        calls.slots.take(dest.encode())
        _raw(dest, Kind.CALL, call_id, method, ref_id, "hostile", call_id, *extra, body=body)
        return await future

    async def forge_notice(self, dest, kind, about, first, last):
        """Send broker-only notices (UNROUTABLE, LOST, GONE) to ``dest`` as if we were the broker,
        naming call ids first..last, to fail calls ``dest`` is waiting for."""
        for call_id in range(first, last + 1):
            if Kind(kind) is Kind.GONE:
                _raw(dest, kind, 0, about, body=encode(RuntimeError("forged"))[0])
            else:
                original = pack_header(Kind.RESULT if Kind(kind) is Kind.LOST else Kind.CALL, call_id)
                _raw(dest, kind, 0, about, "forged", "queue_full", body=original)
        return True

    async def object_bomb(self, dest, method):
        """Call ``dest.method`` with a 64 MiB body of empty maps: ~64 million objects to decode."""
        inner = b"\xdc" + (1000).to_bytes(2, "big") + b"\x80" * 1000
        value = b"\xdd" + (65536).to_bytes(4, "big") + inner * 65536
        body = b"\x92" + b"\x91" + value + b"\x80"  # [[value], {}]
        return await self._call_raw(dest, method, body)

    async def emit_big(self, n, size, done=None):
        """Emit ``n`` events of ``size`` bytes each, as fast as they go; then (or when one fails)
        write a byte to the FIFO ``done``, if given."""
        try:
            for _ in range(n):
                pyisolate.emit("big", bytes(size))
        finally:
            if done is not None:
                _tell(done)
        return n

    async def emit_ticks(self, n, done):
        """Emit events ``("tick", i)`` for i < n, then write a byte to the FIFO ``done``."""
        for i in range(n):
            pyisolate.emit("tick", i)
        _tell(done)
        return n

    async def answer_with(self, module, qualname, args, message):
        """Answer this very call with a hand-written ERROR of any exception type (ext 11)."""
        import msgpack

        me = asyncio.current_task()
        sender, call_id = next(key for key, task in _endpoint().server._serving.items() if task is me)
        payload = msgpack.packb([module, qualname, args, message, "forged", {}])
        body = msgpack.packb(msgpack.ExtType(11, payload))
        _endpoint()._send(sender, [pack_header(Kind.ERROR, call_id), body])
        return "this late answer is dropped"

    def dropped(self):
        endpoint = _endpoint()
        return endpoint.dropped + endpoint.calls.dropped

"""Values in and out of one actor: the codec with its hooks for references and shared memory.

Encoding turns callables into references this actor exports (``_refs.ExportTable``) and pins
shared memory for the destination; decoding turns references into proxies and collects the
shared-memory segments to acknowledge. A reference is honoured only between its owner and
the actor it was given to: a received reference must be owned by its sender (a proxy of it)
or by us and given to that sender (our own object coming back). Whole actors (``get_actor``)
are names anyone may use, so actor references pass freely. A proxy sent to an actor other
than its owner is exported again, by us (a forwarding reference, see ``refs``).
"""

from __future__ import annotations

import asyncio
import functools
import weakref

import msgpack
from collections.abc import Callable
from typing import Any

from pyisolate.broker.delivery import nbytes
from pyisolate.broker.protocol import Kind, pack_header

from .._wire import DecodeError, TypeRegistry, decode, encode
from ..errors import MessageTooLargeError
from .dispatch import handle_methods
from .flow import Acks
from .refs import FLAG_ACTOR, FLAG_ASYNC, FLAG_OBJECT, ActorProxy, ExportTable, HandleProxy, RefProxy, is_async_callable

__all__ = ["Values"]

#: References one batched RELEASE may release (its body: twice as many ints).
MAX_RELEASE_BATCH = 65536
MAX_RELEASE_BODY = 2 * MAX_RELEASE_BATCH * 9 + 5

#: Sends ``[header, body, *buffers]`` to an actor, never raising for a departed one.
SendQuiet = Callable[[bytes, list[Any]], None]


def _cuda_allowed(peer: bytes) -> str | None:
    return None


class Values:
    """The codec's RefHooks for one actor: references out and in, shared memory accounting."""

    def __init__(self, name: bytes, loop: asyncio.AbstractEventLoop, send_quiet: SendQuiet,
                 remote_call: Callable[..., Any], acks: Acks, max_message_size: int) -> None:
        self.name = name
        self.max_message_size = max_message_size
        self._loop = loop
        self._send_quiet = send_quiet
        self._remote_call = remote_call
        self._acks = acks
        self.exports = ExportTable()
        self.proxies: dict[tuple[bytes, int], weakref.ref[RefProxy | HandleProxy]] = {}
        self.types: TypeRegistry | None = None  # the application's registered types
        self._described: dict[type, tuple[str, list[str]]] = {}  # a handle's type name and methods, by type
        self.host_actors: frozenset[bytes] = frozenset()  # worker: actors living in the host
        # The codec reads these (RefHooks) while it encodes or decodes one message.
        self.shm_dest = b""
        self.shm_sender = ""
        self.shm_sender_in_host = False
        self.shm_owe: Callable[[str], None] | None = None
        self.shm_cuda: str | None = None
        #: Why CUDA tensors may not travel to or from an actor (None: they may); set by the owner.
        self.cuda_refusal: Callable[[bytes], str | None] = _cuda_allowed
        self._enc_dest = b""
        self._enc_loop: asyncio.AbstractEventLoop | None = None
        self._enc_seen: dict[tuple[int, bool], tuple[object, ...]] = {}
        self._dec_sender = b""
        self._dec_seen: set[tuple[bytes, int]] = set()
        #: RELEASEs batched this loop turn: owner -> [ref_id, count, ref_id, count, ...].
        self.releases: dict[bytes, list[int]] = {}

    # -- out -------------------------------------------------------------------------------

    def encode(self, dest: bytes, value: object, loop: asyncio.AbstractEventLoop | None,
               role: str = "") -> tuple[bytes, list[Any]]:
        """Encode ``value`` for ``dest``; callables defined on ``loop`` run there when called.
        ``role`` says what the value is, for errors in the caller's terms (see ``_codec.encode``)."""
        self._enc_dest, self._enc_loop, self._enc_seen = dest, loop, {}
        self.shm_dest = dest
        self.shm_cuda = self.cuda_refusal(dest)
        try:
            body, buffers = encode(value, self, role)
            if (buffers or len(body) > 65536) and len(body) + nbytes(buffers) > self.max_message_size:
                raise MessageTooLargeError(
                    f"a value of {len(body) + nbytes(buffers)} bytes for {dest.decode()!r} exceeds "
                    f"max_message_size={self.max_message_size}; send large data as numpy arrays or tensors "
                    "(they travel through shared memory), or raise ExtensionManagerConfig.max_message_size")
            return body, buffers
        except BaseException:
            for ref in self._enc_seen.values():  # the message is not sent: undo its counts
                if ref[0] == self.name.decode():
                    self.exports.release(ref[1], dest, 1)  # type: ignore[arg-type]
            raise
        finally:
            self._enc_seen = {}

    def export(self, obj: object) -> tuple[object, ...] | None:
        if isinstance(obj, RefProxy):
            if obj._pyisolate_owner == self._enc_dest:  # going back to its owner
                return obj._pyisolate_owner.decode(), obj._pyisolate_ref, obj._pyisolate_flags
            return self._export(obj, False, lambda: (obj._pyisolate_flags,))  # forwarded through us
        if isinstance(obj, HandleProxy):
            return self.export_object(obj)
        if isinstance(obj, ActorProxy):
            return obj._pyisolate_owner.decode(), 0, FLAG_ACTOR
        if isinstance(obj, type) or not callable(obj):
            return None
        return self._export(obj, False, lambda: (FLAG_ASYNC if is_async_callable(obj) else 0,))

    def export_object(self, obj: object) -> tuple[object, ...]:
        """The reference of a handle to ``obj``, counted for the message being encoded."""
        if isinstance(obj, HandleProxy):
            if obj._pyisolate_owner == self._enc_dest:  # going back to its owner
                return (obj._pyisolate_owner.decode(), obj._pyisolate_ref, obj._pyisolate_flags, obj._pyisolate_type,
                        sorted(obj._pyisolate_methods))
            proxy = obj  # forwarded through us: its calls go through this actor
            return self._export(obj, True, lambda: (FLAG_OBJECT, proxy._pyisolate_type,
                                                    sorted(proxy._pyisolate_methods)))
        return self._export(obj, True, lambda: (FLAG_OBJECT, *self._describe(type(obj))))

    def _export(self, obj: object, handle: bool, rest: Callable[[], tuple[object, ...]]) -> tuple[object, ...]:
        key = (id(obj), handle)
        ref = self._enc_seen.get(key)
        if ref is None:
            ref_id = self.exports.add(obj, self._enc_dest, self._enc_loop, handle)
            ref = self._enc_seen[key] = (self.name.decode(), ref_id, *rest())
        return ref

    def _describe(self, cls: type) -> tuple[str, list[str]]:
        described = self._described.get(cls)
        if described is None:
            module = getattr(cls, "__module__", None)
            name = cls.__qualname__ if module in (None, "builtins") else f"{module}.{cls.__qualname__}"
            described = self._described[cls] = (name, sorted(handle_methods(cls)))
        return described

    # -- in --------------------------------------------------------------------------------

    def decode(self, body: bytes, buffers: list[bytes], sender: bytes) -> object:
        """Decode a message from ``sender``. Shared-memory segments it names are released to the
        sender once nothing here uses them any more (``_release_soon``)."""
        self._dec_seen = set()
        self._dec_sender = sender
        self.shm_sender = sender.decode()
        self.shm_sender_in_host = sender in self.host_actors
        self.shm_cuda = self.cuda_refusal(sender)
        self.shm_owe = functools.partial(self._owe_soon, sender)
        return decode(body, buffers, self)

    def _owe_soon(self, sender: bytes, key: str) -> None:
        # A lease's finalizer: it may run in any thread, at any point of the loop's work.
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:  # our loop's thread: owed at once, so our next message carries it
            self._acks.owe(sender, [key])
            return
        try:
            self._loop.call_soon_threadsafe(self._acks.owe, sender, [key])
        except RuntimeError:  # loop closed: the sender forgets us when we go
            pass

    def resolve(self, owner: str, ref_id: int, flags: int, handle: list[Any] | None = None) -> object:
        name = owner.encode()
        if flags & FLAG_ACTOR:
            return ActorProxy(name, self._remote_call)
        is_handle = bool(flags & FLAG_OBJECT)
        if is_handle != (handle is not None):
            raise DecodeError(f"reference {ref_id} of {owner!r}: a handle's reference, and only it, carries its "
                              "type and methods")
        sender = self._dec_sender
        if name == self.name:  # one of ours, coming back
            export = self.exports.get(ref_id)
            if export is None or sender not in export.counts or export.handle != is_handle:
                raise DecodeError(f"reference {ref_id} of {owner!r} was never given to {sender.decode()!r} "
                                  "(or is released): refused")
            return export.obj
        if name != sender:
            raise DecodeError(f"{sender.decode()!r} sent a reference owned by {owner!r}: only its owner "
                              "can hand out a reference")
        key = (name, ref_id)
        entry = self.proxies.get(key)
        proxy = entry() if entry is not None else None
        if proxy is not None and isinstance(proxy, HandleProxy) != is_handle:
            raise DecodeError(f"reference {ref_id} of {owner!r} changed from a callable to a handle or back: refused")
        if proxy is None:
            cell = [0]
            if handle is not None:
                proxy = HandleProxy(name, ref_id, flags, self._remote_call, cell, handle[0], frozenset(handle[1]))
            else:
                proxy = RefProxy(name, ref_id, flags, self._remote_call, cell)
            weakref.finalize(proxy, self._release_soon, name, ref_id, cell)
            self.proxies[key] = weakref.ref(proxy)
        if key not in self._dec_seen:
            self._dec_seen.add(key)
            proxy._pyisolate_cell[0] += 1
        return proxy

    def live_proxies(self) -> int:
        """Proxies of other actors' objects alive here."""
        return sum(1 for ref in self.proxies.values() if ref() is not None)

    def on_release(self, sender: bytes, extra: list[object], body: bytes = b"") -> None:
        """RELEASE: ``sender`` dropped received copies of our references: ``[ref_id, count]`` in the
        header, or a batch of such pairs as a msgpack array of ints in the body."""
        if len(extra) == 2 and type(extra[0]) is int and type(extra[1]) is int:
            self.exports.release(extra[0], sender, extra[1])
            return
        if extra or not body or len(body) > MAX_RELEASE_BODY:
            return
        try:
            pairs = msgpack.unpackb(body, use_list=True, max_array_len=2 * MAX_RELEASE_BATCH)
        except Exception:
            return
        if type(pairs) is not list or len(pairs) % 2 or not all(type(n) is int for n in pairs):
            return
        for i in range(0, len(pairs), 2):
            self.exports.release(pairs[i], sender, pairs[i + 1])

    def drop_peer(self, peer: bytes) -> None:
        """``peer`` is gone: it holds none of our references any more."""
        self.exports.drop_receiver(peer)

    def _release_soon(self, owner: bytes, ref_id: int, cell: list[int]) -> None:
        # A finalizer: it may run in any thread, at any point of the loop's work.
        try:
            self._loop.call_soon_threadsafe(self._release, owner, ref_id, cell[0])
        except RuntimeError:  # loop closed: the owner forgets us when we go
            pass

    def _release(self, owner: bytes, ref_id: int, count: int) -> None:
        """Batch one RELEASE: sent with the others of this loop turn, or ahead of our next message."""
        entry = self.proxies.get((owner, ref_id))
        if entry is not None and entry() is None:
            del self.proxies[(owner, ref_id)]
        if not self.releases:
            self._loop.call_soon(self.flush_releases)
        self.releases.setdefault(owner, []).extend((ref_id, count))

    def flush_releases(self) -> None:
        """Send the batched RELEASEs, one message per owner (per MAX_RELEASE_BATCH pairs)."""
        batches, self.releases = self.releases, {}
        for owner, pairs in batches.items():
            if len(pairs) == 2:
                self._send_quiet(owner, [pack_header(Kind.RELEASE, 0, pairs[0], pairs[1]), b""])
                continue
            step = 2 * MAX_RELEASE_BATCH
            for i in range(0, len(pairs), step):
                self._send_quiet(owner, [pack_header(Kind.RELEASE, 0), msgpack.packb(pairs[i:i + step])])

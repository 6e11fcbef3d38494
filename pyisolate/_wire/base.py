"""What every part of the codec shares: limits, ext codes, per-thread packers, the decoder.

The codec is split by purpose: this module, ``arrays`` (numpy scalars and arrays),
``walk`` (the slow encode path), ``exceptions`` (exceptions) and ``codec`` (the
public encode and decode, built-in types). Imports run one way, towards this module; the
recursion from packing back into any encoder goes through _ENCODERS and _DECODERS, which
``codec`` fills, and through _find_encoder, which ``codec`` installs.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgpack

from ..errors import EncodeError, ProtocolError
from .types import TypeRegistry

BUFFER_THRESHOLD: int = 64 * 1024
MAX_DEPTH: int = 64
#: Objects (containers and their items) one message may decode into. Every object takes at
#: least one byte of the body, so a body this small needs no counting; past it, decoding counts
#: and stops at the limit, before a body of empty maps turns into gigabytes of dicts.
MAX_OBJECTS: int = 1 << 20

EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_BIGINT, EXT_COMPLEX, EXT_BYTEARRAY = 1, 2, 3, 4, 5, 6
EXT_BYTES_BUFFER, EXT_BYTEARRAY_BUFFER, EXT_NP_SCALAR, EXT_NP_ARRAY, EXT_EXCEPTION = 7, 8, 9, 10, 11
EXT_REF, EXT_TENSOR, EXT_SHM_ARRAY, EXT_REGISTERED = 12, 13, 14, 15
#: numpy arrays at least this big travel through shared memory between actors.
SHM_THRESHOLD: int = 1 << 20


class RefHooks(Protocol):
    """How an endpoint turns callables and proxies into references, and back (see _rpc)."""

    def export(self, obj: object) -> tuple[object, ...] | None:
        """(owner actor, ref id, flags) for ``obj`` (and for a handle, its type name and methods),
        or None if it is not a reference."""

    def export_object(self, obj: object) -> tuple[object, ...]:
        """The reference of a handle to ``obj`` (``pyisolate.handle``, or a type registered by reference)."""

    def resolve(self, owner: str, ref_id: int, flags: int, handle: list[Any] | None) -> object:
        """The object for a received reference (a proxy, or our own object coming back);
        ``handle`` is a handle's [type name, methods], None for other references."""

    # The application's registered types (``types.TypeRegistry``), or None.
    types: TypeRegistry | None

    # Shared memory: who we are encoding for, who sent what we decode, how to release what it
    # shared once nothing here uses it (None: never released, e.g. a message decoded twice);
    # and why CUDA tensors may not travel to or from that peer (None: they may).
    shm_dest: bytes
    shm_sender: str
    shm_sender_in_host: bool
    shm_owe: Callable[[str], None] | None
    shm_cuda: str | None

Buffer = bytes | bytearray | memoryview


class DecodeError(ProtocolError, ValueError):
    """A message body or its buffers cannot be decoded here (malformed, or e.g. numpy missing).

    A ProtocolError, so callers catching ``pyisolate.PyisolateError`` see it; a ValueError too.
    """


_ExtType = msgpack.ExtType
_new_tuple = tuple.__new__


def _ext(code: int, data: bytes) -> object:
    """msgpack.ExtType(code, data) without its validating __new__ (a third of a tuple's cost)."""
    return _new_tuple(_ExtType, (code, data))


_U32 = struct.Struct("<I")
_SCALARS = frozenset({type(None), bool, int, float, str, complex})
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})
#: What travels: the one list, also in docs/protocol.md ("Types that travel"), which a test
#: keeps equal to this.
TRAVELS = ("None, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset, "
           "exceptions, numpy arrays and numpy scalars, torch tensors (between actors), callables and "
           "actor proxies (as references, between actors), the application's registered types and "
           "handles (pyisolate.TypeRegistry, pyisolate.handle; between actors)")
_SUPPORTED = f"supported types are {TRAVELS} (docs/protocol.md, Values)"
#: Added to the error for an object of an application class nobody registered.
REGISTER_HINT = ("; to send it, register its class in the host's TypeRegistry (ExtensionManagerConfig.types; "
                 "by value or by_reference=True), or wrap the object in pyisolate.handle() "
                 "(docs/guides/host-types.md)")


def base_value(obj: object) -> object:
    """A subclass of str, int, float, bytes, tuple, list or dict as a value of its base type
    (lossy: the subclass is not kept), or ``NOT_BUILTIN``. Base methods only, so an override
    of ``__str__`` or ``__iter__`` cannot change what is sent."""
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return int.__int__(obj)
    if isinstance(obj, float):
        return float.__float__(obj)
    if isinstance(obj, bytes):
        return bytes(memoryview(obj))
    if isinstance(obj, tuple):
        return tuple(tuple.__iter__(obj))
    if isinstance(obj, list):
        return list(list.__iter__(obj))
    if isinstance(obj, dict):
        return dict(dict.items(obj))
    return NOT_BUILTIN


NOT_BUILTIN = object()


def _type_name(t: type) -> str:
    module = getattr(t, "__module__", None)
    return t.__qualname__ if module in (None, "builtins") else f"{module}.{t.__qualname__}"


# --- encoding ---------------------------------------------------------------------------

class _Thread:
    """Per-thread state: packers by nesting level (a Packer cannot be re-entered), the buffers
    of the encode in progress, and a decoder reused for bodies without buffers."""

    __slots__ = ("packers", "level", "buffers", "active", "decoder", "refs")

    def __init__(self) -> None:
        self.packers: list[Any] = []
        self.level = 0
        self.buffers: list[bytes | memoryview] = []
        self.active: set[int] = set()  # ids of exceptions being encoded, to catch cycles
        self.decoder = _Decoder(())
        self.refs: RefHooks | None = None  # set for the length of one encode()


_local = threading.local()


def _thread() -> _Thread:
    try:
        state: _Thread = _local.state
    except AttributeError:
        state = _local.state = _Thread()
    return state


def _pack(st: _Thread, value: object) -> bytes:
    level = st.level
    if level > MAX_DEPTH:
        raise EncodeError(f"value nested deeper than MAX_DEPTH={MAX_DEPTH}")
    if level == len(st.packers):
        st.packers.append(msgpack.Packer(use_bin_type=True, strict_types=True, datetime=False,
                                         default=_default))
    st.level = level + 1
    try:
        body: bytes = st.packers[level].pack(value)
    finally:
        st.level = level
    return body


# Encoders by exact type; codec fills it, arrays adds numpy types as it meets them.
_ENCODERS: dict[type, Callable[[Any], object]] = {}


def _no_encoder(obj: object) -> Callable[[Any], object]:
    raise EncodeError(f"cannot send value of type {_type_name(type(obj))!r}: {_SUPPORTED}")


def unsupported(obj: object) -> str:
    """Why ``obj`` cannot travel: what does, and, for an application's object, how to send it."""
    t = type(obj)
    text = _SUPPORTED
    if t.__module__ not in ("builtins", None) and not callable(obj):
        refs = _thread().refs
        types = getattr(refs, "types", None)
        base = types.registered_base(t) if types is not None else None
        if base is not None:
            return (f"{text}; its base class {base.cls.__qualname__} is registered as {base.name!r}, but only that "
                    f"exact class matches: register {t.__qualname__} too")
        text += REGISTER_HINT
    return text


# The encoder for a value whose type is not in _ENCODERS, or EncodeError. codec, the one
# module that knows every encoder (exceptions, numpy), installs the real one at import.
_find_encoder: Callable[[object], Callable[[Any], object]] = _no_encoder


def _default(obj: object) -> object:
    """msgpack's hook for every value it does not pack natively; dispatch on the exact type."""
    encoder = _ENCODERS.get(type(obj))
    if encoder is None:
        encoder = _find_encoder(obj)
    return encoder(obj)


def _to_buffer(data: bytes | memoryview) -> int:
    buffers = _thread().buffers
    buffers.append(data)
    return len(buffers) - 1


# --- decoding ---------------------------------------------------------------------------

class _Decoder:
    """The state of one decode: its buffer frames, which are taken, ext nesting depth, and
    (for a body that could hold more than MAX_OBJECTS objects) how many objects may still come."""

    __slots__ = ("buffers", "used", "depth", "refs", "budget")

    def __init__(self, buffers: Sequence[Buffer], refs: RefHooks | None = None, counted: bool = False) -> None:
        self.buffers = buffers
        self.refs = refs
        self.used: set[int] = set()
        self.depth = 0
        self.budget = MAX_OBJECTS if counted else -1

    def unpack(self, data: bytes) -> object:
        n = len(data)
        if self.budget < 0:
            return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False,
                                   ext_hook=self.ext_hook, max_str_len=n, max_bin_len=n,
                                   max_array_len=n, max_map_len=n // 2, max_ext_len=n)
        limit = min(n, MAX_OBJECTS)
        try:
            return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False,
                                   ext_hook=self.ext_hook, max_str_len=n, max_bin_len=n,
                                   max_array_len=limit, max_map_len=limit // 2, max_ext_len=n,
                                   list_hook=self._count_list, object_hook=self._count_map)
        except ValueError as exc:
            if "max_array_len" in str(exc) or "max_map_len" in str(exc):  # one container over the limit
                self._spend(MAX_OBJECTS + 1)
            raise

    def _count_list(self, items: list[Any]) -> list[Any]:
        self._spend(len(items) + 1)
        return items

    def _count_map(self, items: dict[Any, Any]) -> dict[Any, Any]:
        self._spend(2 * len(items) + 1)
        return items

    def _spend(self, objects: int) -> None:
        self.budget -= objects
        if self.budget < 0:
            raise DecodeError(f"a value of more than MAX_OBJECTS={MAX_OBJECTS} objects (containers and their "
                              "items) is refused; send large sequences as numpy arrays")

    def ext_hook(self, code: int, data: bytes) -> object:
        handler = _DECODERS.get(code)
        if handler is None:
            raise DecodeError(f"unknown ext type code {code}")
        return handler(self, data)

    def nested(self, data: bytes, what: str) -> list[Any]:
        if self.depth >= MAX_DEPTH:
            raise DecodeError(f"value nested deeper than MAX_DEPTH={MAX_DEPTH}")
        self.depth += 1
        try:
            items = self.unpack(data)
        finally:
            self.depth -= 1
        if type(items) is not list:
            raise DecodeError(f"{what} payload must be a msgpack array")
        return items

    def take(self, index: object) -> Buffer:
        if type(index) is not int or not 0 <= index < len(self.buffers):
            raise DecodeError(f"buffer index {index!r} is out of range ({len(self.buffers)} buffers)")
        if index in self.used:
            raise DecodeError(f"buffer {index} is referenced twice")
        self.used.add(index)
        return self.buffers[index]

    def take_packed(self, data: bytes) -> Buffer:
        if len(data) != 4:
            raise DecodeError("a buffer reference must be 4 bytes")
        return self.take(_U32.unpack(data)[0])


# Decoders by ext code; codec fills it.
_DECODERS: dict[int, Callable[[_Decoder, bytes], object]] = {}

"""Values on the wire: msgpack plus a closed set of extension types, never pickle.

``encode(value)`` gives ``(body, buffers)``: ``body`` is msgpack, and bytes, bytearray and
numpy data of at least BUFFER_THRESHOLD bytes ride in ``buffers`` (extra zmq frames, not
copied) while the body holds only their index. ``decode`` treats its input as hostile: sizes,
indexes, dtypes, shapes and nesting are checked, and anything malformed raises DecodeError.

msgpack carries None, bool, int in [-2**63, 2**64), float, str, small bytes, list and dict
(keys keep their type). Everything else is one of these ext types, the whole set::

    code  type              ext payload
    1     tuple             msgpack array of the items
    2     set               msgpack array of the items
    3     frozenset         msgpack array of the items
    4     int (big)         two's complement, little-endian, signed
    5     complex           real, imag: two little-endian float64
    6     bytearray         the bytes themselves (below BUFFER_THRESHOLD)
    7     bytes, buffer     uint32 LE index into buffers
    8     bytearray, buffer uint32 LE index into buffers
    9     numpy scalar      u8 n, n ASCII bytes "<dtype.str>/<dtype.char>", the raw value
    10    numpy array       u16 LE n, n bytes of msgpack [dtype.str, shape, buffer index or
                          nil], then the C-order data when inline (nil)
    11    exception         msgpack [module, qualname, args, str(exc), traceback, extras]
    12    reference         msgpack [owner actor, ref id, flags]: a callable or actor proxy
    13    torch tensor      msgpack [device, dtype, shape, stride, offset, requires_grad,
                          segment id or buffer index (cpu), or CUDA IPC handle (cuda)]; see ``tensors``
    14    numpy array, shm  msgpack [segment id, dtype.str, shape, strides, offset]; see ``shm``
    15    registered value  msgpack [registered name, wire form]: a type the application
                          registered (``types.TypeRegistry``), rebuilt by the receiver's registry

A handle (``pyisolate.handle``, or a type registered by reference) is a reference (ext 12) of
five fields: [owner actor, ref id, flags, type name, public method names].

The fast path is msgpack's C packer alone. Because it packs bytes, bytearray and memoryview
natively, the body is scanned (C speed) for bin headers and for more container headers than
MAX_DEPTH; only then is the value walked in Python, to wrap bytearray and large bytes and to
check depth, and packed again. Paths in EncodeError messages are computed only on failure.
(A msgpack.ExtType or msgpack.Timestamp given to encode is packed as msgpack's own; decode
returns msgpack.Timestamp for ext -1. Neither is part of the set; both are inert data.)

This module holds encode and decode and the built-in types; the rest lives beside it, each
part importing only those below: ``base`` (limits, ext codes, per-thread packers, the
decoder), ``arrays`` (codes 9, 10, 14), ``tensors`` (code 13), ``walk`` (the slow path),
``exceptions`` (code 11).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import EncodeError, RemoteError
from . import base
from .arrays import _decode_ndarray, _decode_np_scalar, _decode_shm_array, _find_numpy_encoder
from .base import (
    _CONTAINERS,
    _DECODERS,
    _ENCODERS,
    _SCALARS,
    _U32,
    BUFFER_THRESHOLD,
    EXT_BIGINT,
    EXT_BYTEARRAY,
    EXT_BYTEARRAY_BUFFER,
    EXT_BYTES_BUFFER,
    EXT_COMPLEX,
    EXT_EXCEPTION,
    EXT_FROZENSET,
    EXT_NP_ARRAY,
    EXT_NP_SCALAR,
    EXT_REF,
    EXT_REGISTERED,
    EXT_SET,
    EXT_SHM_ARRAY,
    EXT_TENSOR,
    EXT_TUPLE,
    MAX_DEPTH,
    MAX_OBJECTS,
    NOT_BUILTIN,
    Buffer,
    DecodeError,
    RefHooks,
    _Decoder,
    _ext,
    _pack,
    _thread,
    _to_buffer,
    _type_name,
    base_value,
    unsupported,
)
from .exceptions import _decode_exception, _encode_exception, _safe_str
from .tensors import decode_tensor, encode_tensor, is_tensor
from .types import Handle, Registered
from .walk import _Binary, _ExceptionArgs, _locate, _Unsendable, _walk

__all__ = ["BUFFER_THRESHOLD", "MAX_BODY_BYTES", "MAX_DEPTH", "MAX_OBJECTS", "DecodeError", "decode",
           "decode_exception", "encode", "encode_exception"]

MAX_BODY_BYTES: int = 256 * 1024 * 1024

_COMPLEX = struct.Struct("<dd")
# Every nesting level puts one of these first bytes in the body (array, map, ext headers), so
# a body holding at most MAX_DEPTH of them cannot nest deeper: the check costs one translate.
_NOT_NESTING = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xC7 <= b <= 0xC9
                                                   or 0xD4 <= b <= 0xD8 or b >= 0xDC))


# --- encoding ---------------------------------------------------------------------------

def encode(value: object, refs: RefHooks | None = None, role: str = "") -> tuple[bytes, list[bytes | memoryview]]:
    """Encode a value for another process.

    Args:
        value: What to send.
        refs: Turns callables and proxies into references (ext 12); without it they cannot travel.
        role: What the value is, for error messages in the caller's terms: ``"arguments"``
            (a call's ``[args, kwargs]``: "argument 2", "keyword argument 'x'"), ``"result"``,
            ``"event"``, ``"item"`` (of a stream); ``""``: a path such as ``[0]['x']``.

    Returns:
        ``(body, buffers)``: the msgpack body and the large binary frames it refers to. Buffers
        alias the caller's objects (zero-copy): do not mutate those until they are sent.

    Raises:
        EncodeError: a value cannot travel; the message names its type and path.
    """
    st = _thread()
    outer, buffers, outer_refs = st.buffers, list[bytes | memoryview](), st.refs
    st.buffers = buffers  # a fresh list: encode may run inside encode (an arg's __repr__)
    st.refs = refs
    try:
        if _binary_near_top(value):  # spare packing a big blob into the body just to find it there
            value = _walk(value, 0)
        body = _pack(st, value)
        if 0xC4 in body or 0xC5 in body or 0xC6 in body or _may_nest_deeper(body):
            prepared = _walk(value, 0)  # a bin header: maybe a bytearray or large bytes inside
            if prepared is not value:
                buffers.clear()
                body = _pack(st, prepared)
    except _Unsendable as exc:
        raise EncodeError(exc.describe(role)) from None
    except (EncodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _locate(value, exc, role) from None
    finally:
        st.buffers = outer
        st.refs = outer_refs
    return body, buffers


def encode_exception(exc: BaseException) -> tuple[bytes, list[bytes | memoryview]]:
    """Encode an exception: type name, args (repr for those that cannot travel), message, traceback."""
    try:
        return encode(exc)
    except EncodeError:  # only if even the reprs cannot travel (nested too deep)
        return encode(RemoteError(_safe_str(exc), remote_type=_type_name(type(exc))))


def _big_binary(obj: object) -> bool:
    t = type(obj)
    return t is bytearray or (t is bytes and len(obj) >= BUFFER_THRESHOLD)  # type: ignore[arg-type]


def _binary_near_top(value: object) -> bool:
    """Whether a bytearray or large bytes sits within two levels of ``value`` (a call's
    ``[args, kwargs]`` puts arguments at the second): cheap, and catches the usual blob."""
    if _big_binary(value):
        return True
    for item in _children(value):
        if _big_binary(item) or any(_big_binary(x) for x in _children(item)):
            return True
    return False


def _children(value: object) -> Iterable[object]:
    t = type(value)
    if t is list or t is tuple:
        return value  # type: ignore[return-value]
    return value.values() if t is dict else ()  # type: ignore[attr-defined]


def _may_nest_deeper(body: bytes) -> bool:
    return len(body) > MAX_DEPTH and len(body.translate(None, _NOT_NESTING)) > MAX_DEPTH


def _find_encoder(obj: object) -> Callable[[Any], object]:
    refs = _thread().refs
    if refs is not None and (types := getattr(refs, "types", None)) is not None \
            and (entry := types.entry(type(obj))) is not None:
        return _registered_encoder(entry)  # first: an IntEnum or a NamedTuple is a builtin's subclass too
    if isinstance(obj, BaseException):
        return _encode_exception
    if is_tensor(obj):
        return _encode_tensor
    encoder = _find_numpy_encoder(obj)  # before builtin subclasses: np.float64 is a float
    if encoder is None:
        if base_value(obj) is not NOT_BUILTIN:  # a subclass of a builtin travels as its base type
            return _encode_base
        if refs is not None and (ref := refs.export(obj)) is not None:
            return lambda _: _ext(EXT_REF, _pack(_thread(), list(ref)))
        raise EncodeError(f"cannot send value of type {_type_name(type(obj))!r}: {unsupported(obj)}")
    return encoder


def _registered_encoder(entry: Registered) -> Callable[[Any], object]:
    if entry.by_reference:
        return _encode_handle
    to_wire, name = entry.to_wire, entry.name
    assert to_wire is not None

    def encode_registered(obj: object) -> object:
        try:
            wire = to_wire(obj)
        except Exception as exc:
            raise EncodeError(f"the encode function of registered type {name!r} raised {type(exc).__name__}: "
                              f"{exc}") from None
        try:
            wire = _walk(wire, 0)  # wrap its binaries, as for any value
        except _Unsendable as exc:
            raise EncodeError(f"registered type {name!r}: its wire form cannot travel: {exc.describe()}") from None
        return _ext(EXT_REGISTERED, _pack(_thread(), [name, wire]))
    return encode_registered


def _encode_handle(obj: object) -> object:
    st = _thread()
    if type(obj) is Handle:
        obj = obj.obj
    if st.refs is None:
        raise EncodeError("handles (pyisolate.handle, types registered by_reference) travel only between actors")
    return _ext(EXT_REF, _pack(st, list(st.refs.export_object(obj))))


def _encode_base(obj: object) -> object:
    """A subclass of a builtin as its base value; ready to pack, since msgpack calls its hook
    once per value (a tuple, or an int past 64 bits, is made an ext type here)."""
    value = base_value(obj)
    if type(value) is tuple or (type(value) is int and not -(2**63) <= value < 2**64):
        return _ENCODERS[type(value)](value)
    return value


base._find_encoder = _find_encoder  # for _default, msgpack's hook in every packer


def _encode_binary(obj: _Binary) -> object:
    data, mutable = obj.data, type(obj.data) is bytearray
    if len(data) < BUFFER_THRESHOLD:
        return _ext(EXT_BYTEARRAY, bytes(data))
    index = _to_buffer(memoryview(data) if isinstance(data, bytearray) else data)
    return _ext(EXT_BYTEARRAY_BUFFER if mutable else EXT_BYTES_BUFFER, _U32.pack(index))


_ENCODERS[tuple] = lambda o: _ext(EXT_TUPLE, _pack(_thread(), list(o)))
_ENCODERS[set] = lambda o: _ext(EXT_SET, _pack(_thread(), list(o)))
_ENCODERS[frozenset] = lambda o: _ext(EXT_FROZENSET, _pack(_thread(), list(o)))
_ENCODERS[int] = lambda o: _ext(EXT_BIGINT, o.to_bytes(o.bit_length() // 8 + 1, "little", signed=True))
_ENCODERS[complex] = lambda o: _ext(EXT_COMPLEX, _COMPLEX.pack(o.real, o.imag))
_ENCODERS[_Binary] = _encode_binary
_ENCODERS[_ExceptionArgs] = _encode_exception
_ENCODERS[Handle] = _encode_handle


# --- decoding ---------------------------------------------------------------------------

def decode(body: Buffer, buffers: Sequence[Buffer] = (), refs: RefHooks | None = None) -> object:
    """Decode a body (and its buffer frames) sent by another, untrusted, process.

    ``refs`` resolves references (ext 12); without it a reference is refused.

    Raises:
        DecodeError: anything malformed, too large, too deep or of an unknown type.
    """
    try:
        size = len(body) if type(body) is bytes else memoryview(body).nbytes
    except TypeError:
        raise DecodeError(f"a message body must be bytes, not {type(body).__qualname__}") from None
    if size > MAX_BODY_BYTES:
        raise DecodeError(f"message body of {size} bytes exceeds MAX_BODY_BYTES={MAX_BODY_BYTES}")
    data = body if type(body) is bytes else memoryview(body).tobytes()
    if size > MAX_OBJECTS:  # big enough to hold too many objects: count them as they come
        decoder = _Decoder(buffers, refs, counted=True)
    elif buffers or refs is not None:
        decoder = _Decoder(buffers, refs)
    else:
        decoder = _thread().decoder
    try:
        value = decoder.unpack(data)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:
        raise DecodeError(f"malformed message body: {type(exc).__name__}: {exc}") from exc
    if len(decoder.used) != len(buffers):
        raise DecodeError(f"{len(buffers)} buffers were sent but {len(decoder.used)} are used")
    if _may_nest_deeper(data) and (type(value) in _CONTAINERS or isinstance(value, BaseException)):
        _check_depth(value, 0)
    return value


def decode_exception(body: Buffer, buffers: Sequence[Buffer] = (), refs: RefHooks | None = None) -> BaseException:
    """Decode what encode_exception made: the same type where safe, else RemoteError."""
    exc = decode(body, buffers, refs)
    if not isinstance(exc, BaseException):
        raise DecodeError(f"expected an exception, got {type(exc).__qualname__}")
    return exc


def _decode_bytes_buffer(dec: _Decoder, data: bytes) -> bytes:
    buf = dec.take_packed(data)
    return buf if type(buf) is bytes else memoryview(buf).tobytes()


def _decode_int(dec: _Decoder, data: bytes) -> int:
    if not data:
        raise DecodeError("empty big int payload")
    return int.from_bytes(data, "little", signed=True)


def _decode_complex(dec: _Decoder, data: bytes) -> complex:
    if len(data) != 16:
        raise DecodeError("a complex payload must be 16 bytes")
    return complex(*_COMPLEX.unpack(data))


def _encode_tensor(t: Any) -> object:
    st = _thread()
    if st.refs is None:
        raise EncodeError("torch tensors travel only between actors, as shared-memory handles")
    return _ext(EXT_TENSOR, _pack(st, encode_tensor(t, st.refs.shm_dest, getattr(st.refs, "shm_cuda", None))))


def _decode_tensor(dec: _Decoder, data: bytes) -> object:
    if dec.refs is None:
        raise DecodeError("a tensor handle is not accepted here")
    refs = dec.refs
    return decode_tensor(dec.nested(data, "tensor"), refs.shm_sender, refs.shm_sender_in_host, refs.shm_owe,
                         dec.take, getattr(refs, "shm_cuda", None))


#: Bounds of a handle's description: its type name, and its public methods (count and name).
MAX_HANDLE_METHODS, MAX_NAME_CHARS = 4096, 256


def _decode_ref(dec: _Decoder, data: bytes) -> object:
    if dec.refs is None:
        raise DecodeError("a reference (callable or proxy) is not accepted here")
    fields = dec.nested(data, "reference")
    if len(fields) not in (3, 5) or type(fields[0]) is not str or type(fields[1]) is not int \
            or type(fields[2]) is not int:
        raise DecodeError("a reference payload must be [owner, ref_id, flags] or, for a handle, [owner, ref_id, "
                          "flags, type name, methods]")
    handle = None
    if len(fields) == 5:
        type_name, methods = fields[3], fields[4]
        if type(type_name) is not str or len(type_name) > MAX_NAME_CHARS or type(methods) is not list \
                or len(methods) > MAX_HANDLE_METHODS \
                or not all(type(m) is str and m.isidentifier() and len(m) <= MAX_NAME_CHARS for m in methods):
            raise DecodeError(f"a handle must name its type (at most {MAX_NAME_CHARS} characters) and list at most "
                              f"{MAX_HANDLE_METHODS} method names (identifiers)")
        handle = [type_name, methods]
    return dec.refs.resolve(fields[0], fields[1], fields[2], handle)


def _decode_registered(dec: _Decoder, data: bytes) -> object:
    fields = dec.nested(data, "registered value")
    if len(fields) != 2 or type(fields[0]) is not str:
        raise DecodeError("a registered value's payload must be [name, wire form]")
    name = fields[0]
    types = getattr(dec.refs, "types", None)
    entry = types.named(name) if types is not None else None
    if entry is None:
        raise DecodeError(f"a value of registered type {name[:MAX_NAME_CHARS]!r} arrived, but this process has no "
                          "such type in its TypeRegistry; register it in the function named by "
                          "ExtensionManagerConfig.types, which the host and every worker run")
    if entry.by_reference:
        raise DecodeError(f"{name!r} is registered by reference here: its values arrive as handles, never by value")
    assert entry.from_wire is not None
    try:
        return entry.from_wire(fields[1])
    except Exception as exc:
        raise DecodeError(f"cannot rebuild a value of registered type {name!r}: {type(exc).__name__}: {exc}") from None


def _check_depth(obj: object, depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise DecodeError(f"value nested deeper than MAX_DEPTH={MAX_DEPTH}")
    if isinstance(obj, BaseException):
        children: Any = obj.args
    elif type(obj) is dict:
        children = [*obj.keys(), *obj.values()]
    else:
        children = obj
    for child in children:
        t = type(child)
        if t in _CONTAINERS or (t not in _SCALARS and isinstance(child, BaseException)):
            _check_depth(child, depth + 1)


_DECODERS[EXT_TUPLE] = lambda dec, data: tuple(dec.nested(data, "tuple"))
_DECODERS[EXT_SET] = lambda dec, data: set(dec.nested(data, "set"))
_DECODERS[EXT_FROZENSET] = lambda dec, data: frozenset(dec.nested(data, "frozenset"))
_DECODERS[EXT_BIGINT] = _decode_int
_DECODERS[EXT_COMPLEX] = _decode_complex
_DECODERS[EXT_BYTEARRAY] = lambda dec, data: bytearray(data)
_DECODERS[EXT_BYTES_BUFFER] = _decode_bytes_buffer
_DECODERS[EXT_BYTEARRAY_BUFFER] = lambda dec, data: bytearray(dec.take_packed(data))
_DECODERS[EXT_NP_SCALAR] = _decode_np_scalar
_DECODERS[EXT_NP_ARRAY] = _decode_ndarray
_DECODERS[EXT_EXCEPTION] = _decode_exception
_DECODERS[EXT_REF] = _decode_ref
_DECODERS[EXT_TENSOR] = _decode_tensor
_DECODERS[EXT_SHM_ARRAY] = _decode_shm_array
_DECODERS[EXT_REGISTERED] = _decode_registered

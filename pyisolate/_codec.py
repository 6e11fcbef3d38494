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

The fast path is msgpack's C packer alone. Because it packs bytes, bytearray and memoryview
natively, the body is scanned (C speed) for bin headers and for more container headers than
MAX_DEPTH; only then is the value walked in Python, to wrap bytearray and large bytes and to
check depth, and packed again. Paths in EncodeError messages are computed only on failure.
(A msgpack.ExtType or msgpack.Timestamp given to encode is packed as msgpack's own; decode
returns msgpack.Timestamp for ext -1. Neither is part of the set; both are inert data.)
"""

from __future__ import annotations

import math
import re
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import msgpack

from pyisolate.errors import EncodeError, RemoteError

__all__ = ["BUFFER_THRESHOLD", "MAX_BODY_BYTES", "MAX_DEPTH", "DecodeError", "decode",
           "decode_exception", "encode", "encode_exception"]

BUFFER_THRESHOLD: int = 64 * 1024
MAX_DEPTH: int = 64
MAX_BODY_BYTES: int = 256 * 1024 * 1024

EXT_TUPLE, EXT_SET, EXT_FROZENSET, EXT_BIGINT, EXT_COMPLEX, EXT_BYTEARRAY = 1, 2, 3, 4, 5, 6
EXT_BYTES_BUFFER, EXT_BYTEARRAY_BUFFER, EXT_NP_SCALAR, EXT_NP_ARRAY, EXT_EXCEPTION = 7, 8, 9, 10, 11

Buffer = bytes | bytearray | memoryview


class DecodeError(ValueError):
    """A message body or its buffers are malformed (untrusted input that fails a check)."""


_ExtType = msgpack.ExtType
_new_tuple = tuple.__new__


def _ext(code: int, data: bytes) -> object:
    """msgpack.ExtType(code, data) without its validating __new__ (a third of a tuple's cost)."""
    return _new_tuple(_ExtType, (code, data))


_U16, _U32, _COMPLEX = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<dd")
_SCALARS = frozenset({type(None), bool, int, float, str, complex})
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})
# Every nesting level puts one of these first bytes in the body (array, map, ext headers), so
# a body holding at most MAX_DEPTH of them cannot nest deeper: the check costs one translate.
_NOT_NESTING = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xC7 <= b <= 0xC9
                                                   or 0xD4 <= b <= 0xD8 or b >= 0xDC))
_DTYPE_RE = re.compile(r"([<>|])([a-zA-Z])(\d{1,6})(\[\d{0,6}[a-zA-Z]{1,2}\])?(?:/(.))?")
_DTYPE_KINDS = "biufcmMSUV"
_STRUCT_CODES = {("b", 1): "?", ("i", 1): "b", ("i", 2): "h", ("i", 4): "i", ("i", 8): "q",
                 ("u", 1): "B", ("u", 2): "H", ("u", 4): "I", ("u", 8): "Q", ("f", 2): "e",
                 ("f", 4): "f", ("f", 8): "d", ("c", 8): "ff", ("c", 16): "dd"}
_SUPPORTED = ("supported types are None, bool, int, float, complex, str, bytes, bytearray, "
              "list, tuple, dict, set, frozenset, exceptions, and numpy arrays and scalars")


# --- encoding ---------------------------------------------------------------------------

class _Thread:
    """Per-thread state: packers by nesting level (a Packer cannot be re-entered), the buffers
    of the encode in progress, and a decoder reused for bodies without buffers."""

    __slots__ = ("packers", "level", "buffers", "active", "decoder")

    def __init__(self) -> None:
        self.packers: list[Any] = []
        self.level = 0
        self.buffers: list[bytes | memoryview] = []
        self.active: set[int] = set()  # ids of exceptions being encoded, to catch cycles
        self.decoder = _Decoder(())


_local = threading.local()


def _thread() -> _Thread:
    try:
        state: _Thread = _local.state
    except AttributeError:
        state = _local.state = _Thread()
    return state


def encode(value: object) -> tuple[bytes, list[bytes | memoryview]]:
    """Encode a value for another process.

    Returns:
        ``(body, buffers)``: the msgpack body and the large binary frames it refers to. Buffers
        alias the caller's objects (zero-copy): do not mutate those until they are sent.

    Raises:
        EncodeError: a value cannot travel; the message names its type and path.
    """
    st = _thread()
    outer, buffers = st.buffers, list[bytes | memoryview]()
    st.buffers = buffers  # a fresh list: encode may run inside encode (an arg's __repr__)
    try:
        if type(value) is bytes or type(value) is bytearray:  # spare packing a big blob twice
            value = _walk(value, 0)
        body = _pack(st, value)
        if 0xC4 in body or 0xC5 in body or 0xC6 in body or _may_nest_deeper(body):
            prepared = _walk(value, 0)  # a bin header: maybe a bytearray or large bytes inside
            if prepared is not value:
                buffers.clear()
                body = _pack(st, prepared)
    except _Unsendable as exc:
        raise EncodeError(exc.describe()) from None
    except (EncodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _locate(value, exc) from None
    finally:
        st.buffers = outer
    return body, buffers


def encode_exception(exc: BaseException) -> tuple[bytes, list[bytes | memoryview]]:
    """Encode an exception: type name, args (repr for those that cannot travel), message, traceback."""
    try:
        return encode(exc)
    except EncodeError:  # only if even the reprs cannot travel (nested too deep)
        return encode(RemoteError(_safe_str(exc), remote_type=_type_name(type(exc))))


def _may_nest_deeper(body: bytes) -> bool:
    return len(body) > MAX_DEPTH and len(body.translate(None, _NOT_NESTING)) > MAX_DEPTH


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


def _default(obj: object) -> object:
    """msgpack's hook for every value it does not pack natively; dispatch on the exact type."""
    encoder = _ENCODERS.get(type(obj))
    if encoder is None:
        encoder = _find_encoder(obj)
    return encoder(obj)


def _find_encoder(obj: object) -> Callable[[Any], object]:
    if isinstance(obj, BaseException):
        return _encode_exception
    t = type(obj)
    np: Any = sys.modules.get("numpy")  # a numpy object exists only if numpy is imported
    if np is not None and (t is np.ndarray or (isinstance(obj, np.generic)
                                               and t is getattr(obj, "dtype").type)):
        _ENCODERS[t] = _encode_ndarray if t is np.ndarray else _encode_np_scalar
        return _ENCODERS[t]
    raise EncodeError(f"cannot send value of type {_type_name(t)!r}: {_SUPPORTED}")


def _to_buffer(data: bytes | memoryview) -> int:
    buffers = _thread().buffers
    buffers.append(data)
    return len(buffers) - 1


class _Binary:
    """Bytes at or above the threshold, or a bytearray: what _walk keeps from native packing."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data


class _ExceptionArgs:
    """An exception whose args _walk had to rewrite (wrapped binaries, repr of bad ones)."""

    __slots__ = ("exc", "args")

    def __init__(self, exc: BaseException, args: tuple[object, ...]) -> None:
        self.exc, self.args = exc, args


def _encode_binary(obj: _Binary) -> object:
    data, mutable = obj.data, type(obj.data) is bytearray
    if len(data) < BUFFER_THRESHOLD:
        return _ext(EXT_BYTEARRAY, bytes(data))
    index = _to_buffer(memoryview(data) if isinstance(data, bytearray) else data)
    return _ext(EXT_BYTEARRAY_BUFFER if mutable else EXT_BYTES_BUFFER, _U32.pack(index))


def _encode_np_scalar(obj: Any) -> object:
    _check_dtype(obj.dtype)
    head = f"{obj.dtype.str}/{obj.dtype.char}".encode("ascii")
    raw = obj.tobytes() if obj.dtype.itemsize else b""  # np.str_("").tobytes() is 4 bytes
    return _ext(EXT_NP_SCALAR, bytes((len(head),)) + head + raw)


def _encode_ndarray(arr: Any) -> object:
    _check_dtype(arr.dtype)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    index, data = None, b""
    if arr.nbytes >= BUFFER_THRESHOLD:  # a flat uint8 view of the array's own memory
        index = _to_buffer(memoryview(arr.reshape(-1).view("u1")))
    else:
        data = arr.tobytes()
    head = _pack(_thread(), [arr.dtype.str, list(arr.shape), index])
    return _ext(EXT_NP_ARRAY, _U16.pack(len(head)) + head + data)


def _check_dtype(dt: Any) -> None:
    if (dt.kind not in _DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None
            or dt.hasobject or (dt.itemsize == 0 and dt.kind not in "SU")):  # np.str_("")
        raise EncodeError(f"numpy dtype {dt} cannot travel: only unstructured bool, int, "
                          "uint, float, complex, datetime, timedelta, bytes, str, void dtypes")


def _encode_exception(exc: BaseException | _ExceptionArgs) -> object:
    args = exc.args
    if isinstance(exc, _ExceptionArgs):
        exc = exc.exc
    st = _thread()
    if id(exc) in st.active:  # it is in its own args: fail fast, the caller sends a repr
        raise EncodeError("self-referencing exception")
    cls, extras = type(exc), {}
    if isinstance(exc, OSError):
        extras = {k: v for k in ("filename", "filename2")
                  if type(v := getattr(exc, k, None)) in (str, bytes, int)}
    elif type(exc) is RemoteError:  # passing through a further hop keeps the original type name
        extras = {"remote_type": str(exc.remote_type)}
    try:
        tb_text = "".join(traceback.format_exception(exc))
    except Exception:
        tb_text = f"{cls.__qualname__}: {_safe_str(exc)}\n"
    fields = [str(cls.__module__), str(cls.__qualname__), list(args), _safe_str(exc),
              tb_text, extras]
    mark = len(st.buffers)
    st.active.add(id(exc))
    try:
        try:
            return _ext(EXT_EXCEPTION, _pack(st, fields))
        except (EncodeError, ValueError, TypeError, OverflowError, RecursionError):
            del st.buffers[mark:]
        # Keep each arg that travels, send the repr of the others. _walk is linear where a
        # retry per arg is not; st.level is never more than the args' depth.
        fields[2] = [_walk_arg(arg, st.level) for arg in args]
        return _ext(EXT_EXCEPTION, _pack(st, fields))
    finally:
        st.active.discard(id(exc))


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__qualname__} object>"


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<unrepresentable {type(obj).__qualname__} object>"


_ENCODERS: dict[type, Callable[[Any], object]] = {
    tuple: lambda o: _ext(EXT_TUPLE, _pack(_thread(), list(o))),
    set: lambda o: _ext(EXT_SET, _pack(_thread(), list(o))),
    frozenset: lambda o: _ext(EXT_FROZENSET, _pack(_thread(), list(o))),
    int: lambda o: _ext(EXT_BIGINT, o.to_bytes(o.bit_length() // 8 + 1, "little", signed=True)),
    complex: lambda o: _ext(EXT_COMPLEX, _COMPLEX.pack(o.real, o.imag)),
    _Binary: _encode_binary,
    _ExceptionArgs: _encode_exception,
}


# --- the slow path: walk the value, wrap binaries, check depth, locate what fails --------

class _Unsendable(Exception):
    """Raised by _walk at the first value that cannot travel; frames add path on the way up."""

    def __init__(self, obj: object, reason: str | None) -> None:
        self.obj, self.reason = obj, reason  # reason None: nested too deep
        self.path: list[str] = []
        self.containers: list[object] = []

    def add(self, segment: str, container: object) -> None:
        self.path.append(segment)
        self.containers.append(container)

    def describe(self) -> str:
        path, objs = self.path[::-1], [*self.containers[::-1], self.obj]
        where = _where(path)
        if self.reason is not None:
            return f"cannot send value of type {_type_name(type(self.obj))!r} at {where}: {self.reason}"
        seen: dict[int, int] = {}
        for j, obj in enumerate(objs):
            if (i := seen.setdefault(id(obj), j)) != j:
                return (f"cannot send a self-referencing value: the {_type_name(type(obj))} at "
                        f"{_where(path[:j])} is its own container from {_where(path[:i])}")
        return f"cannot send value nested deeper than MAX_DEPTH={MAX_DEPTH} levels at {where}"


def _walk(obj: object, depth: int) -> object:
    """Return obj with bytearray and large bytes wrapped; raise _Unsendable at the first problem."""
    t = type(obj)
    if t in _SCALARS:
        return obj
    if isinstance(obj, (bytes, bytearray)) and (t is bytes or t is bytearray):
        return _Binary(obj) if t is bytearray or len(obj) >= BUFFER_THRESHOLD else obj
    if t not in _CONTAINERS and not isinstance(obj, BaseException):
        if (problem := _leaf_problem(obj)) is not None:
            raise _Unsendable(obj, problem)
        return obj
    if depth >= MAX_DEPTH:
        raise _Unsendable(obj, None)
    if isinstance(obj, BaseException):
        active = _thread().active
        if id(obj) in active:  # in its own args; failing fast keeps this linear
            raise _Unsendable(obj, None)
        active.add(id(obj))
        try:
            args = tuple(_walk_arg(arg, depth + 1) for arg in obj.args)
        finally:
            active.discard(id(obj))
        changed = any(a is not b for a, b in zip(args, obj.args))
        return _ExceptionArgs(obj, args) if changed else obj
    if isinstance(obj, dict):
        pairs, changed = [], False
        for key, val in obj.items():
            try:
                new_key = _walk(key, depth + 1)
            except _Unsendable as exc:
                exc.add(f"<key {_short(key)}>", obj)
                raise
            try:
                new_val = val if type(val) in _SCALARS else _walk(val, depth + 1)
            except _Unsendable as exc:
                exc.add(f"[{_short(key)}]", obj)
                raise
            changed = changed or new_key is not key or new_val is not val
            pairs.append((new_key, new_val))
        return dict(pairs) if changed else obj
    assert isinstance(obj, (list, tuple, set, frozenset))
    items: list[object] = []
    changed = False
    for i, item in enumerate(obj):
        try:
            new = item if type(item) in _SCALARS else _walk(item, depth + 1)
        except _Unsendable as exc:
            exc.add(f"[{i}]" if t is list or t is tuple else f"<element {_short(item)}>", obj)
            raise
        changed = changed or new is not item
        items.append(new)
    return type(obj)(items) if changed else obj


def _leaf_problem(obj: object) -> str | None:
    """Why a value that is no container cannot travel, or None if it can."""
    encoder = _ENCODERS.get(type(obj))
    if encoder is None:
        try:
            encoder = _find_encoder(obj)
        except EncodeError:
            return _SUPPORTED
    if encoder is _encode_ndarray or encoder is _encode_np_scalar:
        try:
            _check_dtype(getattr(obj, "dtype"))
        except EncodeError as exc:
            return str(exc)
    return None


def _walk_arg(arg: object, depth: int) -> object:
    try:
        return _walk(arg, depth)
    except _Unsendable:  # an exception still travels: this arg goes as its repr
        return _safe_repr(arg)


def _locate(value: object, exc: BaseException) -> EncodeError:
    try:
        _walk(value, 0)
    except _Unsendable as found:
        return EncodeError(found.describe())
    return EncodeError(f"cannot encode value of type {_type_name(type(value))!r}: {exc}")


def _where(path: list[str]) -> str:
    if not path:
        return "the top level"
    return "".join(path if len(path) <= 12 else [*path[:6], "...", *path[-4:]])


def _short(obj: object) -> str:
    text = _safe_repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(t: type) -> str:
    module = getattr(t, "__module__", None)
    return t.__qualname__ if module in (None, "builtins") else f"{module}.{t.__qualname__}"


# --- decoding ---------------------------------------------------------------------------

def decode(body: Buffer, buffers: Sequence[Buffer] = ()) -> object:
    """Decode a body (and its buffer frames) sent by another, untrusted, process.

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
    decoder = _Decoder(buffers) if buffers else _thread().decoder
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


def decode_exception(body: Buffer, buffers: Sequence[Buffer] = ()) -> BaseException:
    """Decode what encode_exception made: the same type where safe, else RemoteError."""
    exc = decode(body, buffers)
    if not isinstance(exc, BaseException):
        raise DecodeError(f"expected an exception, got {type(exc).__qualname__}")
    return exc


class _Decoder:
    """The state of one decode: its buffer frames, which are taken, and ext nesting depth."""

    __slots__ = ("buffers", "used", "depth")

    def __init__(self, buffers: Sequence[Buffer]) -> None:
        self.buffers = buffers
        self.used: set[int] = set()
        self.depth = 0

    def unpack(self, data: bytes) -> object:
        n = len(data)
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False,
                               ext_hook=self.ext_hook, max_str_len=n, max_bin_len=n,
                               max_array_len=n, max_map_len=n // 2, max_ext_len=n)

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


def _numpy() -> Any:
    """numpy, imported on first need; None where it is not installed (or blocked)."""
    global _numpy_missing
    if _numpy_missing:
        return None
    try:
        import numpy
    except ImportError:
        _numpy_missing = True
        return None
    return numpy


_numpy_missing = False


def _parse_dtype(text: object) -> tuple[re.Match[str], Any]:
    """Check a dtype string; return its parts and the numpy dtype (None without numpy)."""
    match = _DTYPE_RE.fullmatch(text) if type(text) is str else None
    if match is None or match[2] not in _DTYPE_KINDS:
        raise DecodeError(f"invalid or unsupported numpy dtype {text!r}")
    np = _numpy()
    if np is None:
        return match, None
    dt = np.dtype(match[0].partition("/")[0])
    try:
        _check_dtype(dt)
    except EncodeError as exc:
        raise DecodeError(str(exc)) from None
    return match, dt


def _decode_np_scalar(dec: _Decoder, data: bytes) -> object:
    n = data[0] if data else 0
    if len(data) < 1 + n:
        raise DecodeError("truncated numpy scalar header")
    try:
        match, dt = _parse_dtype(data[1:1 + n].decode("ascii"))
    except UnicodeDecodeError:
        raise DecodeError("a numpy scalar's dtype must be ASCII") from None
    raw = data[1 + n:]
    if dt is None:
        return _scalar_without_numpy(match, raw)
    if match[5] and dt.kind in "biufc" and (alt := _numpy().dtype(match[5])).str == dt.str:
        dt = alt  # the char tells np.longlong from np.int64, which share dtype.str
    if len(raw) != dt.itemsize:
        raise DecodeError(f"a numpy {dt} scalar needs {dt.itemsize} bytes, got {len(raw)}")
    return _numpy().frombuffer(raw, dtype=dt)[0] if raw else dt.type()


def _scalar_without_numpy(match: re.Match[str], raw: bytes) -> object:
    order, kind, size = "<" if match[1] == "|" else match[1], match[2], int(match[3])
    code = _STRUCT_CODES.get((kind, size))
    if code is not None and len(raw) == size:
        values = struct.unpack(order + code, raw)
        return complex(*values) if kind == "c" else values[0]
    if kind == "S" and len(raw) == size:
        return raw.rstrip(b"\0")
    if kind == "U" and len(raw) == 4 * size:
        return raw.decode("utf-32-le" if order == "<" else "utf-32-be").rstrip("\0")
    raise DecodeError(f"cannot decode a numpy scalar of dtype {match[0].partition('/')[0]!r}: "
                      "numpy is not installed in this process")


def _decode_ndarray(dec: _Decoder, data: bytes) -> object:
    if len(data) < 2 or len(data) < 2 + (n := _U16.unpack_from(data)[0]):
        raise DecodeError("truncated numpy array header")
    head = msgpack.unpackb(data[2:2 + n], raw=False, use_list=True, max_ext_len=0)
    if type(head) is not list or len(head) != 3 or type(head[1]) is not list or len(head[1]) > 64:
        raise DecodeError("a numpy array header must be [dtype, shape, buffer index or nil]")
    text, shape, index = head
    if any(type(d) is not int or d < 0 for d in shape):
        raise DecodeError(f"invalid numpy array shape {shape!r}")
    match, dt = _parse_dtype(text)
    if dt is None:
        raise DecodeError("cannot decode a numpy array: numpy is not installed in this process")
    if index is None:
        view = memoryview(data)[2 + n:]
    elif len(data) != 2 + n:
        raise DecodeError("a numpy array in a buffer carries no inline data")
    else:
        view = memoryview(dec.take(index))
    count = math.prod(shape)
    if view.nbytes != count * dt.itemsize:
        raise DecodeError(f"numpy array data is {view.nbytes} bytes; shape {shape} of {dt} "
                          f"needs {count * dt.itemsize}")
    arr = _numpy().frombuffer(view, dtype=dt, count=count).reshape(shape)
    return arr if arr.flags.writeable else arr.copy()


def _decode_exception(dec: _Decoder, data: bytes) -> BaseException:
    fields = dec.nested(data, "exception")
    kinds = (str, str, list, str, str, dict)
    if len(fields) != 6 or any(type(f) is not k for f, k in zip(fields, kinds)):
        raise DecodeError("an exception payload must be [module, qualname, args, message, "
                          "traceback, extras]")
    module, qualname, args, message, tb_text, extras = fields
    exc: BaseException | None = None
    cls = _find_exception_class(module, qualname)
    if cls is not None:
        try:
            if issubclass(cls, OSError) and len(args) == 2 and "filename" in extras:
                exc = cls(*args, extras["filename"], None, extras.get("filename2"))
            elif cls is RemoteError and len(args) == 1 and type(extras.get("remote_type")) is str:
                exc = RemoteError(args[0], remote_type=extras["remote_type"], remote_traceback=tb_text)
            else:
                exc = cls(*args)
            if str(exc) != message:  # args do not rebuild it faithfully
                exc = None
            else:
                exc.remote_traceback = tb_text  # type: ignore[attr-defined]
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(message, remote_type=f"{module}.{qualname}", remote_traceback=tb_text)
    if tb_text:
        try:
            exc.add_note("Remote traceback:\n" + tb_text)
        except Exception:  # a class may shadow __notes__; the attribute still holds the text
            pass
    return exc


def _find_exception_class(module: str, qualname: str) -> type[Exception] | None:
    """Find an Exception subclass already loaded: no import, no __getattr__, no descriptor."""
    mod = sys.modules.get(module)
    if not isinstance(mod, ModuleType):
        return None
    namespace: Any = _MODULE_DICT.__get__(mod)  # the slots themselves: no override can run
    cls: object = None
    for part in qualname.split("."):
        cls = namespace.get(part)
        if not isinstance(cls, type):
            return None
        namespace = _TYPE_DICT.__get__(cls)
    return cls if isinstance(cls, type) and issubclass(cls, Exception) else None


_MODULE_DICT: Any = vars(ModuleType)["__dict__"]
_TYPE_DICT: Any = vars(type)["__dict__"]


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


_DECODERS: dict[int, Callable[[_Decoder, bytes], object]] = {
    EXT_TUPLE: lambda dec, data: tuple(dec.nested(data, "tuple")),
    EXT_SET: lambda dec, data: set(dec.nested(data, "set")),
    EXT_FROZENSET: lambda dec, data: frozenset(dec.nested(data, "frozenset")),
    EXT_BIGINT: _decode_int,
    EXT_COMPLEX: _decode_complex,
    EXT_BYTEARRAY: lambda dec, data: bytearray(data),
    EXT_BYTES_BUFFER: _decode_bytes_buffer,
    EXT_BYTEARRAY_BUFFER: lambda dec, data: bytearray(dec.take_packed(data)),
    EXT_NP_SCALAR: _decode_np_scalar,
    EXT_NP_ARRAY: _decode_ndarray,
    EXT_EXCEPTION: _decode_exception,
}

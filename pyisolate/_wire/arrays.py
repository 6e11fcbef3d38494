"""numpy scalars (ext 9) and arrays (ext 10) on the wire; numpy is imported only on need.

A numpy object can exist only once numpy is imported, so encoding looks in sys.modules;
decoding imports numpy on first need, and without it scalars of plain dtypes become builtins
while arrays raise DecodeError.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from collections.abc import Callable
from typing import Any

import msgpack

from ..errors import EncodeError
from . import shm as _shm
from .base import (
    _ENCODERS,
    BUFFER_THRESHOLD,
    EXT_NP_ARRAY,
    EXT_NP_SCALAR,
    EXT_SHM_ARRAY,
    SHM_THRESHOLD,
    DecodeError,
    _Decoder,
    _ext,
    _pack,
    _thread,
    _to_buffer,
)

_U16 = struct.Struct("<H")
_DTYPE_RE = re.compile(r"([<>|])([a-zA-Z])(\d{1,6})(\[\d{0,6}[a-zA-Z]{1,2}\])?(?:/(.))?")
_DTYPE_KINDS = "biufcmMSUV"
_STRUCT_CODES = {("b", 1): "?", ("i", 1): "b", ("i", 2): "h", ("i", 4): "i", ("i", 8): "q",
                 ("u", 1): "B", ("u", 2): "H", ("u", 4): "I", ("u", 8): "Q", ("f", 2): "e",
                 ("f", 4): "f", ("f", 8): "d", ("c", 8): "ff", ("c", 16): "dd"}


# --- encoding ---------------------------------------------------------------------------

def _find_numpy_encoder(obj: object) -> Callable[[Any], object] | None:
    """The encoder for a numpy array or scalar (cached in _ENCODERS by type), else None."""
    t = type(obj)
    np: Any = sys.modules.get("numpy")  # a numpy object exists only if numpy is imported
    if np is not None and (t is np.ndarray or (isinstance(obj, np.generic)
                                               and t is getattr(obj, "dtype").type)):
        _ENCODERS[t] = _encode_ndarray if t is np.ndarray else _encode_np_scalar
        return _ENCODERS[t]
    return None


def _encode_np_scalar(obj: Any) -> object:
    _check_dtype(obj.dtype)
    head = f"{obj.dtype.str}/{obj.dtype.char}".encode("ascii")
    raw = obj.tobytes() if obj.dtype.itemsize else b""  # np.str_("").tobytes() is 4 bytes
    return _ext(EXT_NP_SCALAR, bytes((len(head),)) + head + raw)


def _encode_ndarray(arr: Any) -> object:
    _check_dtype(arr.dtype)
    st = _thread()
    if arr.nbytes >= SHM_THRESHOLD and st.refs is not None and _shm.shares_with(st.refs.shm_dest):
        try:
            return _ext(EXT_SHM_ARRAY, _pack(st, _shm_array(arr, st.refs.shm_dest)))
        except _shm.NoRoom as exc:  # no shared memory for it: a copy in a buffer frame
            _shm.warn_copy(exc, "numpy array")
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


# --- decoding ---------------------------------------------------------------------------

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


def _segment_of(arr: Any) -> tuple[_shm.Segment, int] | None:
    """The segment holding ``arr``'s memory and the offset of its first element, if shared."""
    base: Any = arr
    while base is not None and not _shm.is_lease(base):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None:
        return None
    segment = _shm.find(_shm._address(base))
    if segment is None or segment.mm is not base:
        return None
    return segment, arr.__array_interface__["data"][0] - _shm._address(base)


def _shm_array(arr: Any, dest: bytes) -> list[object]:
    # A layout whose elements share memory (broadcast, zero strides) or run backwards is sent dense.
    found = _segment_of(arr) if _shm.extent(arr.shape, arr.strides, arr.itemsize) is not None else None
    if found is None:  # one copy into a segment (a warm one of the pool where it fits)
        segment = _shm.new_segment(arr.nbytes, dest)
        shared = _numpy().ndarray(arr.shape, arr.dtype, buffer=segment.mm)
        shared[...] = arr
        arr, offset = shared, 0
    else:
        segment, offset = found
    return [_shm.share(dest, segment), arr.dtype.str, list(arr.shape), list(arr.strides), offset]


def _decode_shm_array(dec: _Decoder, data: bytes) -> object:
    if dec.refs is None:
        raise DecodeError("a shared-memory array is not accepted here")
    fields = dec.nested(data, "shared array")
    if len(fields) != 5:
        raise DecodeError("a shared array payload must be [segment, dtype, shape, strides, offset]")
    name, text, shape, strides, offset = fields
    valid = (isinstance(shape, list) and isinstance(strides, list) and len(shape) == len(strides) <= 64
             and all(type(v) is int and v >= 0 for v in [*shape, *strides]) and type(offset) is int and offset >= 0)
    if not valid:
        raise DecodeError("invalid shape, strides or offset of a shared array")
    _, dt = _parse_dtype(text)
    if dt is None:
        raise DecodeError("cannot decode a numpy array: numpy is not installed in this process")
    extent = _shm.extent(shape, strides, dt.itemsize)
    if extent is None:
        raise DecodeError("a shared array whose elements share memory (zero or overlapping strides) is refused")
    refs = dec.refs
    try:
        segment = _shm.receive(name, refs.shm_sender, offset + extent, refs.shm_sender_in_host, refs.shm_owe)
    except _shm.RefusedHandle as exc:
        raise DecodeError(str(exc)) from None
    return _numpy().ndarray(shape, dt, buffer=segment.mm, offset=offset, strides=strides)

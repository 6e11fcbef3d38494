"""The codec: types survive the trip, large data rides as buffers, hostile bodies give DecodeError."""

from __future__ import annotations

import collections
import datetime
import enum
import json
import math
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import numpy as np
import pytest

from pyisolate._wire.codec import (
    BUFFER_THRESHOLD,
    EXT_BIGINT,
    EXT_BYTES_BUFFER,
    EXT_COMPLEX,
    EXT_EXCEPTION,
    EXT_NP_ARRAY,
    EXT_NP_SCALAR,
    EXT_TUPLE,
    MAX_DEPTH,
    DecodeError,
    decode,
    decode_exception,
    encode,
    encode_exception,
)
from pyisolate.errors import EncodeError, RemoteError

ROOT = Path(__file__).resolve().parents[2]


def roundtrip(value: object) -> object:
    body, buffers = encode(value)
    return decode(body, buffers)


def assert_same(a: object, b: object) -> None:
    """Equal value and the same type, all the way down (dict keys included)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fcmM")
    elif isinstance(a, np.generic):
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_same(ka, kb)
            assert_same(va, vb)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, (set, frozenset)):
        assert a == b
        for x in a:
            assert_same(x, next(y for y in b if y == x))
    elif isinstance(a, BaseException):
        assert_same(a.args, b.args)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


# --- round trips -------------------------------------------------------------------------

PLAIN_VALUES = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1,
    10**5000, -(10**5000), 1.5, -0.0, math.inf, math.nan, "", "héllo ✓", b"", b"\x00\xc4\xc5",
    bytearray(), bytearray(b"\xc4mutable"), [], (), {}, set(), frozenset(), (1,), 1 + 2j,
    complex(math.inf, -0.0), [1, (2, [3, (4,)])], {1, "a", (1, 2)}, frozenset({frozenset({1})}),
    {"a": [1, 2, {"b": (3, 4)}], "c": {1, 2}},
    {1: "int", 2.5: "float", None: "none", False: "bool", b"k": "bytes", (1, "x"): "tuple",
     frozenset({1}): "frozenset", 3 + 4j: "complex", 2**70: "big"},
    [ValueError("inside"), {"e": KeyError("k")}],
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: type(v).__name__)
def test_plain_values_keep_type_and_value(value):
    assert_same(value, roundtrip(value))


def test_int_and_tuple_keys_stay_what_they_were():
    value = {1: "a", "1": "b", (1, 2): "c", frozenset({3}): "d"}
    result = roundtrip(value)
    assert_same(value, result)
    assert result[(1, 2)] == "c"


@pytest.mark.parametrize("size", [0, 10, BUFFER_THRESHOLD - 1])
def test_small_binary_travels_inline(size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    for value in (data, bytearray(data), [data], (bytearray(data),)):
        body, buffers = encode(value)
        assert buffers == []
        assert_same(value, decode(body, buffers))


def test_large_bytes_ride_as_buffers_without_copy():
    big = b"\xc4" * BUFFER_THRESHOLD
    body, buffers = encode(big)
    assert len(body) < 1000 and len(buffers) == 1 and buffers[0] is big
    assert decode(body, buffers) is big  # bytes frames are not copied on decode either

    value = {"a": [1, (big, "x")], "b": big * 2}
    body, buffers = encode(value)
    assert len(body) < 1000 and len(buffers) == 2
    assert buffers[0] is big
    assert_same(value, decode(body, buffers))


def test_large_bytearray_rides_as_a_view_of_itself():
    big = bytearray(b"z" * (BUFFER_THRESHOLD + 1))
    body, buffers = encode([big, "tail"])
    assert len(body) < 1000
    assert isinstance(buffers[0], memoryview) and buffers[0].obj is big
    result = decode(body, [bytes(b) for b in buffers])
    assert_same([big, "tail"], result)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffers_may_be_any_bytes_like(kind):
    value = [b"a" * BUFFER_THRESHOLD, bytearray(b"b" * BUFFER_THRESHOLD), np.arange(10_000.0)]
    body, buffers = encode(value)
    frames = [kind(bytes(b)) for b in buffers]
    result = decode(body, frames)
    assert_same(value, result)
    assert result[2].flags.writeable


def test_large_bytes_as_dict_key_and_set_element():
    big = b"k" * BUFFER_THRESHOLD
    value = {big: 1, "s": frozenset({big})}
    body, buffers = encode(value)
    assert len(buffers) == 2 and len(body) < 1000
    assert_same(value, decode(body, buffers))


def test_body_may_be_a_memoryview():
    body, buffers = encode({"x": (1, 2)})
    assert decode(memoryview(body), buffers) == {"x": (1, 2)}


# --- numpy -------------------------------------------------------------------------------

NUMPY_SCALARS = [
    np.bool_(True), np.bool_(False), np.int8(-5), np.int16(-300), np.int32(7), np.int64(-(2**62)),
    np.uint8(250), np.uint16(65000), np.uint32(2**32 - 1), np.uint64(2**64 - 1),
    np.longlong(5), np.ulonglong(6), np.float16(1.5), np.float32(-2.25), np.float64(math.pi),
    np.longdouble(1.25), np.complex64(1 - 2j), np.complex128(3 + 4j), np.float64(math.nan),
    np.datetime64("2020-01-02T03:04:05", "s"), np.timedelta64(7, "ms"), np.datetime64("NaT"),
    np.str_("hé"), np.str_(""), np.bytes_(b"ab"), np.bytes_(b""), np.void(b"\x01\x02\x03"),
]


@pytest.mark.parametrize("scalar", NUMPY_SCALARS, ids=lambda s: f"{type(s).__name__}({s!r})")
def test_numpy_scalars_keep_their_type(scalar):
    result = roundtrip(scalar)
    assert type(result) is type(scalar)
    assert result.dtype == scalar.dtype
    assert result.tobytes() == scalar.tobytes()


NUMPY_ARRAYS = [
    np.array(5.0),
    np.array(True),
    np.zeros((0,), np.int32),
    np.zeros((3, 0, 2), np.float32),
    np.arange(12).reshape(3, 4),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    np.arange(40).reshape(5, 8)[::2, 1::3],
    np.array([True, False, True]),
    np.array([1 + 2j, 3 - 4j], np.complex64),
    np.array([np.nan, 1.0], np.float16),
    np.arange(6, dtype=">i4"),
    np.array(["2020-01-01", "NaT"], "datetime64[D]"),
    np.array([1, 2], "timedelta64[25s]"),
    np.array(["a", "héllo"]),
    np.array([b"ab", b"c"]),
    np.array([b"\x01\x02", b"\x03\x04"], "V2"),
    np.arange(BUFFER_THRESHOLD // 8 + 1, dtype=np.float64),
    np.arange(3 * BUFFER_THRESHOLD).reshape(3, -1)[:, ::2],
    np.arange(BUFFER_THRESHOLD, dtype=">i8").astype("datetime64[ms]"),
]


@pytest.mark.parametrize("array", NUMPY_ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_numpy_arrays_keep_dtype_shape_values(array):
    result = roundtrip(array)
    assert_same(array, result)
    assert result.flags.writeable


def test_large_array_is_a_buffer_sharing_the_arrays_memory():
    array = np.arange(BUFFER_THRESHOLD, dtype=np.float64)
    body, buffers = encode({"a": array})
    assert len(body) < 1000 and len(buffers) == 1
    assert np.shares_memory(np.frombuffer(buffers[0], np.uint8), array)
    frame = bytearray(buffers[0])  # a writable frame is used in place, not copied
    result = decode(body, [frame])["a"]
    assert np.shares_memory(result, np.frombuffer(frame, np.uint8))


def test_small_array_is_inline():
    body, buffers = encode(np.arange(10))
    assert buffers == []


BAD_ARRAYS = [np.array([1, "x"], dtype=object), np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])]
if hasattr(np, "dtypes") and hasattr(np.dtypes, "StringDType"):  # numpy >= 2
    BAD_ARRAYS.append(np.array(["x"], dtype=np.dtypes.StringDType()))


@pytest.mark.parametrize("bad", BAD_ARRAYS, ids=lambda a: str(a.dtype))
def test_unsupported_numpy_dtypes_are_refused(bad):
    with pytest.raises(EncodeError, match=r"at \[1\]\['arr'\].*numpy dtype"):
        encode([0, {"arr": bad}])


def test_numpy_subclass_scalar_travels_as_the_builtin_it_derives_from():
    class MyFloat(np.float64):
        pass

    back = decode(*encode(MyFloat(1.5)))
    assert type(back) is float and back == 1.5  # lossy, as any unregistered subclass of a builtin


def test_importing_the_codec_does_not_import_numpy():
    code = "import sys, pyisolate._wire.codec; assert 'numpy' not in sys.modules, 'numpy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


NO_NUMPY_CHILD = """
import json, sys
sys.modules["numpy"] = None  # any `import numpy` now raises ImportError
from pyisolate._wire.codec import DecodeError, decode
out = []
for body in json.load(sys.stdin):
    try:
        value = decode(bytes.fromhex(body))
        out.append([type(value).__name__, repr(value)])
    except DecodeError as exc:
        out.append(["DecodeError", str(exc)])
print(json.dumps(out))
"""


def test_without_numpy_scalars_become_builtins_and_arrays_fail_clearly():
    values = [np.bool_(True), np.int8(-3), np.uint64(2**64 - 1), np.int32(-7), np.float16(0.5),
              np.float32(1.25), np.float64(-2.5), np.complex64(1 + 2j), np.complex128(-3j),
              np.str_("hé"), np.bytes_(b"ab"), np.datetime64("2020-01-01"), np.arange(3),
              [np.float64(1.0), {"k": np.int16(2)}]]
    bodies = []
    for value in values:
        body, buffers = encode(value)
        assert buffers == []
        bodies.append(body.hex())
    proc = subprocess.run([sys.executable, "-c", NO_NUMPY_CHILD], input=json.dumps(bodies),
                          capture_output=True, text=True, cwd=ROOT, check=True)
    got = json.loads(proc.stdout)
    assert got[:11] == [
        ["bool", "True"], ["int", "-3"], ["int", str(2**64 - 1)], ["int", "-7"],
        ["float", "0.5"], ["float", "1.25"], ["float", "-2.5"], ["complex", "(1+2j)"],
        ["complex", repr(complex(np.complex128(-3j)))], ["str", "'hé'"], ["bytes", "b'ab'"],
    ]
    assert got[11][0] == "DecodeError" and "numpy is not installed" in got[11][1]
    assert got[12][0] == "DecodeError" and "numpy is not installed" in got[12][1]
    assert got[13] == ["list", "[1.0, {'k': 2}]"]


# --- values that cannot travel -----------------------------------------------------------

def test_encode_error_names_type_and_path():
    conn = socket.socket()
    try:
        with pytest.raises(EncodeError) as info:
            encode([1, {"conn": [conn]}])
    finally:
        conn.close()
    message = str(info.value)
    assert message.startswith("cannot send value of type 'socket.socket' at [1]['conn'][0]: ")
    assert "supported types are" in message
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (object(), "type 'object' at the top level"),
        ((1, (2, lambda: 0)), "type 'function' at [1][1]"),
        ({"g": (x for x in ())}, "type 'generator' at ['g']"),
        ([datetime.datetime(2020, 1, 1)], "type 'datetime.datetime' at [0]"),
        ({object(): 1}, "type 'object' at <key <object object at"),
        ([{1, print}], "type 'builtin_function_or_method' at [0]<element"),
        ([memoryview(b"x")], "type 'memoryview' at [0]"),
        ([(1, 2), {"x": (3, object())}], "type 'object' at [1]['x'][1]"),
    ],
)
def test_unsupported_values_are_located(value, needle):
    with pytest.raises(EncodeError) as info:
        encode(value)
    assert needle in str(info.value)


def test_self_referencing_containers_are_refused():
    loop: list[object] = [1]
    loop.append(loop)
    with pytest.raises(EncodeError, match=r"self-referencing value: the list at \['a'\]\[1\]"):
        encode({"a": loop})
    inner: list[object] = []
    outer = (inner,)
    inner.append(outer)
    with pytest.raises(EncodeError, match="self-referencing"):
        encode([outer])
    d: dict[str, object] = {}
    d["me"] = d
    with pytest.raises(EncodeError, match="self-referencing"):
        encode(d)


def nest(depth: int, kinds: tuple[type, ...] = (list,)) -> object:
    value: object = 0
    for i in range(depth):
        kind = kinds[i % len(kinds)]
        value = {"k": value} if kind is dict else kind([value])
    return value


@pytest.mark.parametrize("kinds", [(list,), (tuple,), (dict,), (list, tuple, dict), (tuple, frozenset)])
def test_depth_limit_on_encode(kinds):
    assert roundtrip(nest(MAX_DEPTH, kinds)) == nest(MAX_DEPTH, kinds)
    with pytest.raises(EncodeError, match=f"nested deeper than MAX_DEPTH={MAX_DEPTH}"):
        encode(nest(MAX_DEPTH + 1, kinds))


def test_encoder_state_is_clean_after_a_failure():
    with pytest.raises(EncodeError):
        encode([(1, (2, object()))])
    assert roundtrip([(1, 2), b"x" * BUFFER_THRESHOLD]) == [(1, 2), b"x" * BUFFER_THRESHOLD]


def test_encode_is_thread_safe():
    values = [[i, (i, str(i)), {i: b"x" * (BUFFER_THRESHOLD if i % 3 == 0 else 1)}]
              for i in range(200)]
    barrier = threading.Barrier(4)

    def work(chunk: list[object]) -> list[object]:
        barrier.wait(timeout=10)
        return [roundtrip(v) for v in chunk for _ in range(20)][::20]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, [values[i::4] for i in range(4)]))
    for i in range(4):
        assert results[i] == values[i::4]


# --- hostile bodies ----------------------------------------------------------------------

def ext(code: int, payload: bytes) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, payload))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "malformed"),
        (b"\x92\x01", "malformed"),  # truncated array
        (b"\x01\x02", "malformed"),  # extra data
        (b"\xc1", "malformed"),  # never used byte
        (b"\xdb\xff\xff\xff\xff" + b"x" * 10, "malformed"),  # str32 claiming 4 GiB
        (b"\xdd\xff\xff\xff\xff\x01", "malformed"),  # array32 claiming 4G items
        (b"\xdf\xff\xff\xff\xff\x01\x01", "malformed"),  # map32 claiming 4G pairs
        (b"\x81\x91\x01\x02", "unhashable"),  # a list as a map key
        (b"\x91" * 100_000 + b"\x90", "malformed"),  # nested 100k deep
        (b"\x91" * (MAX_DEPTH + 1) + b"\x90", "MAX_DEPTH"),
        (b"\x91" * 10 + b"\x81\xa1k" * 60 + b"\xc0", "MAX_DEPTH"),
        (ext(99, b"x"), "unknown ext type code 99"),
        (b"\xd4\xfbx", "unknown ext type code -5"),  # fixext 1, code -5
        (ext(EXT_COMPLEX, b"abc"), "16 bytes"),
        (ext(EXT_BIGINT, b""), "empty big int"),
        (ext(EXT_TUPLE, b"\x01"), "tuple payload must be a msgpack array"),
        (ext(EXT_TUPLE, b"\x92\x01"), "malformed"),
        (ext(EXT_BYTES_BUFFER, b"\x00\x00\x00\x00"), "buffer index 0 is out of range"),
        (ext(EXT_BYTES_BUFFER, b"\x00\x00"), "4 bytes"),
        (ext(EXT_NP_SCALAR, b"\x09<i8/q"), "truncated"),
        (ext(EXT_NP_SCALAR, b"\x04|O8/" + b"\x00" * 8), "dtype"),
        (ext(EXT_NP_SCALAR, b"\x03<i8" + b"\x00" * 3), "needs 8 bytes"),
        (ext(EXT_NP_SCALAR, b"\x03\xff\xfe\xfd"), "ASCII"),
        (ext(EXT_EXCEPTION, msgpack.packb(["builtins", "ValueError", [], "x"])), "exception payload"),
    ],
)
def test_malformed_bodies_raise_decode_error(body, needle):
    with pytest.raises(DecodeError) as info:
        decode(body)
    assert needle in str(info.value)


def test_deep_ext_nesting_is_refused_without_recursion():
    body = b"\x90"
    for _ in range(10_000):
        body = ext(EXT_TUPLE, b"\x91" + body)
    with pytest.raises(DecodeError, match="MAX_DEPTH"):
        decode(body)


def test_deep_ext_nesting_just_past_the_limit():
    body = b"\x90"
    for _ in range(MAX_DEPTH + 1):
        body = ext(EXT_TUPLE, b"\x91" + body)
    with pytest.raises(DecodeError, match="MAX_DEPTH"):
        decode(body)


def numpy_array_body(dtype: str, shape: object, index: object, data: bytes = b"") -> bytes:
    head = msgpack.packb([dtype, shape, index])
    return ext(EXT_NP_ARRAY, len(head).to_bytes(2, "little") + head + data)


@pytest.mark.parametrize(
    ("body", "buffers", "needle"),
    [
        (numpy_array_body("|O8", [1], None, b"\x00" * 8), (), "dtype"),
        (numpy_array_body("<i4,<f8", [1], None, b"\x00" * 12), (), "dtype"),
        (numpy_array_body("(2,)<i4", [1], None, b"\x00" * 8), (), "dtype"),
        (numpy_array_body("<T16", [1], None, b"\x00" * 16), (), "dtype"),
        (numpy_array_body("<U0", [1], None, b""), (), "malformed"),
        (numpy_array_body("|V0", [1], None, b""), (), "dtype"),
        (numpy_array_body(5, [1], None, b"\x00" * 8), (), "dtype"),
        (numpy_array_body("<f8", [-1], None, b""), (), "shape"),
        (numpy_array_body("<f8", [True], None, b"\x00" * 8), (), "shape"),
        (numpy_array_body("<f8", "3", None, b"\x00" * 24), (), "header"),
        (numpy_array_body("<f8", [2**40, 2**40], None, b"\x00" * 8), (), "needs"),
        (numpy_array_body("<f8", [3], None, b"\x00" * 8), (), "needs 24"),
        (numpy_array_body("<f8", [0, 2**62], None), (), "malformed"),
        (numpy_array_body("<f8", [1], 3), [b"\x00" * 8], "out of range"),
        (numpy_array_body("<f8", [1], 0, b"\x00"), [b"\x00" * 8], "no inline data"),
        (numpy_array_body("<f8", [2], 0), [b"\x00" * 8], "needs 16"),
        (ext(EXT_NP_ARRAY, b"\x05\x00\x93"), (), "truncated"),
    ],
)
def test_malformed_numpy_arrays_raise_decode_error(body, buffers, needle):
    with pytest.raises(DecodeError) as info:
        decode(body, buffers)
    assert needle in str(info.value)


def test_buffer_bookkeeping_is_checked():
    twice = msgpack.packb([msgpack.ExtType(EXT_BYTES_BUFFER, b"\x00" * 4)] * 2)
    with pytest.raises(DecodeError, match="referenced twice"):
        decode(twice, [b"a"])
    body, buffers = encode(b"x" * BUFFER_THRESHOLD)
    with pytest.raises(DecodeError, match="2 buffers were sent but 1 are used"):
        decode(body, [*buffers, b"extra"])
    with pytest.raises(DecodeError, match="out of range"):
        decode(body, [])


def test_body_size_limit(monkeypatch):
    import pyisolate._wire.codec as codec

    monkeypatch.setattr(codec, "MAX_BODY_BYTES", 10)
    with pytest.raises(DecodeError, match="MAX_BODY_BYTES"):
        decode(encode("x" * 20)[0])


def test_non_bytes_body_is_refused():
    with pytest.raises(DecodeError, match="must be bytes"):
        decode(12)  # type: ignore[arg-type]


def test_timestamp_ext_decodes_as_msgpack_timestamp():
    # msgpack decodes its own ext -1 natively; it is inert data, documented, not a hole.
    assert isinstance(decode(b"\xd6\xff\x00\x00\x00\x01"), msgpack.Timestamp)


# --- exceptions --------------------------------------------------------------------------

class CustomError(Exception):
    pass


class NeedsKwargsError(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")


class ReformatsError(Exception):
    def __init__(self, code: object) -> None:
        super().__init__(f"bad {code}")


class FixedMessageError(Exception):
    def __str__(self) -> str:
        return "fixed message"


class Outer:
    class InnerError(Exception):
        pass


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def exc_roundtrip(exc: BaseException) -> BaseException:
    body, buffers = encode_exception(exc)
    return decode_exception(body, buffers)


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad value", 3), KeyError("missing"), FileNotFoundError(2, "No such file"),
     PermissionError(13, "denied", "/etc/shadow"), CustomError("custom", {"k": (1, 2)}),
     Outer.InnerError("nested class"), ExceptionGroup("group", [ValueError("a"), KeyError("b")]),
     ZeroDivisionError(), TimeoutError()],
    ids=lambda e: type(e).__name__,
)
def test_exceptions_are_rebuilt_as_their_type(exc):
    exc = raised(exc)
    result = exc_roundtrip(exc)
    assert type(result) is type(exc)
    assert result.args == exc.args or isinstance(exc, ExceptionGroup)
    assert str(result) == str(exc)
    assert "Traceback (most recent call last)" in result.remote_traceback
    assert "in raised" in result.remote_traceback
    assert result.__notes__[-1].startswith("Remote traceback:\n")
    if isinstance(exc, OSError):
        assert (result.errno, result.strerror, result.filename) == (exc.errno, exc.strerror,
                                                                     exc.filename)


def test_unknown_module_gives_remote_error_and_imports_nothing():
    Fake = type("FakeError", (Exception,), {"__module__": "surely_not_a_loaded_module"})
    result = exc_roundtrip(raised(Fake("boom")))
    assert type(result) is RemoteError
    assert result.remote_type == "surely_not_a_loaded_module.FakeError"
    assert str(result) == "surely_not_a_loaded_module.FakeError: boom"
    assert "boom" in result.remote_traceback
    assert "surely_not_a_loaded_module" not in sys.modules


@pytest.mark.parametrize(
    ("exc", "remote_type"),
    [(SystemExit(3), "SystemExit"), (KeyboardInterrupt(), "KeyboardInterrupt"),
     (GeneratorExit(), "GeneratorExit"), (NeedsKwargsError(code=5), "NeedsKwargsError"),
     (ReformatsError(5), "ReformatsError")],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_unsafe_or_unbuildable_exceptions_become_remote_error(exc, remote_type):
    result = exc_roundtrip(exc)
    assert type(result) is RemoteError
    assert result.remote_type.endswith(remote_type)
    assert str(result).endswith(str(exc))


@pytest.mark.parametrize(
    ("module", "qualname"),
    [("os", "system"), ("builtins", "print"), ("sys", "modules"), ("builtins", "ValueError.mro"),
     ("builtins", "object"), ("builtins", "BaseException"), ("subprocess", "Popen"),
     (__name__, "Outer"), (__name__, "CustomError.__init__")],
)
def test_exception_lookup_never_calls_what_is_not_an_exception_class(module, qualname):
    body = ext(EXT_EXCEPTION, msgpack.packb([module, qualname, ["echo pwned"], "m", "", {}]))
    result = decode_exception(body)
    assert type(result) is RemoteError and result.remote_type == f"{module}.{qualname}"


def test_exception_args_that_cannot_travel_are_sent_as_repr():
    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    sock = socket.socket()
    try:
        exc = ValueError("msg", sock, Unprintable(), b"x" * BUFFER_THRESHOLD, bytearray(b"ba"))
        body, buffers = encode_exception(exc)
    finally:
        sock.close()
    result = decode_exception(body, buffers)
    assert type(result) is RemoteError  # str(exc) changed with the args, so not rebuilt
    args = decode(*encode([exc]))
    assert isinstance(args[0], RemoteError)
    # the args themselves, through a type whose message does not depend on them:
    sock = socket.socket()
    try:
        fixed = FixedMessageError("m", sock, Unprintable(), b"y" * BUFFER_THRESHOLD)
        got = exc_roundtrip(fixed)
    finally:
        sock.close()
    assert type(got) is FixedMessageError and got.args[0] == "m"
    assert got.args[1].startswith("<socket.socket")
    assert got.args[2].startswith("<unrepresentable ") and got.args[2].endswith("Unprintable object>")
    assert got.args[3] == b"y" * BUFFER_THRESHOLD


def test_self_referencing_exception_still_travels():
    exc = FixedMessageError("loop")
    exc.args = (exc, [exc], (exc, exc), "end")
    result = exc_roundtrip(raised(exc))
    assert type(result) is FixedMessageError and result.args[3] == "end"
    assert decode(*encode([exc, exc]))[1].args[3] == "end"


def test_exception_whose_arg_repr_encodes_again():
    class Reentrant:
        def __repr__(self) -> str:
            body, _ = encode((1, [2, "reentrant"]))
            return f"<reentrant {len(body)}>"

    got = decode(*encode([CustomError(Reentrant()), (3, 4)]))
    assert got[0].args[0].startswith("<reentrant ") and got[1] == (3, 4)


def test_remote_error_passes_through_another_hop():
    first = exc_roundtrip(raised(NeedsKwargsError(code=7)))
    assert type(first) is RemoteError
    second = exc_roundtrip(raised(first))
    assert type(second) is RemoteError
    assert second.remote_type == first.remote_type and str(second) == str(first)
    assert "code 7" in second.remote_traceback  # the first hop's traceback rides in its note


def test_decode_exception_refuses_a_non_exception():
    with pytest.raises(DecodeError, match="expected an exception"):
        decode_exception(encode([1])[0])


# --- property tests ----------------------------------------------------------------------

# hypothesis is optional (not in the test extra): without it only these tests are skipped.
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is None:

    def test_property_tests_need_hypothesis():
        pytest.skip("hypothesis is not installed")

else:

    SEED_BODIES = [encode(v)[0] for v in PLAIN_VALUES[:-1]] + [
        encode(v)[0] for v in (NUMPY_SCALARS[:6] + NUMPY_ARRAYS[:6])
    ] + [encode_exception(ValueError("x", (1, 2)))[0]]

    leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
              | st.text(max_size=20) | st.binary(max_size=20) | st.complex_numbers(allow_nan=False))
    hashables = st.recursive(leaves, lambda c: st.tuples(c, c) | st.frozensets(c, max_size=3),
                             max_leaves=8)
    values = st.recursive(
        leaves | st.binary(min_size=BUFFER_THRESHOLD, max_size=BUFFER_THRESHOLD).map(bytearray),
        lambda c: (st.lists(c, max_size=4) | st.tuples(c, c) | st.sets(hashables, max_size=3)
                   | st.dictionaries(hashables, c, max_size=4)),
        max_leaves=20,
    )


    @settings(max_examples=300, deadline=None)
    @given(values)
    def test_property_roundtrip(value):
        assert_same(value, roundtrip(value))


    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300), st.lists(st.binary(max_size=16), max_size=3))
    def test_property_random_bytes_only_raise_decode_error(body, buffers):
        try:
            decode(body, buffers)
        except DecodeError:
            pass


    @settings(max_examples=1000, deadline=None)
    @given(st.sampled_from(SEED_BODIES), st.data())
    def test_property_mutated_bodies_only_raise_decode_error(seed, data):
        body = bytearray(seed)
        for _ in range(data.draw(st.integers(1, 4))):
            if body:
                body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(body)))
        try:
            decode(bytes(body[:cut] if data.draw(st.booleans()) else body))
        except DecodeError:
            pass


def test_decoding_stops_at_max_objects_before_building_them():
    """A body is bounded by objects, not only by depth: millions of empty maps are refused
    after MAX_OBJECTS, whether in one array or spread over many small ones."""
    from pyisolate._wire.codec import MAX_OBJECTS

    flat = b"\xdd" + (64 << 20).to_bytes(4, "big") + b"\x80" * (64 << 20)
    with pytest.raises(DecodeError, match="MAX_OBJECTS"):
        decode(flat)
    inner = b"\xdc" + (1000).to_bytes(2, "big") + b"\x80" * 1000
    spread = b"\xdd" + (4096).to_bytes(4, "big") + inner * 4096
    with pytest.raises(DecodeError, match="MAX_OBJECTS"):
        decode(spread)
    inside_a_tuple = encode((list(range(MAX_OBJECTS)),))[0]
    with pytest.raises(DecodeError, match="MAX_OBJECTS"):
        decode(inside_a_tuple)
    below = [list(range(100)) for _ in range(MAX_OBJECTS // 200)]
    assert decode(encode(below)[0]) == below


def test_pyisolate_errors_with_keyword_fields_travel_as_themselves():
    from pyisolate.errors import EnvironmentBuildError, ExtensionCrashedError, ExtensionLoadError

    for exc in (ExtensionCrashedError("extension 'x' died", extension="x", exit_code=-9, stderr_tail="last words"),
                ExtensionLoadError("no", extension="x", remote_traceback="tb"),
                EnvironmentBuildError("uv failed", extension="x", packages=["a", "b"], output_tail="out")):
        back = decode(*encode(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert all(getattr(back, f) == getattr(exc, f) for f in type(exc)._pyisolate_fields)


@pytest.mark.parametrize("value", [
    type("Version", (str,), {"__str__": lambda self: "not this"})("2.13.0"),
    type("Flags", (int,), {})(7),
    type("Ratio", (float,), {})(0.5),
    type("Blob", (bytes,), {})(b"raw"),
    collections.namedtuple("Point", "x y")(1, (2, 3)),
    type("Items", (list,), {"__iter__": lambda self: iter(["not", "these"])})([1, [2]]),
    collections.OrderedDict(b=1, a=2),
    collections.defaultdict(list, {"k": [bytearray(b"x")]}),
    enum.IntEnum("Level", "LOW HIGH").HIGH,
    type("Big", (int,), {})(2**80),
])
def test_subclasses_of_builtins_travel_as_their_base_type(value):
    """torch.__version__ (a str subclass), namedtuples, OrderedDict, IntEnum members: sent as
    the builtin they derive from (lossy: the subclass is not kept), through its base methods,
    so an override of __str__ or __iter__ changes nothing."""
    base = next(b for b in (str, int, float, bytes, tuple, list, dict) if isinstance(value, b))
    back = decode(*encode(value))
    assert type(back) is base
    expected = {str: str.__str__, int: int.__int__, float: float.__float__, bytes: lambda v: bytes(memoryview(v)),
                tuple: lambda v: tuple(tuple.__iter__(v)), list: lambda v: list(list.__iter__(v)),
                dict: lambda v: dict(dict.items(v))}[base](value)
    assert back == expected


def test_the_list_of_types_in_errors_is_the_one_in_the_protocol_docs():
    """docs/protocol.md's "Types that travel" is the single list; EncodeError quotes it."""
    from pyisolate._wire.base import TRAVELS

    text = (ROOT / "docs" / "protocol.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("Types that travel: "))
    assert line.removeprefix("Types that travel: ").rstrip(".") == TRAVELS
    with pytest.raises(EncodeError) as info:
        encode(object())
    assert TRAVELS in str(info.value)

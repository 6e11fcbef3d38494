"""The slow encode path: walk the value, wrap binaries, check depth, locate what fails.

encode packs with msgpack's C packer alone where it can; only when the body shows a bin
header or too many container headers does it walk the value here, and packs what _walk
returns. On a failure the walk also finds the value to blame and its path for EncodeError.
"""

from __future__ import annotations

from ..errors import EncodeError
from .arrays import _check_dtype, _encode_ndarray, _encode_np_scalar, _find_numpy_encoder
from .base import (
    _CONTAINERS,
    _ENCODERS,
    _SCALARS,
    BUFFER_THRESHOLD,
    MAX_DEPTH,
    NOT_BUILTIN,
    _thread,
    _type_name,
    base_value,
    unsupported,
)
from .tensors import is_tensor


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


#: One step into a container: ("index", i) of a list or tuple, ("value", key) of a dict, ("key",
#: key) a dict key itself, ("element", item) of a set.
Step = tuple[str, object]


class _Unsendable(Exception):
    """Raised by _walk at the first value that cannot travel; frames add path on the way up."""

    def __init__(self, obj: object, reason: str | None) -> None:
        self.obj, self.reason = obj, reason  # reason None: nested too deep
        self.path: list[Step] = []
        self.containers: list[object] = []

    def add(self, step: Step, container: object) -> None:
        self.path.append(step)
        self.containers.append(container)

    def describe(self, role: str = "") -> str:
        path, objs = self.path[::-1], [*self.containers[::-1], self.obj]
        where = _where(path, role)
        if self.reason is not None:
            return f"cannot send value of type {_type_name(type(self.obj))!r} at {where}: {self.reason}"
        seen: dict[int, int] = {}
        for j, obj in enumerate(objs):
            if (i := seen.setdefault(id(obj), j)) != j:
                return (f"cannot send a self-referencing value: the {_type_name(type(obj))} at "
                        f"{_where(path[:j], role)} is its own container from {_where(path[:i], role)}")
        return f"cannot send value nested deeper than MAX_DEPTH={MAX_DEPTH} levels at {where}"


def _walk(obj: object, depth: int) -> object:
    """Return obj with bytearray and large bytes wrapped; raise _Unsendable at the first problem."""
    t = type(obj)
    if t in _SCALARS:
        return obj
    if isinstance(obj, (bytes, bytearray)) and (t is bytes or t is bytearray):
        return _Binary(obj) if t is bytearray or len(obj) >= BUFFER_THRESHOLD else obj
    if t not in _CONTAINERS and not isinstance(obj, BaseException):
        if _registered(t):
            return obj  # its encoder walks its wire form
        if isinstance(obj, (dict, list, tuple)) and _find_numpy_encoder(obj) is None:
            return _walk(base_value(obj), depth)  # a subclass travels as its base: walk that
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
                exc.add(("key", key), obj)
                raise
            try:
                new_val = val if type(val) in _SCALARS else _walk(val, depth + 1)
            except _Unsendable as exc:
                exc.add(("value", key), obj)
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
            exc.add(("index", i) if t is list or t is tuple else ("element", item), obj)
            raise
        changed = changed or new is not item
        items.append(new)
    return type(obj)(items) if changed else obj


def _leaf_problem(obj: object) -> str | None:
    """Why a value that is no container (nor exception) cannot travel, or None if it can."""
    encoder = _ENCODERS.get(type(obj))
    if encoder is None:
        if is_tensor(obj):
            return None if _thread().refs is not None else "torch tensors travel only between actors"
        encoder = _find_numpy_encoder(obj)  # what _find_encoder finds for a non-exception
        if encoder is None:
            if base_value(obj) is not NOT_BUILTIN:
                return None  # a subclass of a builtin: it travels as its base type
            refs = _thread().refs
            return None if refs is not None and refs.export(obj) is not None else unsupported(obj)
    if encoder is _encode_ndarray or encoder is _encode_np_scalar:
        try:
            _check_dtype(getattr(obj, "dtype"))
        except EncodeError as exc:
            return str(exc)
    return None


def _registered(t: type) -> bool:
    refs = _thread().refs
    types = getattr(refs, "types", None)
    return types is not None and t in types


def _walk_arg(arg: object, depth: int) -> object:
    try:
        return _walk(arg, depth)
    except _Unsendable:  # an exception still travels: this arg goes as its repr
        return _safe_repr(arg)


def _locate(value: object, exc: BaseException, role: str = "") -> EncodeError:
    try:
        _walk(value, 0)
    except _Unsendable as found:
        return EncodeError(found.describe(role))
    return EncodeError(f"cannot encode value of type {_type_name(type(value))!r}: {exc}")


#: How each role names the value itself, before the steps into it.
_ROLES = {"result": "the return value", "event": "the event's value", "item": "the stream item"}


def _where(path: list[Step], role: str = "") -> str:
    """Where in the value: ``[0]['x']``, or in the caller's terms for a known ``role``."""
    if role == "arguments" and len(path) >= 2 and path[0] in (("index", 0), ("index", 1)):
        label = path[1][1]
        if path[0] == ("index", 0) and isinstance(label, int):
            head = f"argument {label + 1}"
        else:
            head = f"keyword argument {_short(label)}"
        return ", ".join([head, *(_said(step) for step in _trimmed(path[2:]))])
    if role in _ROLES:
        return ", ".join([_ROLES[role], *(_said(step) for step in _trimmed(path))])
    if not path:
        return "the top level"
    return "".join(_bracket(step) for step in _trimmed(path))


def _trimmed(path: list[Step]) -> list[Step]:
    return path if len(path) <= 12 else [*path[:6], ("more", None), *path[-4:]]


def _bracket(step: Step) -> str:
    kind, label = step
    if kind == "index":
        return f"[{label}]"
    if kind == "value":
        return f"[{_short(label)}]"
    return {"key": f"<key {_short(label)}>", "element": f"<element {_short(label)}>"}.get(kind, "...")


def _said(step: Step) -> str:
    kind, label = step
    return {"index": f"item {label}", "value": f"key {_short(label)}", "key": f"the key {_short(label)}",
            "element": f"the set element {_short(label)}"}.get(kind, "...")


def _short(obj: object) -> str:
    text = _safe_repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<unrepresentable {type(obj).__qualname__} object>"

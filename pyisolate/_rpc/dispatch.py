"""What a CALL may reach: public methods only, and how each kind of callable is run."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

from .._base import LIFECYCLE_HOOKS
from ..errors import ProtocolError
from .refs import is_async_callable

__all__ = ["ASYNC", "GEN", "PLAIN", "call_fields", "handle_methods", "kind_of", "public_methods", "resolve_method"]


def public_methods(obj: object) -> list[str]:
    """Names of the methods of ``obj`` that may be called remotely."""
    return sorted(name for name in dir(type(obj)) if _method(obj, name) is not None)


@functools.lru_cache(maxsize=1024)
def handle_methods(cls: type) -> frozenset[str]:
    """Names of the methods a handle to an instance of ``cls`` may call, read from the class
    alone (no property or other descriptor of an instance is evaluated): its public functions,
    coroutine and async generator functions, static and class methods. Cached by class."""
    names = []
    for name in dir(cls):
        if name.startswith("_") or name in LIFECYCLE_HOOKS:
            continue
        try:
            raw = inspect.getattr_static(cls, name)
        except AttributeError:
            continue
        if isinstance(raw, (staticmethod, classmethod)):
            raw = raw.__func__
        if inspect.isfunction(raw) or isinstance(raw, (types.MethodDescriptorType, types.BuiltinFunctionType)):
            names.append(name)
    return frozenset(names)


def resolve_method(obj: object, name: object) -> Callable[..., Any]:
    """The bound method ``name`` of ``obj`` if it may be called remotely.

    Only methods defined on the object's class qualify: functions (plain, coroutine, async
    generator; static and class methods too). A class attribute that is a class, or some
    other callable object (``runner = subprocess.Popen``, ``system = os.system``), is not a
    method: calling it would construct or run something the author never exposed.

    Raises:
        AttributeError: private, lifecycle, missing or not a method.
    """
    if not isinstance(name, str) or not name or name.startswith("_") or name in LIFECYCLE_HOOKS:
        raise AttributeError(f"{name!r} cannot be called remotely: only public methods can")
    method = _method(obj, name)
    if method is None:
        raise AttributeError(f"{type(obj).__name__!r} has no public method {name!r}")
    return method


def _method(obj: object, name: str) -> Callable[..., Any] | None:
    """``obj.name`` if it is a public method defined on the class, else None."""
    if name.startswith("_") or name in LIFECYCLE_HOOKS:
        return None
    try:
        raw = inspect.getattr_static(type(obj), name)
    except AttributeError:
        return None
    if isinstance(raw, staticmethod):
        return raw.__func__ if inspect.isfunction(raw.__func__) else None
    if not (inspect.isfunction(raw) or isinstance(raw, classmethod) or hasattr(raw, "__get__")):
        return None  # a class, a builtin such as os.system, a plain value: not a method
    bound = getattr(obj, name)
    owner = getattr(bound, "__self__", None)
    if (inspect.ismethod(bound) or inspect.isbuiltin(bound)) and owner in (obj, type(obj)):
        return bound
    return None


GEN, ASYNC, PLAIN = 0, 1, 2


def kind_of(fn: object) -> int:
    """How to run ``fn``: GEN (async generator), ASYNC (coroutine) or PLAIN (in a thread)."""
    if inspect.isasyncgenfunction(fn):
        return GEN
    return ASYNC if is_async_callable(fn) else PLAIN


def call_fields(extra: list[object]) -> tuple[str, int, str, int]:
    """method, ref_id, chain owner and chain id of a CALL header, or ProtocolError."""
    match extra:
        case [str() as method, int() as ref_id, str() as chain_owner, int() as chain_id]:
            return method, ref_id, chain_owner, chain_id
    raise ProtocolError("CALL header must be [method, ref_id, chain_owner, chain_id]")

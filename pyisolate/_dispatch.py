"""What a CALL may reach: public methods only, and how each kind of callable is run."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ._base import LIFECYCLE_HOOKS
from ._refs import is_async_callable
from .errors import ProtocolError

__all__ = ["ASYNC", "GEN", "PLAIN", "call_fields", "kind_of", "public_methods", "resolve_method"]


def public_methods(obj: object) -> list[str]:
    """Names of the methods of ``obj`` that may be called remotely."""
    return sorted(
        name
        for name in dir(type(obj))
        if not name.startswith("_") and name not in LIFECYCLE_HOOKS and callable(getattr(type(obj), name))
    )


def resolve_method(obj: object, name: object) -> Callable[..., Any]:
    """The bound method ``name`` of ``obj`` if it may be called remotely.

    Raises:
        AttributeError: private, lifecycle, missing or not a method.
    """
    if not isinstance(name, str) or not name or name.startswith("_") or name in LIFECYCLE_HOOKS:
        raise AttributeError(f"{name!r} cannot be called remotely: only public methods can")
    attr = getattr(type(obj), name, None)
    if attr is None or not callable(attr):
        raise AttributeError(f"{type(obj).__name__!r} has no public method {name!r}")
    method: Callable[..., Any] = getattr(obj, name)
    return method


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

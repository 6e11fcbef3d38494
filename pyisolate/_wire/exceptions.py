"""Exceptions on the wire (ext 11): [module, qualname, args, str(exc), traceback, extras].

An arg that cannot travel goes as its repr. The receiver rebuilds the same type only when
it is an Exception subclass already loaded there and its args give back the same message;
anything else becomes RemoteError. Either way the remote traceback comes along as a note.
"""

from __future__ import annotations

import sys
import traceback
from types import ModuleType
from typing import Any

from ..errors import EncodeError, PyisolateError, RemoteError
from .base import EXT_EXCEPTION, DecodeError, _Decoder, _ext, _pack, _thread
from .walk import _ExceptionArgs, _walk_arg


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
    elif isinstance(exc, PyisolateError) and exc._pyisolate_fields:  # keyword fields: rebuilt as itself
        extras = {"fields": {k: v for k in exc._pyisolate_fields if _plain(v := getattr(exc, k, None))}}
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


def _plain(value: object) -> bool:
    """A keyword field that may travel: str, int, None, or a list of str."""
    return value is None or type(value) in (str, int) or (type(value) is list and all(type(v) is str for v in value))


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__qualname__} object>"


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
            elif issubclass(cls, PyisolateError) and cls._pyisolate_fields and type(extras.get("fields")) is dict:
                fields = extras["fields"]
                exc = cls(*args, **{k: v for k, v in fields.items() if k in cls._pyisolate_fields and _plain(v)})
            else:
                exc = cls(*args)
            if str(exc) != message:  # args do not rebuild it faithfully
                exc = None
            elif "remote_traceback" not in getattr(cls, "_pyisolate_fields", ()):
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

"""Types an application registers: its own values travel as themselves, its objects by reference.

A host application registers its types once, in a function that the host and every worker
import (``ExtensionManagerConfig.types``)::

    def register_types(registry: pyisolate.TypeRegistry) -> None:
        registry.register(torch.device, name="torch.device", encode=str, decode=torch.device)
        registry.register(SavedResult)                    # a dataclass: its fields, by name
        registry.register(FolderType)                     # an enum: its value
        registry.register(ModelPatcher, by_reference=True)  # stays where it is; others get a handle

- A dataclass travels as its fields by name, a NamedTuple likewise, an enum as its value.
  On decode the field names must be exactly the class's, and the class's own constructor
  rebuilds the value (its ``__post_init__`` or ``__new__`` checks run).
- Any other class gives ``encode`` (value -> a wire form the codec already carries, which may
  hold other registered values) and ``decode`` (wire form -> value).
- ``by_reference=True``: an instance is never copied. The receiver gets a handle whose public
  methods call the object where it lives (``pyisolate.handle(obj)`` does the same for one value
  of any type).

On the wire a registered value is ext 15, ``[registered name, wire form]``. The receiver looks
the name up in its own registry and nowhere else: nothing is imported by name from the wire, and
only registered classes are ever constructed. This module is data only; the codec uses it.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["Handle", "Registered", "TypeRegistry", "handle"]

#: Longest registered name: it travels in every message that carries a value of the type.
MAX_NAME = 200
#: What already travels by value: registering one of these would change what all of it means.
_CARRIED = (type(None), bool, int, float, complex, str, bytes, bytearray, memoryview, list, tuple, dict, set,
            frozenset)  # fmt: skip


class Registered:
    """One registered type: how its values leave (``to_wire``) and come back (``from_wire``)."""

    __slots__ = ("cls", "name", "by_reference", "to_wire", "from_wire", "fields", "encoder")

    def __init__(self, cls: type, name: str, by_reference: bool, to_wire: Callable[[Any], object] | None,
                 from_wire: Callable[[Any], object] | None, fields: frozenset[str] | None) -> None:
        self.cls, self.name, self.by_reference = cls, name, by_reference
        self.to_wire, self.from_wire, self.fields = to_wire, from_wire, fields
        self.encoder: Callable[[Any], object] | None = None  # the codec's, made on first use

    def __repr__(self) -> str:
        how = "by reference" if self.by_reference else "by value"
        return f"<registered type {self.name!r} ({self.cls.__module__}.{self.cls.__qualname__}, {how})>"


class TypeRegistry:
    """The application's own types, by value or by reference (see the module docstring).

    One registry serves one side of the wire: the host's manager fills its own, each worker
    fills its own with the same function, so both know the same names.
    """

    def __init__(self) -> None:
        self._by_type: dict[type, Registered] = {}
        self._by_name: dict[str, Registered] = {}

    def register(self, cls: type, *, name: str | None = None, encode: Callable[[Any], object] | None = None,
                 decode: Callable[[Any], object] | None = None, by_reference: bool = False) -> type:
        """Register ``cls`` so that its instances travel between actors.

        Args:
            cls: The class. Only instances of exactly this class match (a subclass registers
                on its own).
            name: What names it on the wire; both sides must use the same. Default:
                ``"<module>.<qualname>"``.
            encode: The instance's wire form: a value the codec already carries. Needed (with
                ``decode``) for a class that is not a dataclass, an enum or a NamedTuple.
            decode: Rebuilds an instance from its wire form; anything it raises makes the
                message undecodable (``DecodeError``), never the receiver fault.
            by_reference: Never copy an instance: the receiver gets a handle to it.

        Returns:
            ``cls``, so that ``register`` also works as a class decorator.

        Raises:
            ConfigError: the class already travels, is registered already, the name is taken or
                malformed, or ``encode``/``decode`` are missing or not callable.
        """
        if not isinstance(cls, type):
            raise ConfigError(f"TypeRegistry.register() takes a class, got {cls!r}")
        where = f"TypeRegistry.register({cls.__qualname__})"
        _refuse_carried(cls, where)
        if name is None:
            name = f"{cls.__module__}.{cls.__qualname__}"
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
            raise ConfigError(f"{where}: name must be a printable string of 1 to {MAX_NAME} characters, got {name!r}")
        if cls in self._by_type:
            raise ConfigError(f"{where}: already registered as {self._by_type[cls].name!r}; register each class once")
        if name in self._by_name:
            raise ConfigError(f"{where}: the name {name!r} is taken by {self._by_name[name].cls.__qualname__}; "
                              "pass another name=")
        if not isinstance(by_reference, bool):
            raise ConfigError(f"{where}: by_reference must be True or False, got {by_reference!r}")
        if by_reference:
            if encode is not None or decode is not None:
                raise ConfigError(f"{where}: by_reference=True sends a handle, never the value: drop encode= and "
                                  "decode=")
            entry = Registered(cls, name, True, None, None, None)
        else:
            entry = _by_value(cls, name, encode, decode, where)
        self._by_type[cls] = entry
        self._by_name[name] = entry
        return cls

    def entry(self, cls: type) -> Registered | None:
        """How ``cls`` (exactly) travels, or None if it is not registered."""
        return self._by_type.get(cls)

    def named(self, name: str) -> Registered | None:
        """The type registered under ``name``, or None."""
        return self._by_name.get(name)

    def registered_base(self, cls: type) -> Registered | None:
        """The nearest registered base class of ``cls`` (for error messages about subclasses)."""
        for base in cls.__mro__[1:]:
            if base in self._by_type:
                return self._by_type[base]
        return None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._by_name)

    def __contains__(self, cls: object) -> bool:
        return cls in self._by_type

    def __len__(self) -> int:
        return len(self._by_type)

    def __repr__(self) -> str:
        return f"<TypeRegistry of {len(self)} types>"


class Handle:
    """``pyisolate.handle(obj)``: send ``obj`` by reference, whatever its type."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __repr__(self) -> str:
        return f"<handle of {type(self.obj).__qualname__} object>"


def handle(obj: object) -> Any:
    """Mark ``obj`` to travel by reference: the receiver gets a handle, not a copy.

    The handle's public methods (plain and ``async``) call ``obj`` where it lives: awaited in
    async code, or blocking and returning the result in plain code (a worker's threads).
    Attributes are not reachable. ``obj`` is kept alive until every receiver has dropped its
    handles; a handle sent back to its owner arrives as ``obj`` itself. See
    docs/guides/host-types.md.

    Raises:
        TypeError: ``obj`` is None or a value that is not an object of its own (a class).
    """
    if isinstance(obj, Handle):
        return obj
    if obj is None or isinstance(obj, type):
        raise TypeError(f"pyisolate.handle() takes an object to share by reference, got {obj!r}")
    return Handle(obj)


def _refuse_carried(cls: type, where: str) -> None:
    carried = cls in _CARRIED or issubclass(cls, BaseException)
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if numpy is not None and issubclass(cls, (numpy.ndarray, numpy.generic)):
        carried = True
    if torch is not None and issubclass(cls, torch.Tensor):
        carried = True
    if carried or cls is Handle:
        raise ConfigError(f"{where}: {cls.__qualname__} already travels as itself (docs/protocol.md, Values); "
                          "registering it would change what every such value means")


def _by_value(cls: type, name: str, encode: Callable[[Any], object] | None, decode: Callable[[Any], object] | None,
              where: str) -> Registered:
    if (encode is None) != (decode is None):
        raise ConfigError(f"{where}: give both encode= and decode=, or neither")
    if encode is not None:
        if not callable(encode) or not callable(decode):
            raise ConfigError(f"{where}: encode= and decode= must be callables")
        return Registered(cls, name, False, encode, decode, None)
    if issubclass(cls, enum.Enum):
        return Registered(cls, name, False, _enum_value, _rebuild_enum(cls, name), None)
    if dataclasses.is_dataclass(cls):
        fields = dataclasses.fields(cls)
        skipped = [f.name for f in fields if not f.init]
        if skipped:
            raise ConfigError(f"{where}: the dataclass has field(s) {', '.join(skipped)} with init=False, so its "
                              "fields cannot rebuild it; give encode= and decode=")
        names = tuple(f.name for f in fields)
        return Registered(cls, name, False, _fields_of(names), _rebuild_fields(cls, name, frozenset(names)),
                          frozenset(names))
    if issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple):  # a NamedTuple
        names = tuple(getattr(cls, "_fields"))
        return Registered(cls, name, False, _namedtuple_fields(names), _rebuild_fields(cls, name, frozenset(names)),
                          frozenset(names))
    raise ConfigError(f"{where}: {cls.__qualname__} is not a dataclass, an enum or a NamedTuple, so pyisolate cannot "
                      "know its state; give encode= (instance -> a value that travels) and decode= (that value -> "
                      "instance), or by_reference=True to send handles instead")


def _enum_value(obj: enum.Enum) -> object:
    return obj.value


def _rebuild_enum(cls: type[enum.Enum], name: str) -> Callable[[Any], object]:
    def rebuild(value: object) -> object:
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise ValueError(f"{value!r} is not a value of {name}") from None
    return rebuild


def _fields_of(names: tuple[str, ...]) -> Callable[[Any], object]:
    def fields(obj: object) -> dict[str, object]:
        return {field: getattr(obj, field) for field in names}
    return fields


def _namedtuple_fields(names: tuple[str, ...]) -> Callable[[Any], object]:
    def fields(obj: tuple[Any, ...]) -> dict[str, object]:
        return dict(zip(names, tuple.__iter__(obj)))
    return fields


def _rebuild_fields(cls: type, name: str, names: frozenset[str]) -> Callable[[Any], object]:
    def rebuild(wire: object) -> object:
        if type(wire) is not dict or wire.keys() != names:
            if type(wire) is not dict:
                raise ValueError(f"the fields of {name} must arrive as a map, got {type(wire).__name__}")
            missing, extra = sorted(names - wire.keys()), sorted(map(repr, wire.keys() - names))
            raise ValueError(f"the fields of {name} do not match: missing {missing or 'none'}, unexpected "
                             f"{', '.join(extra) or 'none'}")
        return cls(**wire)
    return rebuild

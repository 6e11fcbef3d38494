"""The limits a user asks for: parse what they wrote, narrow it under a ceiling, say it in words.

Only values here, nothing about this machine (``limits`` enforces them), so the config and
the manifest can check limits where they are written.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .errors import ConfigError

__all__ = ["FIELDS", "Limits"]

#: The limits, in the order they are said.
FIELDS = ("memory", "cpu", "processes", "open_files")
#: Size units: bare letters and "iB" are powers of 1024 (as systemd and docker read them), "B" powers of 1000.
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d[\d_]*(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*")
#: Less than this cannot even start a Python worker: most likely a unit left out ("512" for 512 MiB).
_MIN_MEMORY = 16 * 1024**2
_MIN_CPU = 0.01


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits of one worker; None leaves that resource unlimited.

    Attributes:
        memory: Bytes of memory for the worker and its descendants together (no swap).
        cpu: Cores of CPU time per wall-clock second (1.5: one and a half cores).
        processes: Tasks, processes and threads both, in the worker's tree. A Python worker
            runs a few threads of its own (the event loop, ZeroMQ's, a pool for plain methods).
        open_files: Open file descriptors per process (RLIMIT_NOFILE).
    """

    memory: int | None = None
    cpu: float | None = None
    processes: int | None = None
    open_files: int | None = None

    def __post_init__(self) -> None:
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None:
                value = _size(value, f"Limits.{name}") if name == "memory" else value  # "4GiB" here too
                object.__setattr__(self, name, _check(name, value, "Limits"))

    @classmethod
    def parse(cls, value: Limits | Mapping[str, object] | None, *, where: str) -> Limits | None:
        """Build limits from what a user wrote: a mapping such as ``{"memory": "4GiB", "cpu": 1.5}``.

        Sizes are bytes (an int) or a number with a unit: K, M, G, T and KiB, MiB, GiB, TiB are
        powers of 1024; KB, MB, GB, TB powers of 1000 ("4GiB", "512MiB", "2G", "1.5GB").

        Args:
            value: The mapping, a ``Limits`` (returned as is) or None (no limits).
            where: Where the value was written, for error messages ("ExtensionConfig.limits").

        Raises:
            ConfigError: an unknown key, or a value that is not a positive number or size;
                the message names ``where``, the field and the fix.
        """
        if value is None or isinstance(value, Limits):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{where}: limits must be a table of memory, cpu, processes and open_files, "
                f"like {{'memory': '4GiB', 'cpu': 1.5}}, not {type(value).__name__}"
            )
        fields: dict[str, object] = {}
        for key, item in value.items():
            if key not in FIELDS:
                close = difflib.get_close_matches(str(key), FIELDS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"{where}: unknown limit {key!r}; {hint}the limits are {', '.join(FIELDS)}")
            if item is not None:
                fields[key] = _check(key, _size(item, f"{where}.{key}") if key == "memory" else item, where)
        return cls(**fields)  # type: ignore[arg-type]  # each checked by _check

    def within(self, ceiling: Limits | None, *, where: str = "limits") -> Limits:
        """Return these limits under ``ceiling``: each limit left out is taken from it.

        Args:
            ceiling: The manager-wide limits, or None.
            where: Where these limits were written, for the error message.

        Raises:
            ConfigError: one of these limits asks for more than the ceiling; names the field.
        """
        if ceiling is None:
            return self
        narrowed: dict[str, object] = {}
        for name in FIELDS:
            mine, cap = getattr(self, name), getattr(ceiling, name)
            if mine is not None and cap is not None and mine > cap:
                raise ConfigError(
                    f"{where}.{name}: {_show(name, mine)} is more than the manager's ceiling of {_show(name, cap)}; "
                    f"ask for at most {_show(name, cap)}, or raise the ceiling"
                )
            narrowed[name] = mine if mine is not None else cap
        return Limits(**narrowed)  # type: ignore[arg-type]  # values of two checked Limits

    def describe(self) -> str:
        """Say the limits in words: ``memory 4 GiB, cpu 1.5, processes 64, open files 1024``."""
        said = [
            f"{name.replace('_', ' ')} {_show(name, value)}"
            for name in FIELDS if (value := getattr(self, name)) is not None
        ]
        return ", ".join(said) or "no limits"


def _check(name: str, value: object, where: str) -> int | float:
    """Return ``value`` as limit ``name`` holds it, or raise ConfigError naming ``where`` and the fix."""
    label = f"{where}.{name}"
    if name == "cpu":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{label}: {value!r} is not a number of cores; write one like 1.5 (0.5: half a core)")
        if value < _MIN_CPU:
            raise ConfigError(
                f"{label}: {value!r} is too little CPU; ask for at least {_MIN_CPU} cores, or leave cpu out (no limit)"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "a size: bytes as an int, or a string like '4GiB'" if name == "memory" else "a whole number"
        raise ConfigError(f"{label}: {value!r} is not {kind}")
    if value <= 0:
        raise ConfigError(f"{label}: {value!r} must be more than 0; leave {name} out for no limit")
    if name == "memory" and value < _MIN_MEMORY:
        raise ConfigError(
            f"{label}: {value} bytes cannot even start a worker (at least {_show(name, _MIN_MEMORY)}); "
            f"did you mean '{value}MiB'?"
        )
    return value


def _size(value: object, label: str) -> object:
    """``value`` in bytes where it is a size string ("4GiB"), else as it is (``_check`` judges it)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 4e9
    if not isinstance(value, str):
        return value
    match = _SIZE.fullmatch(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{label}: {value!r} is not a size; write bytes, or a number with a unit: "
            "'512MiB', '4GiB', '2G' (powers of 1024), '1.5GB' (powers of 1000)"
        )
    try:
        return int(Decimal(match.group(1).replace("_", "")) * _UNITS[unit])
    except InvalidOperation as exc:  # "1__0"
        raise ConfigError(f"{label}: {value!r} is not a size; write a number like '4GiB'") from exc


def _show(name: str, value: int | float) -> str:
    """A limit's value in words: sizes in the largest binary unit that keeps them readable."""
    if name == "cpu":
        return f"{value:g}"
    if name != "memory":
        return str(value)
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= size:
            amount = value / size
            shown = f"{amount:.0f}" if amount.is_integer() else f"{amount:.2f}".rstrip("0").rstrip(".")
            return f"{shown} {unit}"
    return f"{value} bytes"

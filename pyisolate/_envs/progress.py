"""Progress of environment builds: its steps, uv's output read as steps, and a display.

``ProgressEvent`` / ``ProgressStep`` are what ``ExtensionManagerConfig(on_progress=...)``
receives; ``_InstallProgress`` turns the lines ``uv pip install`` prints into them.

``ProgressDisplay`` shows builds on a terminal: one line per extension, rewritten in place
(ANSI cursor movement); on anything else (a pipe, a CI log, a file) it appends one plain line per event, so a
log reads top to bottom. It draws only when an event arrives: no thread, no timer.
"""

from __future__ import annotations

import enum
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

__all__ = ["ProgressDisplay", "ProgressEvent", "ProgressStep"]


class ProgressStep(enum.StrEnum):
    """The steps of an environment build, in the order they happen; each is also a plain ``str``.

    A build that reports anything ends with exactly one of ``DONE``, ``REUSED`` or ``FAILED``.
    """

    #: Another build of this extension's venv holds its lock (another process, or task).
    WAITING = "waiting"
    #: The venv is up to date: no uv run at all. Final.
    REUSED = "reused"
    #: ``uv venv`` is creating the empty venv.
    CREATING = "creating"
    #: uv is resolving the dependencies (detail: the requirements).
    RESOLVING = "resolving"
    #: uv resolved ``packages`` packages and fetches those not in its cache; repeated with
    #: the package as detail when uv names one (``numpy (17.4MiB)``, ``building foo==1.0``).
    DOWNLOADING = "downloading"
    #: uv has everything and installs ``packages`` packages into the venv.
    INSTALLING = "installing"
    #: The venv is ready (``packages``: how many uv installed). Final.
    DONE = "done"
    #: The build failed or was cancelled (detail: the tail of uv's output, or ``cancelled``). Final.
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    """One step of an environment build, reported to ``ExtensionManagerConfig.on_progress``.

    Attributes:
        extension: the extension whose venv this is.
        step: a ``ProgressStep`` (compares equal to its string: ``event.step == "done"``).
        elapsed: seconds since the build (or the check for reuse) began.
        detail: what the step is working on, in words; may be empty.
        packages: how many packages the step concerns, where uv said so; else None.
    """

    extension: str
    step: str
    elapsed: float
    detail: str = ""
    packages: int | None = None


#: uv's own lines (``uv pip install``, output not a terminal), leading blanks stripped.
_RESOLVED = re.compile(r"Resolved (\d+) packages? in ")
_DOWNLOADING = re.compile(r"Downloading (\S+)(?: \((.+)\))?$")
_BUILDING = re.compile(r"Building (\S.*)$")
_PREPARED = re.compile(r"Prepared (\d+) packages? in ")
_INSTALLED = re.compile(r"Installed (\d+) packages? in ")

_Emit = Callable[..., None]


class _InstallProgress:
    """Turn the lines ``uv pip install`` prints into progress steps, as they arrive."""

    def __init__(self, emit: _Emit) -> None:
        self._emit = emit
        self.resolved: int | None = None
        self.installed = 0

    def __call__(self, line: str) -> None:
        text = line.strip()
        if match := _RESOLVED.match(text):
            self.resolved = int(match[1])
            self._emit(ProgressStep.DOWNLOADING, _count(self.resolved), packages=self.resolved)
        elif match := _DOWNLOADING.match(text):
            detail = f"{match[1]} ({match[2]})" if match[2] else match[1]
            self._emit(ProgressStep.DOWNLOADING, detail, packages=self.resolved)
        elif match := _BUILDING.match(text):
            self._emit(ProgressStep.DOWNLOADING, f"building {match[1]}", packages=self.resolved)
        elif match := _PREPARED.match(text):
            count = self.resolved if self.resolved is not None else int(match[1])
            self._emit(ProgressStep.INSTALLING, _count(count), packages=count)
        elif match := _INSTALLED.match(text):
            self.installed = int(match[1])


def _count(n: int) -> str:
    return f"{n} package" if n == 1 else f"{n} packages"

_DEFAULT_COLUMNS = 80
_UP = "\x1b[{}A"  # cursor up n lines
_CLEAR_TO_END = "\x1b[K"  # erase the rest of the line
_LABELS: dict[str, str] = {
    ProgressStep.WAITING: "waiting for another build",
    ProgressStep.CREATING: "creating venv",
}


def describe(event: ProgressEvent) -> str:
    """Say what an event means, on one line: ``resolving numpy<2, 0.2 s``, ``done in 2.3 s``."""
    detail = _one_line(event.detail)
    seconds = f"{event.elapsed:.1f} s"
    if event.step == ProgressStep.DONE:
        packages = f" ({detail})" if detail else ""
        return f"done in {seconds}{packages}"
    if event.step == ProgressStep.REUSED:
        return "up to date"
    if event.step == ProgressStep.FAILED:  # the last line of uv's output says why
        lines = [_one_line(line) for line in event.detail.splitlines() if line.strip()]
        return f"failed after {seconds}" + (f": {lines[-1]}" if lines else "")
    label = _LABELS.get(event.step, event.step)
    return f"{label} {detail}, {seconds}" if detail else f"{label}, {seconds}"


def _one_line(text: str) -> str:
    """``text`` with no line breaks and no control characters (which would move the cursor)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


class ProgressDisplay:
    """Draw environment builds on ``stream``: pass it as ``on_progress``, close it when done.

    Args:
        stream: where to draw; standard error by default.
        tty: redraw in place (True) or append plain lines (False); by default, whether
            ``stream`` is a terminal.

    Use it as a context manager, or call ``close()``; events that arrive after that are
    ignored. It never closes ``stream``. Events may come from any thread.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self._stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self._tty = tty
        self._lines: dict[str, str] = {}  # extension -> what it does now, in order of arrival
        self._drawn = 0  # lines of the block on screen, above the cursor
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, event: ProgressEvent) -> None:
        """Show ``event``."""
        with self._lock:
            if self._closed:
                return
            text = describe(event)
            self._lines[event.extension] = text
            try:
                if self._tty:
                    self._redraw()
                else:
                    self._stream.write(f"{event.extension}: {text}\n")
                self._stream.flush()
            except (OSError, ValueError):  # the terminal went away or the stream was closed
                self._closed = True

    def close(self) -> None:
        """Stop drawing; the lines drawn stay. Idempotent."""
        with self._lock:
            self._closed = True

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _redraw(self) -> None:
        columns = self._columns()
        width = max(len(name) for name in self._lines)
        out = [_UP.format(self._drawn)] if self._drawn else []  # back to the block's first line
        for name, text in self._lines.items():
            line = f"{name:<{width}}  {text}"[: columns - 1]  # a wrapped line would break the count
            out.append(f"{line}{_CLEAR_TO_END}\n")
        self._stream.write("".join(out))
        self._drawn = len(self._lines)

    def _columns(self) -> int:
        try:
            return max(os.get_terminal_size(self._stream.fileno()).columns, 20)
        except (AttributeError, OSError, ValueError):  # not a real terminal (io.UnsupportedOperation)
            return _DEFAULT_COLUMNS

"""Cut a child process's output into text lines, whatever arrives: partial reads, huge lines, bytes.

Used for worker stdout and stderr (``pyisolate._host.process``) and for uv's output (``venv``). A line longer
than ``limit`` bytes is cut there, the rest of it dropped and counted; bytes that are not UTF-8
are shown as ``\\xNN`` escapes, never an error.
"""

from __future__ import annotations

__all__ = ["MAX_LINE", "LineSplitter"]

#: The most bytes of one line that are kept: a worker that writes a megabyte without a newline
#: costs the host this much memory, not a megabyte.
MAX_LINE = 64 * 1024


class LineSplitter:
    """Feed it chunks as they are read; it returns the complete lines they finish."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._pending = bytearray()
        self._cut = 0  # bytes of the current line dropped beyond the limit

    def feed(self, data: bytes) -> list[str]:
        """Take ``data`` and return the lines it completes (without their line ends)."""
        lines: list[str] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._take(data[start:end])
            lines.append(self._line())
            start = end + 1
        self._take(data[start:])
        return lines

    def flush(self) -> list[str]:
        """Return the unfinished last line, if any (call once the stream has ended)."""
        if not self._pending and not self._cut:
            return []
        return [self._line()]

    def _take(self, piece: bytes) -> None:
        room = self._limit - len(self._pending)
        if len(piece) > room:
            self._pending += piece[: max(room, 0)]
            self._cut += len(piece) - max(room, 0)
        else:
            self._pending += piece

    def _line(self) -> str:
        text = self._pending.decode("utf-8", "backslashreplace").rstrip("\r")
        if self._cut:
            text += f" [... {self._cut} more bytes of this line dropped]"
        self._pending.clear()
        self._cut = 0
        return text

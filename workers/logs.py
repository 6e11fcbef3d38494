"""Log records from a worker to its host, as lines on the worker's stderr.

The worker's root logger writes each record as one line: ``MARKER`` followed by a JSON object
``{"level": int, "logger": str, "message": str}`` (the message with its traceback, if any,
already formatted). The host reads the worker's stderr line by line, re-logs each such record
at its own level under ``pyisolate.extension.<name>.<logger>``, and treats every other line as
plain stderr text. Both sides use this module, so the format is defined once.

A record and plain text share one stream, written through the same ``sys.stderr`` object, so
their order is kept; a record written after a partial line of text (no newline yet) still
parses, because the host looks for the marker anywhere in the line.
"""

from __future__ import annotations

import json
import logging
from typing import NamedTuple, TextIO

__all__ = ["MARKER", "MAX_MESSAGE", "Record", "RecordHandler", "parse_line"]

#: Starts every record line. Control characters that text output does not normally hold.
MARKER = "\x1epyisolate-log\x1f"
#: A longer message keeps its head and its tail (where a traceback says what went wrong), so
#: the whole record stays under the host's line limit and still parses there.
MAX_MESSAGE = 16_000
_HEAD = 4_000


class Record(NamedTuple):
    """A worker's log record as the host receives it."""

    level: int
    logger: str
    message: str


class RecordHandler(logging.StreamHandler[TextIO]):
    """Write each record to ``stream`` as one marker-prefixed JSON line (worker side)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter("%(message)s"))  # adds the traceback and stack, if any

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if len(message) > MAX_MESSAGE:
            cut = len(message) - MAX_MESSAGE
            tail = MAX_MESSAGE - _HEAD
            message = f"{message[:_HEAD]}\n[... {cut} characters cut ...]\n{message[-tail:]}"
        payload = {"level": record.levelno, "logger": record.name, "message": message}
        return MARKER + json.dumps(payload, ensure_ascii=False)


def parse_line(line: str) -> tuple[str, Record | None]:
    """Split one stderr line into the plain text before a record and the record (host side).

    Returns:
        ``(text, record)``: ``text`` is the whole line when it holds no record; ``record`` is
        None when there is none, or when what follows the marker does not parse (then the
        rest of the line stays in ``text``, without the marker).
    """
    at = line.find(MARKER)
    if at < 0:
        return line, None
    text, raw = line[:at], line[at + len(MARKER):]
    try:
        payload = json.loads(raw)
        level, logger, message = payload["level"], payload["logger"], payload["message"]
    except (ValueError, TypeError, KeyError):
        return text + raw, None
    if not (isinstance(level, int) and isinstance(logger, str) and isinstance(message, str)):
        return text + raw, None
    return text, Record(max(level, 1), logger, message)

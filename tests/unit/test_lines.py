"""Lines out of a child's output, and worker log records on its stderr, whatever the bytes."""

from __future__ import annotations

import io
import logging
import sys

from hypothesis import given
from hypothesis import strategies as st

from pyisolate._envs.lines import LineSplitter
from pyisolate.workers.logs import MARKER, MAX_MESSAGE, Record, RecordHandler, parse_line


def test_lines_are_joined_across_reads_and_the_last_one_is_flushed():
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == ["one"]
    assert splitter.feed(b"o\r\nthr") == ["two"]
    assert splitter.feed(b"") == []
    assert splitter.flush() == ["thr"]
    assert splitter.flush() == []


def test_bytes_that_are_not_utf8_are_escaped():
    assert LineSplitter().feed(b"ok \xc3\xa9 bad \xff\x00\n") == ["ok \u00e9 bad \\xff\x00"]


def test_a_long_line_is_cut_and_says_how_much_was_dropped():
    splitter = LineSplitter(limit=4)
    assert splitter.feed(b"abcdefg") == []
    assert splitter.feed(b"hij\nnext\n") == ["abcd [... 6 more bytes of this line dropped]", "next"]
    assert splitter.feed(b"123456") == []
    assert splitter.flush() == ["1234 [... 2 more bytes of this line dropped]"]


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_any_chunking_gives_the_lines_of_the_whole(chunks: list[bytes]):
    splitter = LineSplitter(limit=1 << 20)
    lines = [line for chunk in chunks for line in splitter.feed(chunk)] + splitter.flush()
    parts = b"".join(chunks).split(b"\n")
    if parts[-1] == b"":
        parts.pop()  # a final newline ends a line; it does not start an empty one
    assert lines == [part.decode("utf-8", "backslashreplace").rstrip("\r") for part in parts]


def _record(message: str, level: int = logging.WARNING, name: str = "ext.mod", exc: bool = False) -> str:
    stream = io.StringIO()
    handler = RecordHandler(stream)
    record = logging.LogRecord(name, level, __file__, 1, message, (), None)
    if exc:
        try:
            raise KeyError("boom")
        except KeyError:
            record.exc_info = sys.exc_info()
    handler.emit(record)
    return stream.getvalue()


def test_a_record_is_one_line_and_parses_back():
    line = _record("two\nlines", logging.ERROR, exc=True)
    assert line.startswith(MARKER) and line.endswith("\n") and line.count("\n") == 1
    text, record = parse_line(line.rstrip("\n"))
    assert text == ""
    assert record is not None and (record.level, record.logger) == (logging.ERROR, "ext.mod")
    assert record.message.startswith("two\nlines\nTraceback") and "KeyError: 'boom'" in record.message


def test_text_before_a_record_is_kept_apart():
    text, record = parse_line("half a line" + _record("then a record").rstrip("\n"))
    assert (text, record) == ("half a line", Record(logging.WARNING, "ext.mod", "then a record"))


def test_plain_lines_and_broken_records_stay_text():
    assert parse_line("plain") == ("plain", None)
    assert parse_line(MARKER + '{"level": 30, "logger": "x", "mess') == ('{"level": 30, "logger": "x", "mess', None)
    assert parse_line(MARKER + '{"level": "high", "logger": "x", "message": "m"}')[1] is None
    assert parse_line(MARKER + "[1, 2]")[1] is None


def test_a_huge_message_keeps_its_head_and_its_tail():
    message = "head" + "x" * (3 * MAX_MESSAGE) + "tail"
    _, record = parse_line(_record(message).rstrip("\n"))
    assert record is not None
    assert record.message.startswith("head") and record.message.endswith("tail")
    assert len(record.message) < MAX_MESSAGE + 100 and "characters cut" in record.message

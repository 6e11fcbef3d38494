"""A real worker's stdout, stderr and log records reach the host's logging, tagged with its name."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pyisolate import ExtensionBase, ExtensionConfig, ExtensionCrashedError, ExtensionManager, ExtensionManagerConfig
from pyisolate._envs.lines import MAX_LINE
from tests.support import ext

pytestmark = pytest.mark.venv

DEADLINE = 120.0
BASE = "pyisolate.extension.chatty"


class Until(logging.Handler):
    """Set an event once ``end`` was logged from the worker's stdout and from its stderr."""

    def __init__(self, end: str) -> None:
        super().__init__(logging.DEBUG)
        self.waiting = {("stdout", end), ("stderr", end)}
        self.arrived = asyncio.Event()  # records are logged on the loop, by the readers' tasks

    def emit(self, record: logging.LogRecord) -> None:
        self.waiting.discard((getattr(record, "stream", ""), record.getMessage()))
        if not self.waiting:
            self.arrived.set()


@pytest.fixture
def chatty_logs(caplog: pytest.LogCaptureFixture):
    """Capture everything under pyisolate.extension at DEBUG (set before the worker starts)."""
    caplog.set_level(logging.DEBUG, logger="pyisolate.extension")
    return caplog


def _seen(caplog: pytest.LogCaptureFixture) -> dict[str, logging.LogRecord]:
    return {r.getMessage(): r for r in caplog.records if r.name.startswith(BASE)}


async def _until(manager: ExtensionManager, caplog: pytest.LogCaptureFixture, end: str, call: str,
                 args: tuple[object, ...]) -> dict[str, logging.LogRecord]:
    """Call ``call(*args)`` on chatty and wait until both its streams said ``end``."""
    until = Until(end)
    logging.getLogger(BASE).addHandler(until)
    try:
        async with asyncio.timeout(DEADLINE):
            chatty = await manager.load_extension(ExtensionConfig(name="chatty", module_path=ext("chatty")))
            assert await getattr(chatty, call)(*args) is True
            await until.arrived.wait()
    finally:
        logging.getLogger(BASE).removeHandler(until)
    return _seen(caplog)


async def test_output_and_records_reach_logging_with_the_extension_name(manager, chatty_logs):
    seen = await _until(manager, chatty_logs, "hi end", call="talk", args=("hi",))

    def tags(record: logging.LogRecord) -> tuple[object, ...]:
        return record.name, record.levelno, getattr(record, "extension", None), getattr(record, "stream", None)

    assert tags(seen["hi printed"]) == (BASE, logging.INFO, "chatty", "stdout")
    assert tags(seen["hi on stderr"]) == (BASE, logging.WARNING, "chatty", "stderr")
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        record = seen[f"hi {logging.getLevelName(level).lower()}"]
        assert tags(record) == (f"{BASE}.chatty.inner", level, "chatty", "log")
    assert seen["hi from the root logger"].name == BASE  # the worker's root logger is the extension's own
    caught = next(m for m in seen if m.startswith("hi caught"))
    assert "Traceback" in caught and "ValueError: hi failed" in caught
    assert seen[caught].levelno == logging.ERROR
    # A record written after half a line of text: both arrive, neither garbled.
    assert seen["hi half a line, then "].stream == "stderr"
    assert seen["hi after the half line"].levelno == logging.WARNING
    assert not any("pyisolate-log" in m for m in seen)


async def test_undecodable_and_huge_lines_arrive_cut_and_escaped(manager, chatty_logs):
    size = MAX_LINE * 3
    seen = await _until(manager, chatty_logs, "garbage end", call="garbage", args=(size,))
    assert "bad \\xff\\xfe\x00 bytes" in seen
    cut = f" [... {size - MAX_LINE} more bytes of this line dropped]"
    assert "x" * MAX_LINE + cut in seen
    assert seen["y" * MAX_LINE + cut].stream == "stdout"


async def test_a_crash_keeps_its_last_lines_in_the_log_and_in_the_error(manager, chatty_logs):
    async with asyncio.timeout(DEADLINE):
        chatty = await manager.load_extension(ExtensionConfig(name="chatty", module_path=ext("chatty")))
        with pytest.raises(ExtensionCrashedError) as info:
            await chatty.crash(7)
    assert info.value.exit_code == 7
    # The error is raised only once the worker's output was read to its end.
    tail = info.value.stderr_tail.splitlines()
    assert tail[-2:] == ["ERROR chatty.inner: last record", "last words on stderr, no newline"]
    seen = _seen(chatty_logs)
    assert seen["last words on stdout"].stream == "stdout"
    assert seen["last record"].levelno == logging.ERROR
    assert seen["last words on stderr, no newline"].levelno == logging.WARNING


async def test_the_library_installs_no_handler(venv_root, chatty_logs):
    def handlers() -> dict[str, list[logging.Handler]]:
        loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                          if n.startswith("pyisolate"))]
        return {logger.name: list(logger.handlers) for logger in loggers}

    before = handlers()
    assert logging.getLogger("pyisolate").handlers == []
    config = ExtensionManagerConfig(venv_root_path=venv_root)
    async with ExtensionManager(ExtensionBase, config) as manager:
        await _until(manager, chatty_logs, "bye end", call="talk", args=("bye",))
    after = handlers()
    assert {name: hs for name, hs in after.items() if hs} == {name: hs for name, hs in before.items() if hs}
    assert f"{BASE}.chatty.inner" in after  # the loggers were made, and given no handler


UNCONFIGURED_HOST = """
import asyncio, logging, sys
import pyisolate

exec(sys.argv[3])  # the logging setup under test, before any extension loads
logging.getLogger("host").info("the host's own info")

async def main():
    config = pyisolate.ExtensionManagerConfig(venv_root_path=sys.argv[1])
    async with pyisolate.ExtensionManager(pyisolate.ExtensionBase, config) as manager:
        chatty = await manager.load_extension(pyisolate.ExtensionConfig(name="chatty", module_path=sys.argv[2]))
        await chatty.talk("quiet")

asyncio.run(main())
"""


def _host(venv_root: object, setup: str) -> list[str]:
    """Run a host that configures logging with ``setup`` and calls chatty.talk("quiet"); its stderr."""
    proc = subprocess.run([sys.executable, "-c", UNCONFIGURED_HOST, str(venv_root), ext("chatty"), setup],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # a worker's output never lands on the host's stdout
    return proc.stderr.splitlines()


def test_an_application_without_logging_setup_still_sees_worker_warnings(venv_root):
    # No basicConfig: logging's last resort prints WARNING and worse to the host's stderr.
    lines = _host(venv_root, "")
    assert "quiet on stderr" in lines and "quiet error" in lines and "quiet end" in lines
    assert "quiet info" not in lines and "quiet printed" not in lines  # INFO stays below the last resort


# The setups that docs/guides/logging.md gives for seeing what an extension prints (the README and
# getting-started use the first), and whether the host's own INFO records show with them.
HOST_INFO_SHOWN = {
    ("logging.basicConfig(level=logging.INFO)",): True,
    ("logging.basicConfig()", 'logging.getLogger("pyisolate.extension").setLevel(logging.INFO)'): False,
}


@pytest.mark.parametrize("setup", HOST_INFO_SHOWN, ids=["basicConfig-INFO", "extensions-only"])
def test_the_documented_line_shows_what_an_extension_prints(venv_root, setup):
    guide = (Path(__file__).parents[2] / "docs" / "guides" / "logging.md").read_text()
    assert all(f"\n{line}  #" in guide for line in setup), "the guide no longer says this"
    lines = _host(venv_root, "\n".join(setup))
    assert "INFO:pyisolate.extension.chatty:quiet printed" in lines
    assert "INFO:pyisolate.extension.chatty:quiet end" in lines
    assert "INFO:pyisolate.extension.chatty.chatty.inner:quiet info" in lines  # records pass at INFO too
    assert "WARNING:pyisolate.extension.chatty:quiet on stderr" in lines
    assert not any("quiet debug" in line for line in lines)
    assert ("INFO:host:the host's own info" in lines) is HOST_INFO_SHOWN[setup]

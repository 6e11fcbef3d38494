"""Progress events from uv's output, and ProgressDisplay's exact output on a pipe and on a terminal."""

from __future__ import annotations

import io

import pytest

from pyisolate import ProgressDisplay, ProgressEvent, ProgressStep
from pyisolate._envs.progress import _InstallProgress


def ev(extension: str, step: str, elapsed: float, detail: str = "", packages: int | None = None) -> ProgressEvent:
    return ProgressEvent(extension=extension, step=step, elapsed=elapsed, detail=detail, packages=packages)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


BUILD = [
    ev("numpy1", "creating", 0.01),
    ev("numpy1", "resolving", 0.02, "numpy<2"),
    ev("plain", "reused", 0.0),
    ev("numpy1", "downloading", 0.31, "1 package", 1),
    ev("numpy1", "downloading", 0.32, "numpy (17.4MiB)", 1),
    ev("numpy1", "installing", 1.9, "1 package", 1),
    ev("numpy1", "done", 2.34, "1 package", 1),
]


def test_plain_stream_gets_one_appended_line_per_event():
    out = io.StringIO()
    with ProgressDisplay(stream=out) as display:
        for event in BUILD:
            display(event)
    assert out.getvalue() == (
        "numpy1: creating venv, 0.0 s\n"
        "numpy1: resolving numpy<2, 0.0 s\n"
        "plain: up to date\n"
        "numpy1: downloading 1 package, 0.3 s\n"
        "numpy1: downloading numpy (17.4MiB), 0.3 s\n"
        "numpy1: installing 1 package, 1.9 s\n"
        "numpy1: done in 2.3 s (1 package)\n"
    )


def test_terminal_gets_one_line_per_extension_redrawn_in_place():
    out = FakeTerminal()
    display = ProgressDisplay(stream=out)
    for event in BUILD[:4]:
        display(event)
    display(ev("numpy1", "failed", 3.0, "Resolved 1 package\n  error: no space left on device\n\n"))
    display.close()
    up, clear = "\x1b[{}A", "\x1b[K"
    assert out.getvalue() == (
        f"numpy1  creating venv, 0.0 s{clear}\n"
        f"{up.format(1)}numpy1  resolving numpy<2, 0.0 s{clear}\n"
        f"{up.format(1)}numpy1  resolving numpy<2, 0.0 s{clear}\n"
        f"plain   up to date{clear}\n"
        f"{up.format(2)}numpy1  downloading 1 package, 0.3 s{clear}\n"
        f"plain   up to date{clear}\n"
        f"{up.format(2)}numpy1  failed after 3.0 s: error: no space left on device{clear}\n"
        f"plain   up to date{clear}\n"
    )


def test_terminal_lines_are_cut_to_the_width_so_none_wraps():
    out = FakeTerminal()  # no real terminal behind it: 80 columns
    with ProgressDisplay(stream=out) as display:
        display(ev("ext", "resolving", 0.5, "pkg" * 40))
    line = out.getvalue()
    assert line.endswith("\x1b[K\n")
    assert line.removesuffix("\x1b[K\n") == ("ext  resolving " + "pkg" * 40)[:79]


def test_tty_can_be_forced_either_way():
    plain, drawn = FakeTerminal(), io.StringIO()
    ProgressDisplay(stream=plain, tty=False)(ev("a", "done", 1.0))
    ProgressDisplay(stream=drawn, tty=True)(ev("a", "done", 1.0))
    assert plain.getvalue() == "a: done in 1.0 s\n"
    assert drawn.getvalue() == "a  done in 1.0 s\x1b[K\n"


def test_after_close_events_are_ignored_and_close_is_idempotent():
    out = io.StringIO()
    display = ProgressDisplay(stream=out)
    display(ev("a", "creating", 0.0))
    display.close()
    display.close()
    display(ev("a", "done", 1.0))
    assert out.getvalue() == "a: creating venv, 0.0 s\n"


def test_a_stream_that_goes_away_stops_the_display_not_the_build():
    out = io.StringIO()
    display = ProgressDisplay(stream=out)
    out.close()
    display(ev("a", "creating", 0.0))  # ValueError inside: swallowed, drawing stops
    display(ev("a", "done", 1.0))


def test_unknown_steps_and_multiline_details_stay_on_one_line():
    out = io.StringIO()
    with ProgressDisplay(stream=out) as display:
        display(ev("a", "linking", 0.25, "first\nsecond\x1b[2J"))
    assert out.getvalue() == "a: linking first second [2J, 0.2 s\n"  # no escape reaches the terminal


def test_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]):
    with ProgressDisplay() as display:
        display(ev("a", "done", 1.0))
    assert capsys.readouterr().err == "a: done in 1.0 s\n"


# Lines `uv pip install` printed to a pipe (uv 0.13), a cold cache then an sdist build.
UV_COLD = """Using Python 3.11.7 environment at: venv
Resolved 2 packages in 132ms
Downloading numpy (17.4MiB)
 Downloaded numpy
Prepared 2 packages in 259ms
Installed 2 packages in 18ms
 + numpy==1.26.4
 + six==1.16.0"""
UV_SDIST = """Resolved 1 package in 100ms
   Building six==1.17.0
      Built six==1.17.0
Prepared 1 package in 1.25s
Installed 1 package in 0.81ms
 + six==1.17.0"""
UV_WARM = """Resolved 1 package in 154ms
Installed 1 package in 1ms
 + six==1.16.0"""


@pytest.mark.parametrize(("output", "expected", "installed"), [
    (UV_COLD, [("downloading", "2 packages", 2), ("downloading", "numpy (17.4MiB)", 2),
               ("installing", "2 packages", 2)], 2),
    (UV_SDIST, [("downloading", "1 package", 1), ("downloading", "building six==1.17.0", 1),
                ("installing", "1 package", 1)], 1),
    (UV_WARM, [("downloading", "1 package", 1)], 1),
    ("error: No solution found when resolving dependencies", [], 0),
], ids=["cold-cache", "sdist", "warm-cache", "failure"])
def test_uv_output_becomes_steps(output: str, expected: list[tuple[str, str, int]], installed: int):
    seen: list[tuple[str, str, int | None]] = []
    parse = _InstallProgress(lambda step, detail="", *, packages=None: seen.append((step, detail, packages)))
    for line in output.splitlines():
        parse(line)
    assert seen == expected
    assert all(type(step) is ProgressStep for step, _, _ in seen)
    assert parse.installed == installed

"""``pyisolate top``, ``stack`` and ``profile``: see inside a running host from outside.

All three attach to the host's admin endpoint (``attach``), which the host serves only when
asked to (``ExtensionManagerConfig(admin=True)`` or ``PYISOLATE_ADMIN=1``). ``profile`` runs
py-spy (the ``profile`` extra) on the worker's pid, as this user.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .attach import AttachError, HostEndpoint, ask, find_host
from .output import EXIT_FAILED, EXIT_OK, UsageError, error, print_json

__all__ = ["COMMANDS"]

_COLUMNS = ("NAME", "STATE", "PID", "CALLS/S", "CALLS", "ERRORS", "P99", "INFLIGHT", "QUEUED", "RSS", "PSS",
            "CPU%", "RESTARTS")


def _host_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, metavar="PID|PATH",
                        help="the host process to attach to, or the admin socket of one of its managers "
                             "(manager.admin_path; default: the only one running)")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds > 0")
    return value


# -- top -----------------------------------------------------------------------------------


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value = value / 1024  # type: ignore[assignment]
    return "-"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    return f"{seconds * 1e3:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def rows(now: dict[str, Any], before: dict[str, Any] | None) -> list[list[str]]:
    """The table of ``top``: one row per extension of snapshot ``now``; rates against ``before``."""
    elapsed = now["time"] - before["time"] if before is not None else 0.0
    earlier = before["extensions"] if before is not None else {}
    table = []
    for name, ext in now["extensions"].items():
        last = earlier.get(name)
        rate = cpu = "-"
        if last is not None and elapsed > 0 and ext.get("calls") is not None and last.get("calls") is not None:
            rate = f"{(ext['calls'] - last['calls']) / elapsed:.1f}"
        if (last is not None and elapsed > 0 and ext.get("cpu_seconds") is not None
                and last.get("cpu_seconds") is not None):
            cpu = f"{100 * (ext['cpu_seconds'] - last['cpu_seconds']) / elapsed:.0f}"
        errors = sum(ext.get("errors", {}).values())
        table.append([name, ext["state"], str(ext.get("pid") or "-"), rate, str(ext.get("calls", "-")), str(errors),
                      _latency(ext.get("p99")), str(ext.get("in_flight", "-")), str(ext.get("queued", "-")),
                      _size(ext.get("rss")), _size(ext.get("pss")), cpu, str(ext.get("restarts", "-"))])
    return table


def render(now: dict[str, Any], before: dict[str, Any] | None) -> str:
    """``top``'s screen: a heading line and the aligned table."""
    table = [list(_COLUMNS), *rows(now, before)]
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    lines = [f"pyisolate host {now['pid']}: {len(now['extensions'])} extension(s)"
             + ("" if now.get("counting", True) else " (calls not counted: ExtensionManagerConfig(stats=False))")]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def _snapshot(host: HostEndpoint) -> dict[str, Any]:
    stats = ask(host, {"op": "stats"}).get("stats")
    if not isinstance(stats, dict) or not isinstance(stats.get("extensions"), dict):
        raise AttachError(f"host {host.pid} sent a malformed snapshot")
    return stats


def _top(args: argparse.Namespace) -> int:
    host = find_host(args.host)
    if args.json:
        print_json(_snapshot(host))
        return EXIT_OK
    before = _snapshot(host)
    if args.once:  # one table, its rates over one interval
        time.sleep(args.interval)
        print(render(_snapshot(host), before))
        return EXIT_OK
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    print(clear + render(before, None), flush=True)
    while True:
        time.sleep(args.interval)
        now = _snapshot(host)
        print(clear + render(now, before), flush=True)
        before = now


def _configure_top(parser: argparse.ArgumentParser) -> None:
    _host_option(parser)
    parser.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    parser.add_argument("--once", action="store_true", help="print one table (rates over one interval) and exit")
    parser.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                        help="seconds between refreshes (default 1)")


# -- stack ---------------------------------------------------------------------------------


def _stack(args: argparse.Namespace) -> int:
    host = find_host(args.host)
    answer = ask(host, {"op": "stack", "target": args.extension})
    text = answer.get("text")
    if not isinstance(text, str):
        raise AttachError(f"host {host.pid} sent a malformed stack dump")
    if args.extension == "host":
        print(f"host {host.pid}, every thread (the event loop's among them), most recent call last:")
    else:
        print(f"extension {args.extension!r}, worker pid {answer.get('pid')}, every thread, most recent call first:")
    print(text, end="" if text.endswith("\n") else "\n")
    if answer.get("complete") is False:
        error("the worker's main thread did not run Python code again within 2 s (it is stuck in C code): "
              "the dump above may be cut short")
    return EXIT_OK


def _configure_stack(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("extension", metavar="EXT", help="the extension's name, or 'host' for the host's own threads")
    _host_option(parser)


# -- profile -------------------------------------------------------------------------------

_PTRACE_HINT = (
    "py-spy reads the worker's memory with ptrace. Workers are non-dumpable (so that other processes of "
    "the same user cannot read them), which leaves ptrace to processes with CAP_SYS_PTRACE: run the command "
    "as root (sudo), or give py-spy the capability (sudo setcap cap_sys_ptrace+ep \"$(which py-spy)\"); "
    "in a container, run it with --cap-add SYS_PTRACE")


def py_spy() -> str | None:
    """The py-spy executable: beside this interpreter (the ``profile`` extra), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _profile(args: argparse.Namespace) -> int:
    spy = py_spy()
    if spy is None:
        error("py-spy is not installed: pip install 'pyisolate[profile]' (or pip install py-spy)")
        return EXIT_FAILED
    if args.extension == "host":
        raise UsageError("profile takes an extension's name; profile the host itself with py-spy record --pid "
                         "<host pid>")
    host = find_host(args.host)
    pid = ask(host, {"op": "pids"}).get("extensions", {}).get(args.extension)
    if not isinstance(pid, int):
        raise AttachError(f"host {host.pid} has no running worker for extension {args.extension!r}")
    output = args.output or Path(f"{args.extension}-{pid}.speedscope.json")
    command = [spy, "record", "--pid", str(pid), "--duration", str(max(1, round(args.seconds))), "--format",
               "speedscope", "--output", str(output), "--rate", str(args.rate)]
    print(f"profiling extension {args.extension!r} (pid {pid}) for {args.seconds:g} s ...", file=sys.stderr)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if result.returncode != 0 or not output.is_file():
        detail = result.stdout.strip().splitlines()[-3:] if result.stdout else []
        permission = any(word in result.stdout.lower() for word in ("permission", "ptrace", "operation not permitted"))
        error(f"py-spy could not profile pid {pid} (exit code {result.returncode}): {' / '.join(detail)}"
              + (f"\n{_PTRACE_HINT}" if permission else ""))
        return EXIT_FAILED
    print(f"wrote {output} (speedscope JSON: open it at https://www.speedscope.app or with `speedscope {output}`)")
    return EXIT_OK


def _configure_profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("extension", metavar="EXT", help="the extension's name")
    _host_option(parser)
    parser.add_argument("--seconds", type=_positive, default=10.0, metavar="S",
                        help="how long to record (whole seconds, at least 1; default 10)")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="where to write the speedscope JSON (default: EXT-PID.speedscope.json)")
    parser.add_argument("--rate", type=int, default=100, help="samples per second (default 100)")


def _attached(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a host that cannot be attached to, or that refused, as exit code 1 with its reason."""
    def checked(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except AttachError as exc:
            error(str(exc))
            return EXIT_FAILED
    return checked


#: name -> (help, description, configure(parser), run(args))
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]]
COMMANDS = {
    "top": ("a live table of a running host's extensions",
            "Attach to a running host's admin endpoint and show each extension's state, calls/s, p99 latency, "
            "calls in flight, memory, CPU and restarts, refreshed every --interval seconds (Ctrl-C ends).",
            _configure_top, _attached(_top)),
    "stack": ("every thread's Python stack of a worker (or of the host)",
              "Print every thread's Python stack of an extension's worker, even when its event loop is blocked "
              "(a faulthandler dump on a signal), or of the host's own threads with EXT 'host'.",
              _configure_stack, _attached(_stack)),
    "profile": ("record a profile of a worker with py-spy (speedscope JSON)",
                "Sample one extension's worker with py-spy for --seconds and write a speedscope JSON file "
                "(open it at speedscope.app). Needs py-spy (pip install 'pyisolate[profile]') and ptrace "
                "rights over the worker (see docs/guides/observability.md).",
                _configure_profile, _attached(_profile)),
}

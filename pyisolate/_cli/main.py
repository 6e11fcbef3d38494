"""The ``pyisolate`` command line: ``doctor``, ``env list|build|repair|prune``, ``bench``, and
``top``, ``stack``, ``profile`` (which attach to a running host: see ``inspect``).

Exit codes, for scripts: 0 everything went well; 1 problems were found or an operation
failed; 2 the command line is wrong (unknown option, missing argument, a path that does not
exist, a venv root that is not one). ``--json`` prints one JSON document on standard output;
progress and messages go to standard error. See docs/guides/cli.md.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pyisolate

from . import env as _cli_env
from . import inspect as _cli_inspect
from . import remote as _cli_remote
from .doctor import ERROR, WARN, run_checks
from .output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, VENV_ROOT_ENV, UsageError, default_venv_root, error, print_json

__all__ = ["build_parser", "main"]


# -- doctor --------------------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.venv_root)
    bad = {ERROR, WARN} if args.strict else {ERROR}
    ok = not any(check.status in bad for check in checks)
    if args.json:
        print_json({"ok": ok, "checks": [check.as_dict() for check in checks]})
    else:
        for check in checks:
            print(f"{check.status:<6} {check.name:<10} {check.summary}")
            if check.fix:
                print(f"{'':<6} {'':<10} fix: {check.fix}")
        problems = sum(check.status in bad for check in checks)
        print("no problems found" if ok else f"{problems} problem(s) found")
    return EXIT_OK if ok else EXIT_FAILED


# -- bench ---------------------------------------------------------------------------------


def bench_script() -> Path | None:
    """``benchmarks/run.py`` of the source checkout this pyisolate runs from, if any."""
    script = Path(pyisolate.__file__).resolve().parent.parent / "benchmarks" / "run.py"
    return script if script.is_file() else None


def _bench(args: argparse.Namespace) -> int:
    script = bench_script()
    if script is None:
        error("the benchmark suite (benchmarks/run.py) ships with the source repository, not with the "
              "installed package; clone the repository, pip install -e '.[bench]' there, and run it from it")
        return EXIT_USAGE
    return subprocess.call([sys.executable, str(script), *args.args])


# -- the parser ----------------------------------------------------------------------------

_EPILOG = """\
exit codes: 0 ok, 1 problems found or an operation failed, 2 usage error.
examples:
  pyisolate doctor                       check uv, ipc, /dev/shm, torch, CUDA
  pyisolate env list --json              every venv: extension, dependencies, size, last use
  pyisolate env build extensions/*       build venvs ahead of time (no extension starts)
  pyisolate env prune --keep extensions  remove venvs no extension there uses
  pyisolate top                          a running host's extensions, live (host: admin=True)
  pyisolate keys host my_ext             CURVE key pairs for a host and a remote worker
  pyisolate worker --connect tcp://HOST:5555 --server-key host.key --key my_ext.key_secret DIR
"""


def _root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--venv-root", type=lambda s: Path(s).expanduser().absolute(), default=None, metavar="DIR",
        help=f"the folder of the extensions' venvs (default: ${VENV_ROOT_ENV}, else ./venvs)",
    )  # fmt: skip


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of days >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole command line (``bench`` arguments are split off before it)."""
    formatter = argparse.HelpFormatter  # sub-commands: descriptions wrapped to the terminal
    parser = argparse.ArgumentParser(
        prog="pyisolate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Inspect and manage pyisolate's environment: its prerequisites and the extensions' venvs.",
    )  # fmt: skip

    parser.add_argument("--version", action="version", version=f"pyisolate {pyisolate.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what pyisolate does (to stderr)")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    doctor = commands.add_parser(
        "doctor", help="check what pyisolate needs on this machine", formatter_class=formatter,
        description="Check uv, the broker's ipc endpoint directory, /dev/shm, torch, CUDA IPC and the "
        "venv root; say what to do about each problem.",
        epilog="exit code 1 when a check fails (with --strict, also on a warning).",
    )  # fmt: skip
    _root_option(doctor)
    _json_option(doctor)
    doctor.add_argument("--strict", action="store_true", help="count warnings as problems")
    doctor.set_defaults(run=_doctor, command_parser=doctor)

    env = commands.add_parser(
        "env", help="list, build, repair and prune the extensions' venvs", formatter_class=formatter,
        description="Manage the virtual environments pyisolate builds, one per extension, under the "
        f"venv root (--venv-root, else ${VENV_ROOT_ENV}, else ./venvs).",
    )  # fmt: skip
    env.set_defaults(run=lambda _: _usage(env), command_parser=env)
    env_commands = env.add_subparsers(title="commands", metavar="COMMAND")
    for name, (help_text, description, configure, run) in _cli_env.COMMANDS.items():
        sub = env_commands.add_parser(name, help=help_text, description=description, formatter_class=formatter)
        _root_option(sub)
        _json_option(sub)
        configure(sub, _days)
        sub.set_defaults(run=run, command_parser=sub)

    bench = commands.add_parser(
        "bench", help="run the benchmark suite (source checkout only)", formatter_class=formatter,
        usage="pyisolate bench [-h] [ARGS ...]",
        description="Run benchmarks/run.py of the source checkout with this interpreter, passing every "
        "argument through (pyisolate bench --quick --check). `pyisolate bench -- --help` shows the "
        "suite's own options. Exit code: the suite's; 2 when pyisolate was installed without it.",
    )  # fmt: skip
    bench.set_defaults(run=_bench, args=[])

    for name, (help_text, description, add_options, attach) in {**_cli_inspect.COMMANDS,
                                                                **_cli_remote.COMMANDS}.items():
        sub = commands.add_parser(name, help=help_text, description=description, formatter_class=formatter)
        add_options(sub)
        sub.set_defaults(run=attach, command_parser=sub)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _split_bench(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split ``[global options] bench ARGS`` into what argparse reads and ARGS, untouched."""
    for index, token in enumerate(argv):
        if token == "bench":
            rest = argv[index + 1 :]
            if rest and rest[0] in ("-h", "--help"):
                return argv, None  # our own help
            return argv[: index + 1], rest[1:] if rest[:1] == ["--"] else rest
        if not token.startswith("-"):
            break
    return argv, None


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, arguments: list[str],
                  extra: list[str]) -> None:
    """Exit 2 on arguments no parser took, with the usage of the command they were given to."""
    # The top level's options take no value, so its first plain word is the command.
    command = next((i for i, token in enumerate(arguments) if not token.startswith("-")), len(arguments))
    where = arguments.index(extra[0]) if extra[0] in arguments else len(arguments)
    given_to = parser if where < command else getattr(args, "command_parser", parser)
    given_to.error(f"unrecognized arguments: {' '.join(extra)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code (0 ok, 1 problems found, 2 usage error)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    arguments, bench_args = _split_bench(arguments)
    try:
        args, extra = parser.parse_known_args(arguments)
        if extra:
            _unrecognized(parser, args, arguments, extra)
    except SystemExit as exc:  # argparse: 0 after --help/--version, 2 on a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if bench_args is not None:
        args.args = bench_args
    if not hasattr(args, "run"):
        return _usage(parser)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")  # an application may
    if getattr(args, "venv_root", "absent") is None:
        args.venv_root = default_venv_root()
    try:
        code: int = args.run(args)
    except UsageError as exc:
        error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code

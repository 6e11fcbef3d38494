"""What every command shares: exit codes, the venv root's default, how results and errors are printed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "VENV_ROOT_ENV", "UsageError", "default_venv_root", "error", "print_json",
]  # fmt: skip

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
VENV_ROOT_ENV = "PYISOLATE_VENV_ROOT"


class UsageError(Exception):
    """The command line is wrong: exit code 2, with this message."""


def default_venv_root() -> Path:
    """``$PYISOLATE_VENV_ROOT`` if set, else ``./venvs`` (what the README's examples use)."""
    return Path(os.environ.get(VENV_ROOT_ENV) or "venvs").expanduser().absolute()


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2))


def error(message: str) -> None:
    print(f"pyisolate: error: {message}", file=sys.stderr)

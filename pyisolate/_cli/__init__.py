"""The ``pyisolate`` command line: ``main`` parses and dispatches; ``doctor`` checks this
machine; ``env`` lists, builds, repairs and prunes venvs; ``output`` holds what every
command shares (exit codes, printing)."""

from __future__ import annotations

from .main import main

__all__ = ["main"]

"""``python -m pyisolate``: the ``pyisolate`` command line (see pyisolate.cli)."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())

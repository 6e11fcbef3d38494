"""``python -m pyisolate``: the ``pyisolate`` command line (see pyisolate._cli.main)."""

from __future__ import annotations

from ._cli import main

raise SystemExit(main())

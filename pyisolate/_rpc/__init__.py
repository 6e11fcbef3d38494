"""One actor's calls: the Endpoint and the parts it is made of (see ``endpoint``).

The rest of pyisolate uses ``Endpoint`` and ``CHAIN`` (the call chain a task serves); the
method rules (``public_methods``, ``resolve_method``) are re-exported for the worker.
"""

from __future__ import annotations

from .._dispatch import public_methods, resolve_method
from .endpoint import Endpoint
from .serve import CHAIN

__all__ = ["CHAIN", "Endpoint", "public_methods", "resolve_method"]

"""The worker process's own endpoint, for code running inside an extension (None in the host)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .endpoint import Endpoint

_worker_endpoint: Endpoint | None = None


def worker_endpoint() -> Endpoint | None:
    """The endpoint of this worker process, or None when running in the host."""
    return _worker_endpoint


def set_worker_endpoint(endpoint: Endpoint | None) -> None:
    """Install the worker's endpoint (the worker runtime does this once)."""
    global _worker_endpoint
    _worker_endpoint = endpoint

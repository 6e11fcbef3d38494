"""Values on the wire: the codec (msgpack plus a closed set of ext types, never pickle) and the
shared memory that tensors and large arrays travel in.

- ``codec``: ``encode``/``decode`` and exceptions' forms; it holds the built-in types and
  composes the rest, each importing only those below it: ``base`` (limits, ext codes,
  per-thread packers, the decoder), ``walk`` (the slow path and error paths), ``arrays``
  (numpy), ``tensors`` (torch), ``exceptions`` (ext 11), ``types`` (the application's registered
  types and handles, ext 15).
- ``shm``: sealed memfd segments, their ids, leases, pins and pool, and the channel that
  passes their descriptors between the host and each worker; ``born``: tensors and arrays
  made in shared memory (``pyisolate.shared_empty``).

The rest of pyisolate uses what this module names; nothing else here.
"""

from __future__ import annotations

from . import shm
from .born import shared_empty, shared_empty_array
from .codec import DecodeError, decode, decode_exception, encode, encode_exception
from .types import Handle, TypeRegistry, handle

__all__ = ["DecodeError", "Handle", "TypeRegistry", "decode", "decode_exception", "encode", "encode_exception",
           "handle", "shared_empty", "shared_empty_array", "shm"]

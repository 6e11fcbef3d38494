"""An extension that imports a host module defining singletons, loaded without apis=[...]."""

from shared_api import DatabaseAPI  # noqa: F401

from pyisolate import ExtensionBase


class NeedsApis(ExtensionBase):
    async def ping(self):
        return "pong"

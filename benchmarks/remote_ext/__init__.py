"""The benchmark's remote extension: echoes what it gets (run by `pyisolate worker`)."""

from pyisolate import ExtensionBase


class RemoteBench(ExtensionBase):
    async def aecho(self, value):
        return value

"""The benchmark host's shared service: a ProxiedSingleton that extensions call."""

from pyisolate import ProxiedSingleton


class BenchService(ProxiedSingleton):
    async def echo(self, value):
        return value

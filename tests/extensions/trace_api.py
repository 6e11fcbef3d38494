"""A singleton of the tracing tests' host that calls on: host -> extension -> it -> extension."""

from pyisolate import ProxiedSingleton


class Relay(ProxiedSingleton):
    """Forwards a call to the actor the test gave it (``Relay().peer``)."""

    def __init__(self):
        self.peer = None

    async def forward(self, method, *args):
        return await getattr(self.peer, method)(*args)

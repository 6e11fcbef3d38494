"""An extension whose methods are named like the handle's own attributes (name, config, state)."""

from pyisolate import ExtensionBase


class Named(ExtensionBase):
    def name(self):
        return "the extension's own name()"

    def config(self, key):
        return {"key": key}

    async def state(self):
        return "the extension's own state()"

"""Calls other actors by name: the "pricing" extension and the host's "AuditLog" singleton."""

import pyisolate
from pyisolate import ExtensionBase, UnroutableError


class Checkout(ExtensionBase):
    async def total(self, items):
        pricing = pyisolate.get_actor("pricing")  # another extension: broker-routed, no host code runs
        audit = pyisolate.get_actor("AuditLog")  # a singleton of the host, by its class name
        total = 0.0
        for item in items:
            total += await pricing.price(item)
        await audit.record("checkout", f"{len(items)} items, {total:.2f}")
        return total

    async def call_unknown(self):
        try:
            await pyisolate.get_actor("inventory").count("apple")
        except UnroutableError as exc:
            return f"UnroutableError: {exc}"
        return "unexpectedly reached 'inventory'"

"""Knows the prices. Other actors call it by its name, "pricing"."""

from pyisolate import ExtensionBase

PRICES = {"apple": 0.5, "bread": 2.25, "cheese": 4.0}


class Pricing(ExtensionBase):
    async def price(self, item):
        return PRICES[item]

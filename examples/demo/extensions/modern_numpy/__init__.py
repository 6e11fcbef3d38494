"""An extension that needs numpy 2.x."""

import sys

import numpy as np

from pyisolate import ExtensionBase


class ModernNumpy(ExtensionBase):
    def describe(self) -> dict:
        return {"numpy": np.__version__, "python": sys.executable}

    async def normalise(self, values: list[float]) -> list[float]:
        data = np.asarray(values, dtype=np.float64)
        return ((data - data.min()) / np.ptp(data)).tolist()  # np.ptp: numpy 2 keeps the function form

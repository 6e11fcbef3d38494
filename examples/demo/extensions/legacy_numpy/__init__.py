"""An extension pinned to numpy 1.x."""

import sys

import numpy as np

from pyisolate import ExtensionBase


class LegacyNumpy(ExtensionBase):
    def describe(self) -> dict:
        return {"numpy": np.__version__, "python": sys.executable}

    def stats(self, values: list[float]) -> tuple[float, float]:
        data = np.asarray(values)
        return float(data.mean()), float(data.std())

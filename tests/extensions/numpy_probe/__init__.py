"""Reports the numpy it sees: loaded under several names, each with its own venv and numpy."""

import sys

import numpy

from pyisolate import ExtensionBase


class NumpyExtension(ExtensionBase):
    def numpy_version(self):
        return numpy.__version__

    def numpy_file(self):
        return numpy.__file__

    def mean(self, values):
        return numpy.array(values).mean()

    def array(self, n):
        return numpy.arange(n, dtype=numpy.float32).reshape(-1, 2)

    def prefix(self):
        return sys.prefix

"""A node pack that needs numpy 1.x. Its node is a plain method: it runs in a thread of the
worker, so calls on the model's handle block and return their values, as on the model itself."""

from pathlib import Path

import numpy as np
from nodeapp.results import FolderType, SavedResult  # the host's package, from host_paths

from pyisolate import ExtensionBase


class OldPack(ExtensionBase):
    def sharpen(self, model, values: list[float], output_dir: str) -> tuple[SavedResult, str]:
        device, dtype = model.placement()  # a call into the host: a Device and a DType come back
        out = np.asarray(model.forward(values), dtype=dtype.value)  # the host runs the model
        sharpened = out + (out - np.convolve(out, np.ones(3) / 3, mode="same"))
        filename = f"sharpened_{device.type}.npy"
        np.save(Path(output_dir) / filename, sharpened)  # output_dir is writable: the host granted it
        return SavedResult(filename, "", FolderType.output), np.__version__

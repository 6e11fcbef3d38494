"""A node pack that needs numpy 2.x. Its node is a coroutine: it runs on the worker's event
loop, so calls on the model's handle are awaited."""

from pathlib import Path

import numpy as np
from nodeapp.results import FolderType, SavedResult  # the host's package, from host_paths

from pyisolate import ExtensionBase


class NewPack(ExtensionBase):
    async def blur(self, model, values: list[float], output_dir: str) -> tuple[SavedResult, str]:
        device, dtype = await model.placement()  # a call into the host: a Device and a DType come back
        out = np.asarray(await model.forward(values), dtype=dtype.value)  # the host runs the model
        blurred = np.convolve(out, np.ones(3) / 3, mode="same")
        filename = f"blurred_{device.type}.npy"
        np.save(Path(output_dir) / filename, blurred)  # output_dir is writable: the host granted it
        return SavedResult(filename, "", FolderType.output), np.__version__

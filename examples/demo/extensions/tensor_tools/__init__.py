"""An extension that shares the host's torch (share_torch=True) and works on its tensors in place."""

import torch

from pyisolate import ExtensionBase


class TensorTools(ExtensionBase):
    def centre(self, t: torch.Tensor) -> float:
        mean = float(t.mean())
        t.sub_(mean)  # in place: the host sees it, the tensor was shared, not copied
        return mean

    def torch_version(self) -> str:
        return str(torch.__version__)  # a str subclass; the wire carries plain str

"""What the host keeps for itself: a model, and the device and dtype values that describe it."""

from __future__ import annotations

import enum
import os


class DType(enum.Enum):
    """Stands in for torch.float32, torch.float16: an enum travels as its value."""

    float32 = "float32"
    float16 = "float16"


class Device:
    """Stands in for torch.device: not a dataclass, so it registers with encode= and decode=."""

    def __init__(self, spec: str) -> None:
        self.type, _, index = spec.partition(":")
        self.index = int(index) if index else None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))


class Model:
    """A model loaded once, in the host. It is registered by reference: never copied; an
    extension that receives one gets a handle whose public methods run here, in the host."""

    def __init__(self, name: str, scale: float, device: Device, dtype: DType) -> None:
        # Shared code tells the two sides apart by PYISOLATE_CHILD, "1" in every worker.
        if os.environ.get("PYISOLATE_CHILD") == "1":
            raise RuntimeError("models are loaded by the host; extensions receive a handle to one")
        self.name, self.scale, self.device, self.dtype = name, scale, device, dtype
        self.calls = 0  # calls that extensions made, for the host to count

    def placement(self) -> tuple[Device, DType]:
        """Where the weights are, and in what precision."""
        self.calls += 1
        return self.device, self.dtype

    def forward(self, values: list[float]) -> list[float]:
        """Run the model on ``values``."""
        self.calls += 1
        return [v * self.scale for v in values]

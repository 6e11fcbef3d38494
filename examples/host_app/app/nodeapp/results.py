"""What nodes return: values that travel by value, as themselves."""

from __future__ import annotations

import dataclasses
import enum


class FolderType(enum.Enum):
    output = "output"
    temp = "temp"


@dataclasses.dataclass(frozen=True)
class SavedResult:
    """A file a node saved, as ComfyUI's nodes report one."""

    filename: str
    subfolder: str
    type: FolderType

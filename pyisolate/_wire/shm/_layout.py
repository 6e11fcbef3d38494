"""Layouts a handle may describe: every element at its own place, inside the segment."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["extent"]


def extent(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> int | None:
    """How far (in the strides' unit) the layout reaches past its first element, or None.

    None when two indexes would share memory: a zero stride (``expand()``, numpy broadcasting)
    or overlapping dimensions, which turn a few bytes into an enormous tensor or array. Such
    layouts are sent as contiguous copies and refused on receipt, as are negative strides and
    elements of no size. Dimensions of size 1 take no room; an empty layout reaches 0.
    """
    if 0 in shape:
        return 0
    if itemsize <= 0:  # elements of no size: any count of them would fit in nothing
        return None
    reach = itemsize
    for stride, size in sorted((s, n) for n, s in zip(shape, strides) if n > 1):
        if stride < reach:  # this dimension steps inside the ones before it
            return None
        reach += (size - 1) * stride
    return reach

"""What every data source shares: argument checks and the unreadable-item contract.

A data source that can meet a bad file *after* it has numbered its items (a video that opens
but does not decode, a feature file holding NaN) raises :class:`UnreadableItemError` from
``__getitem__``, naming the file. It never returns another item in its place: the numbering of
a data set stays fixed for its whole life, so a split made from it (``Subset``) never changes.
The loaders of :mod:`.batching` turn the error into a :class:`Skipped` record, drop the item
from its batch and let the caller exclude its index from every later epoch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from torch import Tensor


class UnreadableItemError(ValueError):
    """Item ``index`` of a data set cannot be read; ``path`` is its file, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), str(reason)

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.path, self.reason)


class UnreadableFileWarning(UserWarning):
    """Files of a data set could not be read at construction and were left out."""


class Skipped(NamedTuple):
    """An item left out of a batch: its index in the loader's data set, its file and why."""

    index: int
    path: str
    reason: str


def error_text(err: BaseException) -> str:
    """``"TypeName: message"`` on one line (for skip records)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_index(index: Any, n: int) -> int:
    if isinstance(index, Tensor) and index.ndim == 0:
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for a data set of {n} items")
    return int(index) % n


def _frame_size(frame_size: Any, where: str) -> tuple[int, int] | None:
    """``None``, an int ``S`` -> ``(S, S)``, or ``(H, W)``; positive ints."""
    if frame_size is None:
        return None
    if isinstance(frame_size, (int, np.integer)) and not isinstance(frame_size, bool):
        frame_size = (int(frame_size), int(frame_size))
    if (
        not isinstance(frame_size, (tuple, list))
        or len(frame_size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in frame_size)
    ):
        raise ValueError(f"{where}: frame_size must be an int, (H, W) positive ints, or None, got {frame_size!r}")
    return int(frame_size[0]), int(frame_size[1])

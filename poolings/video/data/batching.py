"""Batching: padding variable-length videos, and loaders that leave unreadable items out.

``collate_videos`` pads a list of ``(frames, label)`` items::

    frames  (B, Tmax, *frame_shape)   zero after each video's end
    lengths (B,)                      int64
    labels  (B,) int64  or  (B, K) float32

``make_loader`` wraps it in a ``DataLoader`` whose shuffle depends only on its seed, and which
applies the unreadable-item policy of :mod:`._common`: an item whose ``__getitem__`` raises
:class:`UnreadableItemError` is dropped from its batch (never replaced by another item) and
recorded as a :class:`Skipped` in ``loader.skipped``. The record travels with the batch, so
failures met in ``DataLoader`` worker processes reach the main process too. The caller passes
the indices found so far as ``exclude=`` when it builds the next epoch's loader.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from argminlayers import lengths_to_mask

from ._common import Skipped, UnreadableItemError


def collate_videos(batch: Sequence[tuple[Tensor, Any]]) -> tuple[Tensor, Tensor, Tensor]:
    """Pad a list of ``(frames, label)`` items into one batch.

    Args:
        batch: items ``(x_i, y_i)`` with ``x_i: Tensor[T_i, *S]`` (``S`` = ``(C, H, W)`` for frames,
            ``(p,)`` for features; the same ``S`` for every item, ``T_i >= 1``) and ``y_i`` an
            ``int`` or a ``Tensor[K]`` of 0/1 (multi-label).

    Returns:
        ``frames: Tensor[B, Tmax, *S]`` with zeros after each video's end,
        ``lengths: LongTensor[B]``, ``labels: LongTensor[B]`` or ``FloatTensor[B, K]``.
    """
    if len(batch) == 0:
        raise ValueError("collate_videos: batch is empty")
    xs, ys = zip(*batch)
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise TypeError(
                f"collate_videos: item {i} frames must be a Tensor[T, ...] with at least 2 dims, "
                f"got {type(x).__name__}{'' if not isinstance(x, Tensor) else tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"collate_videos: item {i} has no frames (T = 0)")
        if x.shape[1:] != xs[0].shape[1:]:
            raise ValueError(
                f"collate_videos: item {i} has frame shape {tuple(x.shape[1:])}, "
                f"item 0 has {tuple(xs[0].shape[1:])}; all frames in a batch must match"
            )
    lengths = torch.tensor([x.shape[0] for x in xs], dtype=torch.long)  # (B,)
    frames = torch.nn.utils.rnn.pad_sequence(list(xs), batch_first=True)  # (B, Tmax, *S)
    return frames, lengths, _collate_labels(ys)


def _collate_labels(ys: Sequence[Any]) -> Tensor:
    if all(isinstance(y, Tensor) and y.ndim == 1 for y in ys):  # multi-label
        if any(y.shape != ys[0].shape for y in ys):
            raise ValueError("collate_videos: multi-label label vectors have different lengths")
        return torch.stack([y.to(torch.float32) for y in ys])  # (B, K)
    out = []
    for i, y in enumerate(ys):
        if isinstance(y, Tensor) and y.ndim == 0 and not y.is_floating_point():
            y = int(y)
        if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, np.integer)):
            raise TypeError(
                f"collate_videos: item {i} label must be an int or a Tensor[K] of 0/1, got {y!r}; "
                "a batch cannot mix the two"
            )
        out.append(int(y))
    return torch.tensor(out, dtype=torch.long)  # (B,)


def pack_padded(frames: Tensor, lengths: Tensor) -> Tensor:
    """Valid steps of a padded batch, concatenated: ``Tensor[B, Tmax, *S] -> Tensor[sum(lengths), *S]``.

    Video ``b`` contributes rows ``frames[b, :lengths[b]]``, in batch order. One boolean-mask
    gather; no loop over frames or videos.
    """
    if frames.ndim < 2:
        raise ValueError(f"pack_padded: frames must be (B, Tmax, ...), got shape {tuple(frames.shape)}")
    if lengths.shape != frames.shape[:1]:
        raise ValueError(
            f"pack_padded: lengths must have shape ({frames.shape[0]},), got {tuple(lengths.shape)}"
        )
    mask = lengths_to_mask(lengths.to(frames.device), frames.shape[1])  # (B, Tmax)
    return frames[mask]  # (N, *S)


def pad_packed(packed: Tensor, lengths: Tensor) -> Tensor:
    """Inverse of :func:`pack_padded`: ``Tensor[sum(lengths), *S] -> Tensor[B, max(lengths), *S]``."""
    lengths = lengths.to(torch.long).cpu()
    if packed.shape[0] != int(lengths.sum()):
        raise ValueError(
            f"pad_packed: packed has {packed.shape[0]} rows but lengths sum to {int(lengths.sum())}"
        )
    return torch.nn.utils.rnn.pad_sequence(list(packed.split(lengths.tolist())), batch_first=True)


# --------------------------------------------------------------------------------------------
# Loaders that leave unreadable items out
# --------------------------------------------------------------------------------------------


class _Noted(NamedTuple):
    """An item (or :class:`Skipped`) with the cache-write failures its read left in a worker."""

    item: Any
    cache_failures: list


def _cache_owner(dataset: Dataset):
    """The data set under ``dataset`` (through ``Subset``-like ``.dataset``) that reports cache failures."""
    while dataset is not None and not hasattr(dataset, "take_cache_failures"):
        dataset = getattr(dataset, "dataset", None)
    return dataset


class _Reading(Dataset):
    """``dataset`` restricted to ``indices``; an unreadable item becomes a :class:`Skipped` record."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices
        self._owner = _cache_owner(dataset)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        try:
            item = self.dataset[i]
        except UnreadableItemError as err:
            item = Skipped(i, err.path, err.reason)
        failures = self._owner.take_cache_failures() if self._owner is not None else []
        return _Noted(item, failures) if failures else item


def _collate_reading(batch: Sequence[Any]) -> tuple[tuple[Tensor, Tensor, Tensor] | None, tuple[Skipped, ...], list]:
    """``(collate_videos(readable items) or None, skipped records, cache failures)``; runs in the worker."""
    failures = [f for b in batch if isinstance(b, _Noted) for f in b.cache_failures]
    batch = [b.item if isinstance(b, _Noted) else b for b in batch]
    skipped = tuple(b for b in batch if isinstance(b, Skipped))
    items = [b for b in batch if not isinstance(b, Skipped)]
    return (collate_videos(items) if items else None), skipped, failures


class VideoLoader(DataLoader):
    """A ``DataLoader`` of ``(frames, lengths, labels)`` batches that records unreadable items.

    ``skipped`` lists a :class:`Skipped` (index into the data set given to :func:`make_loader`,
    path, reason) for every item left out so far. A batch whose items were all unreadable is
    not yielded, except under ``torch.distributed``, where it is yielded as ``None`` so that
    every process takes the same number of steps.
    """

    def __init__(self, *args: Any, yield_empty: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skipped: list[Skipped] = []
        self.yield_empty = yield_empty

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor] | None]:
        for batch, skipped, cache_failures in super().__iter__():
            self.skipped.extend(Skipped(*s) for s in skipped)
            if cache_failures:                  # failed in a worker: warn here, once per cache folder
                from .folder import warn_cache_write

                warn_cache_write(*cache_failures[0], stacklevel=3)
            if batch is not None or self.yield_empty:
                yield batch


def make_loader(
    dataset: Dataset,
    batch_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    distributed: bool | None = None,
    num_workers: int = 0,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    exclude: Collection[int] = (),
) -> VideoLoader:
    """A :class:`VideoLoader` with :func:`collate_videos` and reproducible shuffling.

    The sampler draws from the indices of ``dataset`` not in ``exclude`` (the unreadable items
    found so far), so it is rebuilt without them for every epoch; with nothing excluded the
    order is that of a ``DataLoader(dataset, shuffle=shuffle, generator=Generator().manual_seed(seed))``.

    ``distributed=None`` (default) shards the data when ``torch.distributed`` is initialised,
    ``True`` requires it, ``False`` never shards. Sharded, each process reads its own part
    through a ``DistributedSampler(shuffle=shuffle, seed=seed, drop_last=True)``: every process
    gets ``len // world_size`` items and the remainder sits the epoch out (different items each
    epoch when shuffled), so no item is read twice in one epoch. Call
    ``loader.sampler.set_epoch(epoch)`` at the start of every epoch to reshuffle.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_loader: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"make_loader: num_workers must be an int >= 0, got {num_workers!r}")
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise RuntimeError("make_loader: distributed=True needs torch.distributed.init_process_group() first")
    sharded = initialised if distributed is None else bool(distributed)
    excluded = set(int(i) for i in exclude)
    view = _Reading(dataset, [i for i in range(len(dataset)) if i not in excluded])
    common = dict(
        batch_size=batch_size,
        collate_fn=_collate_reading,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        yield_empty=sharded,
    )
    if sharded:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(view, shuffle=shuffle, seed=seed, drop_last=True)
        return VideoLoader(view, sampler=sampler, **common)
    generator = torch.Generator().manual_seed(int(seed))
    return VideoLoader(view, shuffle=shuffle, generator=generator, **common)


def read_items(dataset: Dataset, exclude: Collection[int] = ()) -> tuple[list[int], list[Any], list[Skipped]]:
    """Every readable item of ``dataset`` in order: ``(indices, items, skipped)``, in this process."""
    indices, items, skipped = [], [], []
    excluded = set(exclude)
    for i in range(len(dataset)):
        if i in excluded:
            continue
        try:
            items.append(dataset[i])
            indices.append(i)
        except UnreadableItemError as err:
            skipped.append(Skipped(i, err.path, err.reason))
    return indices, items, skipped

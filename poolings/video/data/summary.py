"""What a run is about to train on, read from the data sets without decoding a video.

:func:`describe` returns a JSON-ready dict per split (items, items per class, lengths, the
files left out at construction); :func:`format_summary` prints the start-of-run summary. Each
data source offers ``classes``, ``targets`` (labels) and ``frame_counts`` (frames per item,
``None`` where unknown without decoding); one that keeps fewer frames than its files hold
(``VideoFolder`` with ``num_frames``) also offers ``item_lengths``, the frames each item gives.
Where files can be unreadable, ``left_out`` (path -> reason) lists those found at construction
(or, without it, ``unreadable``); a ``Subset`` is followed to its data set.
"""

from __future__ import annotations

import statistics
from typing import Any

from torch.utils.data import Dataset, Subset


def _unwrap(dataset: Dataset) -> tuple[Any, list[int]]:
    """The data set under any ``Subset``s and the indices of ``dataset``'s items in it."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def describe(dataset: Dataset) -> dict[str, Any]:
    """``items``, ``per_class`` (counts; positives per class for multi-label data), ``lengths``
    (``min``, ``median``, ``max``, ``unknown``: the frames each item gives the model, and
    ``in_files`` (``min``, ``max``) where the files hold more) and ``unreadable`` (files left out
    at construction; not those found at a later read, which the loaders report)."""
    base, idx = _unwrap(dataset)
    out: dict[str, Any] = {"items": len(idx)}
    classes = list(getattr(base, "classes", []) or [])
    targets = getattr(base, "targets", None)
    if classes and targets is not None:
        labels = [targets[i] for i in idx]
        counts = [0] * len(classes)
        for y in labels:
            if isinstance(y, (list, tuple)):  # multi-label: 0/1 per class
                for k, v in enumerate(y):
                    counts[k] += int(v)
            else:
                counts[int(y)] += 1
        out["per_class"] = dict(zip(classes, counts))
    in_files = getattr(base, "frame_counts", None)
    frames = getattr(base, "item_lengths", None)
    frames = in_files if frames is None else frames
    if frames is not None:
        known = [int(frames[i]) for i in idx if frames[i] is not None]
        out["lengths"] = {"min": min(known, default=None), "median": statistics.median(known) if known else None,
                          "max": max(known, default=None), "unknown": len(idx) - len(known)}
        stored = [int(in_files[i]) for i in idx if in_files[i] is not None] if in_files is not None else []
        if stored and stored != known:
            out["lengths"]["in_files"] = {"min": min(stored), "max": max(stored)}
    left_out = getattr(base, "left_out", None)
    out["unreadable"] = dict((getattr(base, "unreadable", {}) if left_out is None else left_out) or {})
    return out


def format_summary(summary: dict[str, Any], *, frame_shape: tuple[int, ...] | None = None,
                   source: str = "") -> list[str]:
    """The start-of-run summary of ``{"train": describe(...), "test": describe(...)}`` as lines;
    a line starting with ``warning:`` flags a training split with a single class."""
    train, test = summary["train"], summary["test"]
    shape = "" if frame_shape is None else ("; features p = " + str(frame_shape[0]) if len(frame_shape) == 1
                                            else "; frames " + "×".join(map(str, frame_shape)))
    classes = list(train.get("per_class", {}))
    lines = [f"data{' ' + source if source else ''}: train {train['items']} items, test {test['items']} items"
             + (f", {len(classes)} classes" if classes else "") + shape]
    if classes:
        per = ", ".join(f"{c} {train['per_class'][c]}/{test.get('per_class', {}).get(c, 0)}" for c in classes)
        lines.append(f"  per class (train/test): {per}")
    spans = []
    for name, part in (("train", train), ("test", test)):
        n = part.get("lengths")
        if n and n["min"] is not None:
            unknown = f", {n['unknown']} not in their headers" if n["unknown"] else ""
            files = n.get("in_files")
            files = f"; {files['min']}–{files['max']} in the files" if files else ""
            spans.append(f"{name} {n['min']}–{n['max']} (median {n['median']:g}{unknown}{files})")
        elif n:
            spans.append(f"{name}: not in the file headers")
    if spans:
        lines.append("  frames per item (as the model sees them): " + "; ".join(spans))
    bad = {**train.get("unreadable", {}), **test.get("unreadable", {})}
    if bad:
        listed = "; ".join(f"{p} ({r})" for p, r in bad.items())
        lines.append(f"  unreadable, left out: {len(bad)} file{'s' if len(bad) != 1 else ''}: {listed}")
    present = [c for c in classes if train["per_class"][c] > 0]
    if classes and len(present) < 2:
        lines.append(f"warning: the training split holds a single class ({', '.join(present) or 'none'}): "
                     "a classifier learns nothing from it; check the folder layout")
    return lines

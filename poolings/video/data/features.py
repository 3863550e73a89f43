"""Pre-extracted per-frame features: feature files or tensors, and extracting them from videos.

Feature files follow the policy of video folders: at construction every file is probed cheaply
(its header only: ``.npy`` through ``np.load(mmap_mode="r")``, ``.pt`` through
``torch.load(mmap=True)``), and a file that is unreadable, pickled, not a float ``(T, p)``
array with ``T >= 1``, or whose ``p`` differs from the other files' is left out, with one
:class:`~._common.UnreadableFileWarning` naming each. A file that passes the probe but holds
NaN or infinite values raises :class:`~._common.UnreadableItemError` (naming the file) when it
is read; the loaders leave it out of its batch and of the later epochs.
"""

from __future__ import annotations

import collections
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._common import UnreadableFileWarning, UnreadableItemError, _check_index, _check_int, error_text
from .batching import make_loader, pack_padded

FEATURE_EXTENSIONS = (".pt", ".npy")


def _open_feature_file(path: str, *, mmap: bool) -> Tensor | np.ndarray:
    """The array in a feature file: an ndarray memory-mapped (``.npy`` with ``mmap``) or a Tensor."""
    if path.endswith(".npy"):
        x = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        return x if mmap else torch.from_numpy(x)
    if path.endswith(".pt"):  # zip archives (torch.save's format) are memory-mapped; others are read
        x = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
        if not isinstance(x, Tensor):
            raise ValueError(f"holds a {type(x).__name__}, expected a Tensor[T, p]")
        return x
    raise ValueError(f"suffix must be one of {FEATURE_EXTENSIONS}")


def _shape_problem(x: Tensor | np.ndarray) -> str | None:
    floating = x.is_floating_point() if isinstance(x, Tensor) else np.issubdtype(x.dtype, np.floating)
    if x.ndim != 2 or x.shape[0] == 0 or not floating:
        dtype = str(x.dtype).replace("torch.", "")
        return f"expected a float (T, p) array with T >= 1, got {dtype} {tuple(x.shape)}"
    return None


def probe_feature_file(path: str | os.PathLike) -> tuple[int, int]:
    """``(T, p)`` of a feature file from its header (the data are memory-mapped, not read). Raises on a bad file."""
    x = _open_feature_file(os.fspath(path), mmap=True)
    problem = _shape_problem(x)
    if problem:
        raise ValueError(problem)
    return int(x.shape[0]), int(x.shape[1])


class FeatureDataset(Dataset):
    """Pre-extracted per-frame features: item ``(features: float32 Tensor[T, p], label)``.

    Args:
        features: one entry per video, each a ``Tensor[T, p]`` / ndarray (kept in memory) or a
            path to a ``.pt`` / ``.npy`` file holding one (read at each access). A single
            directory path instead reads that directory: ``FeatureDataset(root, labels_file)``
            is ``FeatureDataset.from_dir(root, labels_file=labels_file)``.
        labels: ``N`` class indices, or a ``(N, K)`` array of 0/1 for multi-label data.
        classes: class names; default ``["0", ..., "K-1"]``.

    In-memory features are checked at construction (finite, 2-D, ``T >= 1``, the same ``p``)
    and a bad one raises ``ValueError`` naming it; files are probed and bad ones left out (see
    the module docstring): ``unreadable`` maps each left-out file to the reason (``left_out``:
    those the probe found at construction, the others at a read). ``feature_dim``
    is ``p``; ``frame_counts[i]`` is item ``i``'s ``T``.
    """

    def __init__(
        self,
        features: Sequence[Tensor | np.ndarray | str | os.PathLike] | str | os.PathLike,
        labels: Sequence[int] | Tensor | np.ndarray | str | os.PathLike | None = None,
        *,
        classes: Sequence[str] | None = None,
    ) -> None:
        if isinstance(features, (str, os.PathLike)):  # a directory of feature files
            if classes is not None:
                raise ValueError("FeatureDataset: classes cannot be given with a directory; use classes.txt")
            if labels is not None and not isinstance(labels, (str, os.PathLike)):
                raise TypeError("FeatureDataset: with a directory, labels must be a labels-file path or None")
            loaded = FeatureDataset.from_dir(features, labels_file=labels)
            self.__dict__.update(loaded.__dict__)
            return
        if isinstance(features, Tensor):
            raise TypeError("FeatureDataset: features must be a sequence with one entry per video, not one Tensor")
        if labels is None:
            raise ValueError("FeatureDataset: labels are required with in-memory features or file lists")
        items: list[Tensor | str] = []
        for i, f in enumerate(features):
            if isinstance(f, (str, os.PathLike)):
                items.append(os.fspath(f))
            elif isinstance(f, (Tensor, np.ndarray)):
                items.append(self._check_item(torch.as_tensor(f), f"features[{i}]"))
            else:
                raise TypeError(
                    f"FeatureDataset: features[{i}] must be a Tensor, ndarray or path, got {type(f).__name__}"
                )
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
        if y.numel() == 0:
            y = y.to(torch.long)
        if y.ndim == 1:
            if y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"FeatureDataset: single-label labels must be integers, got dtype {y.dtype}")
            y = y.to(torch.long)
            if y.numel() and int(y.min()) < 0:
                raise ValueError("FeatureDataset: labels must be >= 0")
            k = int(y.max()) + 1 if y.numel() else 0
        elif y.ndim == 2:
            y = y.to(torch.float32)
            if not bool(((y == 0) | (y == 1)).all()):
                raise ValueError("FeatureDataset: multi-label labels must be 0/1")
            k = y.shape[1]
        else:
            raise ValueError(f"FeatureDataset: labels must be (N,) or (N, K), got shape {tuple(y.shape)}")
        if y.shape[0] != len(items):
            raise ValueError(f"FeatureDataset: {len(items)} feature entries but {y.shape[0]} labels")
        if classes is None:
            classes = [str(c) for c in range(k)]
        classes = list(classes)
        if (y.ndim == 1 and k > len(classes)) or (y.ndim == 2 and k != len(classes)):
            raise ValueError(f"FeatureDataset: labels need {k} classes but classes has {len(classes)}")
        in_memory = [x for x in items if isinstance(x, Tensor)]
        if any(x.shape[1] != in_memory[0].shape[1] for x in in_memory):
            raise ValueError("FeatureDataset: features have different dimensions p")

        # probe the files; leave out the unreadable ones and those whose p is not the common one
        shapes: dict[int, tuple[int, int]] = {}
        self.unreadable: dict[str, str] = {}
        for i, x in enumerate(items):
            if isinstance(x, str):
                try:
                    shapes[i] = probe_feature_file(x)
                except Exception as err:  # any failure leaves the file out; it must not stop training
                    self.unreadable[x] = error_text(err)
        dims = [x.shape[1] for x in in_memory] or [s[1] for s in shapes.values()]
        p = collections.Counter(dims).most_common(1)[0][0] if dims else None
        for i, (_, q) in list(shapes.items()):
            if q != p:
                self.unreadable[items[i]] = f"p = {q}, the other features have p = {p}"
                del shapes[i]
        keep = [i for i, x in enumerate(items) if isinstance(x, Tensor) or i in shapes]
        if self.unreadable:
            listed = "; ".join(f"{q} ({r})" for q, r in list(self.unreadable.items())[:5])
            more = f"; and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
            warnings.warn(f"FeatureDataset: {len(self.unreadable)} of {len(items)} feature files are unreadable "
                          f"and left out: {listed}{more}", UnreadableFileWarning, stacklevel=2)
        if not keep:
            raise ValueError("FeatureDataset: no readable feature entries"
                             + (f"; {len(self.unreadable)} unreadable files: {listed}{more}" if self.unreadable else ""))
        self.left_out: dict[str, str] = dict(self.unreadable)   # found by the probe; never numbered
        self.items = [items[i] for i in keep]
        self.labels = y[keep]
        self.frame_counts: list[int] = [x.shape[0] if isinstance(x, Tensor) else shapes[i][0]
                                        for i, x in zip(keep, self.items)]
        self._p = int(p)
        self.classes, self.num_classes = classes, len(classes)
        self.multi_label = y.ndim == 2

    @staticmethod
    def _check_item(x: Tensor, what: str) -> Tensor:
        problem = _shape_problem(x)
        if problem:
            raise ValueError(f"FeatureDataset: {what}: {problem}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"FeatureDataset: {what} holds NaN or infinite values")
        return x.to(torch.float32)

    @property
    def feature_dim(self) -> int:
        """Feature dimension ``p``."""
        return self._p

    @property
    def skipped(self) -> int:
        """Number of unreadable files found so far in this process."""
        return len(self.unreadable)

    @property
    def targets(self) -> list:
        """Each item's label, without reading the files."""
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor]:
        i = _check_index(index, len(self))
        x = self.items[i]
        if not isinstance(x, Tensor):
            path = x
            if path in self.unreadable:
                raise UnreadableItemError(path, self.unreadable[path])
            try:
                x = _open_feature_file(path, mmap=False)
                problem = _shape_problem(x)
                if problem is None and x.shape[1] != self._p:
                    problem = f"p = {x.shape[1]}, the other features have p = {self._p}"
                if problem is None and not bool(torch.isfinite(x).all()):
                    problem = "holds NaN or infinite values"
            except Exception as err:  # unreadable after the probe (changed or damaged file)
                problem = error_text(err)
            if problem:
                self.unreadable[path] = problem
                raise UnreadableItemError(path, problem)
            x = x.to(torch.float32)
        y = self.labels[i]
        return x, (y if self.multi_label else int(y))

    @classmethod
    def from_dir(
        cls,
        root: str | os.PathLike,
        *,
        labels_file: str | os.PathLike | None = None,
        extensions: Sequence[str] = FEATURE_EXTENSIONS,
    ) -> FeatureDataset:
        """Feature files (one ``(T, p)`` array per video), read lazily.

        Two layouts:

        - ``root/<class>/<video>.pt|.npy``: one sub-folder per class. The class order is read
          from ``root/classes.txt`` (one name per line) if present, else sorted folder names.
        - ``root/<video>.pt|.npy`` with ``labels_file``: lines ``<file name> <label>`` (space,
          tab or comma separated), ``label`` an int class index or a class name. Class names
          are sorted, unless ``root/classes.txt`` gives the order.
        """
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"FeatureDataset.from_dir: root {str(root)!r} is not a directory")
        exts = tuple(extensions)
        order_file = root / "classes.txt"
        given = [c for c in order_file.read_text().splitlines() if c.strip()] if order_file.is_file() else None
        if labels_file is None:
            folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not folders:
                raise ValueError(f"FeatureDataset.from_dir: {str(root)!r} has no class sub-folders; "
                                 "pass labels_file for a flat directory")
            classes = given if given is not None else folders
            unknown = set(folders) - set(classes)
            if unknown:
                raise ValueError(f"FeatureDataset.from_dir: folders {sorted(unknown)} are not in classes.txt")
            paths, labels = [], []
            for k, name in enumerate(classes):
                for p in sorted((root / name).glob("*")) if (root / name).is_dir() else []:
                    if p.suffix in exts:
                        paths.append(p)
                        labels.append(k)
            if not paths:
                raise ValueError(f"FeatureDataset.from_dir: no {'/'.join(exts)} files in the class folders of "
                                 f"{str(root)!r}")
            return cls(paths, torch.tensor(labels, dtype=torch.long), classes=classes)

        rows = []
        for n, line in enumerate(Path(labels_file).read_text().splitlines(), 1):
            parts = line.replace(",", " ").split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"FeatureDataset.from_dir: {labels_file}:{n}: expected '<file> <label>', got {line!r}")
            rows.append(parts)
        raw = [r[1] for r in rows]
        if all(s.lstrip("-").isdigit() for s in raw):
            labels = [int(s) for s in raw]
            classes = given
        else:
            classes = given if given is not None else sorted(set(raw))
            index = {c: k for k, c in enumerate(classes)}
            missing = sorted(set(raw) - set(index))
            if missing:
                raise ValueError(f"FeatureDataset.from_dir: labels {missing} are not in classes.txt")
            labels = [index[s] for s in raw]
        paths = []
        for name, _ in rows:
            p = root / name
            if not p.is_file():
                raise ValueError(f"FeatureDataset.from_dir: {labels_file} lists {name!r}, not found in {str(root)!r}")
            paths.append(p)
        return cls(paths, torch.tensor(labels, dtype=torch.long), classes=classes)

    def save(self, root: str | os.PathLike) -> None:
        """Write ``root/<class>/<index:06d>.pt`` and ``root/classes.txt``; :meth:`from_dir` reads it back
        with the same classes and labels (videos come back grouped by class)."""
        if self.multi_label:
            raise ValueError("FeatureDataset.save: multi-label data sets cannot use the class-folder layout")
        bad = [c for c in self.classes if not c or "/" in c or "\\" in c or c.startswith(".")]
        if bad:
            raise ValueError(f"FeatureDataset.save: class names {bad} cannot be folder names")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "classes.txt").write_text("".join(c + "\n" for c in self.classes))
        for c in self.classes:
            (root / c).mkdir(exist_ok=True)
        for i in range(len(self)):
            x, y = self[i]
            torch.save(x.contiguous().clone(), root / self.classes[y] / f"{i:06d}.pt")


@torch.no_grad()
def extract_features(
    backbone: Callable[[Tensor], Tensor],
    dataset: Dataset,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> FeatureDataset:
    """Run a frozen per-frame backbone over a video data set; return the features in memory.

    For each batch of ``batch_size`` videos, the valid frames are packed into one
    ``Tensor[N, C, H, W]`` (:func:`pack_padded`, no loop over frames) and mapped in one call to
    ``Tensor[N, p]``, then split back per video. An ``nn.Module`` backbone runs in eval mode (its
    mode is restored afterwards) under ``torch.no_grad``. Unreadable videos are left out (not
    replaced): the result's ``unreadable`` maps each one's file to the reason, and
    ``source_indices[j]`` is the index in ``dataset`` of feature item ``j``.

    Returns:
        ``FeatureDataset`` with items ``(Tensor[T_i, p], label_i)`` in the data set's order and its
        ``classes``.
    """
    _check_int("batch_size", batch_size, 1)
    module = backbone if isinstance(backbone, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    features: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        loader = make_loader(dataset, batch_size, shuffle=False, distributed=False, num_workers=num_workers)
        for frames, lengths, y in loader:
            x = pack_padded(frames, lengths)  # (N, C, H, W)
            if device is not None:
                x = x.to(device)
            z = backbone(x)
            if not isinstance(z, Tensor) or z.shape[0] != x.shape[0] or z.ndim < 2 or (
                z.ndim > 2 and math.prod(z.shape[2:]) != 1
            ):
                raise ValueError(
                    f"extract_features: backbone must map (N, C, H, W) to (N, p), got "
                    f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__} for N = {x.shape[0]}"
                )
            z = z.reshape(z.shape[0], -1).to("cpu", torch.float32)  # (N, p)
            features.extend(z.split(lengths.tolist()))
            labels.append(y)
    finally:
        if module is not None:
            module.train(was_training)
    if not features:
        raise ValueError("extract_features: dataset is empty" if not loader.skipped else
                         f"extract_features: none of the {len(loader.skipped)} videos is readable")
    base = getattr(dataset, "dataset", dataset)  # a Subset's underlying data set
    out = FeatureDataset(features, torch.cat(labels), classes=getattr(base, "classes", None))
    out.unreadable = {s.path: s.reason for s in loader.skipped}
    bad = {s.index for s in loader.skipped}
    out.source_indices = [i for i in range(len(dataset)) if i not in bad]
    return out

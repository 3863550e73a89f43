"""UCF101 and HMDB51: their split files, and torchvision's clip data sets.

The split-file helpers (:func:`ucf101_files`, :func:`hmdb51_files`) give the relative paths of
a split, to pass as ``VideoFolder(root, subset=...)``, which decodes whole videos with PyAV.
:func:`ucf101` / :func:`hmdb51` wrap ``torchvision.datasets.UCF101`` / ``HMDB51`` (fixed-length
clips), which need torchcodec and a system FFmpeg.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ._common import _check_int



def ucf101_files(annotation_path: str | os.PathLike, *, fold: int = 1, train: bool = True) -> list[str]:
    """Relative paths (``"Class/v_...avi"``) of a UCF101 split, read from ``trainlist0{fold}.txt``
    or ``testlist0{fold}.txt``. Pass them as ``VideoFolder(root, subset=...)``."""
    if fold not in (1, 2, 3):
        raise ValueError(f"ucf101_files: fold must be 1, 2 or 3, got {fold!r}")
    path = Path(annotation_path) / f"{'trainlist' if train else 'testlist'}{fold:02d}.txt"
    if not path.is_file():
        raise ValueError(f"ucf101_files: split file {str(path)!r} not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def hmdb51_files(annotation_path: str | os.PathLike, *, fold: int = 1, train: bool = True) -> list[str]:
    """Relative paths (``"class/file.avi"``) of an HMDB51 split, read from the
    ``<class>_test_split{fold}.txt`` files (tag 1 = train, 2 = test). For ``VideoFolder(subset=...)``."""
    if fold not in (1, 2, 3):
        raise ValueError(f"hmdb51_files: fold must be 1, 2 or 3, got {fold!r}")
    suffix = f"_test_split{fold}.txt"
    files = sorted(Path(annotation_path).glob(f"*{suffix}"))
    if not files:
        raise ValueError(f"hmdb51_files: no '*{suffix}' files in {str(annotation_path)!r}")
    tag = "1" if train else "2"
    out = []
    for f in files:
        cls = f.name[: -len(suffix)]
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] == tag:
                out.append(f"{cls}/{parts[0]}")
    return out


def _require_torchcodec(name: str) -> None:
    try:
        import torchcodec  # noqa: F401
    except Exception as e:  # ImportError, or OSError/RuntimeError when FFmpeg's libraries are missing
        raise RuntimeError(
            f"{name.lower()}() uses torchvision.datasets.{name}, which decodes video with torchcodec; "
            f"importing torchcodec failed ({type(e).__name__}: {e}). Install it with "
            "`pip install torchcodec` plus a system FFmpeg (e.g. `apt-get install ffmpeg` or "
            "`conda install ffmpeg`). Alternative without torchcodec: "
            f"VideoFolder(root, subset={name.lower()}_files(annotation_path, fold=..., train=...)) "
            "decodes the same videos with PyAV."
        ) from e


class ClipDataset(Dataset):
    """Adapts a torchvision video-clip data set (UCF101, HMDB51, Kinetics) to ``(frames, label)``.

    torchvision's item ``(video uint8 Tensor[T, C, H, W], audio, label)`` becomes
    ``(float32 Tensor[T, C, H, W] in [0, 1], label)``, resized to ``frame_size`` (bilinear,
    antialiased; ``None`` keeps the size). Items are fixed-length clips, not whole videos.
    """

    def __init__(self, clips: Dataset, *, frame_size: tuple[int, int] | None = (112, 112)) -> None:
        self.clips, self.frame_size = clips, frame_size
        self.classes: list[str] = list(clips.classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        video, _audio, label = self.clips[index]
        frames = video.to(torch.float32) / 255.0  # (T, C, H, W)
        if self.frame_size is not None and tuple(frames.shape[-2:]) != tuple(self.frame_size):
            frames = F.interpolate(frames, size=self.frame_size, mode="bilinear", antialias=True, align_corners=False)
        return frames, int(label)


def _torchvision_clips(name: str, root, annotation_path, frames_per_clip, step_between_clips, fold, train,
                       frame_size, num_workers, kwargs) -> ClipDataset:
    _check_int("frames_per_clip", frames_per_clip, 1)
    _require_torchcodec(name)
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    clips = cls(
        root,
        annotation_path,
        frames_per_clip,
        step_between_clips=frames_per_clip if step_between_clips is None else step_between_clips,
        fold=fold,
        train=train,
        num_workers=num_workers,
        output_format="TCHW",
        **kwargs,
    )
    return ClipDataset(clips, frame_size=frame_size)


def ucf101(
    root: str | os.PathLike,
    annotation_path: str | os.PathLike,
    *,
    frames_per_clip: int = 16,
    step_between_clips: int | None = None,
    fold: int = 1,
    train: bool = True,
    frame_size: tuple[int, int] | None = (112, 112),
    num_workers: int = 1,
    **kwargs: Any,
) -> ClipDataset:
    """UCF101 clips via ``torchvision.datasets.UCF101`` (needs torchcodec and a system FFmpeg).

    ``step_between_clips=None`` gives non-overlapping clips. Extra ``kwargs`` go to torchvision.
    For whole videos, or without torchcodec, use
    ``VideoFolder(root, subset=ucf101_files(annotation_path, fold=fold, train=train))``.

    Raises:
        RuntimeError: torchcodec cannot be imported; the message says what to install.
    """
    return _torchvision_clips("UCF101", root, annotation_path, frames_per_clip, step_between_clips, fold,
                              train, frame_size, num_workers, kwargs)


def hmdb51(
    root: str | os.PathLike,
    annotation_path: str | os.PathLike,
    *,
    frames_per_clip: int = 16,
    step_between_clips: int | None = None,
    fold: int = 1,
    train: bool = True,
    frame_size: tuple[int, int] | None = (112, 112),
    num_workers: int = 1,
    **kwargs: Any,
) -> ClipDataset:
    """HMDB51 clips via ``torchvision.datasets.HMDB51``; see :func:`ucf101`.
    Alternative: ``VideoFolder(root, subset=hmdb51_files(annotation_path, fold=fold, train=train))``."""
    return _torchvision_clips("HMDB51", root, annotation_path, frames_per_clip, step_between_clips, fold,
                              train, frame_size, num_workers, kwargs)

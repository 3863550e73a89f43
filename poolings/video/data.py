"""Video data sets: the embedded moving-digits set, video folders, feature files, UCF101/HMDB51.

Every video data set is a ``torch.utils.data.Dataset`` whose item is ``(frames, label)``:

- ``frames``: float32 ``Tensor[T, C, H, W]``; ``T`` varies from video to video;
- ``label``: ``int`` (single-label) or float32 ``Tensor[K]`` of 0/1 (multi-label).

Each data set has ``classes: list[str]`` and ``num_classes: int``. A feature data set has the same
item with ``frames`` replaced by ``features: Tensor[T, p]``. ``collate_videos`` batches either kind:

    frames  (B, Tmax, *frame_shape)   zero after each video's end
    lengths (B,)                      int64
    labels  (B,) int64  or  (B, K) float32

Heavy optional packages (PyAV, scikit-learn, torchvision's video data sets) are imported inside the
functions that need them.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from argminlayers import lengths_to_mask

__all__ = [
    "MOTIONS",
    "MovingDigits",
    "FrameDigits",
    "sample_motions",
    "render_moving_digits",
    "VideoFolder",
    "UnreadableVideoWarning",
    "VIDEO_EXTENSIONS",
    "decode_video",
    "sample_frame_indices",
    "ucf101_files",
    "hmdb51_files",
    "ucf101",
    "hmdb51",
    "ClipDataset",
    "FeatureDataset",
    "extract_features",
    "pack_padded",
    "pad_packed",
    "collate_videos",
    "make_loader",
]


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


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


def make_loader(
    dataset: Dataset,
    batch_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    distributed: bool = False,
    num_workers: int = 0,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` with :func:`collate_videos` and reproducible shuffling.

    With ``distributed=True``, or when ``torch.distributed`` is initialised, each process reads its
    own shard through a ``DistributedSampler(shuffle=shuffle, seed=seed)``; call
    ``loader.sampler.set_epoch(epoch)`` at the start of every epoch to reshuffle. Otherwise a
    ``torch.Generator`` seeded with ``seed`` drives the shuffle.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_loader: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"make_loader: num_workers must be an int >= 0, got {num_workers!r}")
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    common = dict(
        batch_size=batch_size,
        collate_fn=collate_videos,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    if distributed or initialised:
        if not initialised:
            raise RuntimeError(
                "make_loader: distributed=True needs torch.distributed.init_process_group() first"
            )
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(dataset, sampler=sampler, **common)
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, shuffle=shuffle, generator=generator, **common)


# --------------------------------------------------------------------------------------------
# The embedded data set: moving digits
# --------------------------------------------------------------------------------------------

#: Motion classes: name -> direction in state space (dx, dy, d log-scale, d angle).
#: Pairs (2j, 2j+1) are time-reversals of each other (opposite directions).
MOTIONS: dict[str, tuple[int, int, int, int]] = {
    "right": (1, 0, 0, 0),
    "left": (-1, 0, 0, 0),
    "down": (0, 1, 0, 0),
    "up": (0, -1, 0, 0),
    "grow": (0, 0, 1, 0),
    "shrink": (0, 0, -1, 0),
    "rotate_cw": (0, 0, 0, 1),
    "rotate_ccw": (0, 0, 0, -1),
    "down_right": (1, 1, 0, 0),
    "up_left": (-1, -1, 0, 0),
    "down_left": (-1, 1, 0, 0),
    "up_right": (1, -1, 0, 0),
}
_MOTION_NAMES = list(MOTIONS)
_MOTION_TABLE = np.array(list(MOTIONS.values()), dtype=np.float64)  # (12, 4)
assert np.array_equal(_MOTION_TABLE[0::2], -_MOTION_TABLE[1::2])

_SPLITS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_SPLIT_PERMUTATION_SEED = 2016  # fixes which digit images belong to which split


@functools.lru_cache(maxsize=None)
def _digit_pool(split: str) -> tuple[Tensor, Tensor]:
    """The split's digit images ``(M, 8, 8)`` in [0, 1] and their digits ``(M,)``; splits are disjoint."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a declared video dependency
        raise ImportError(
            "MovingDigits needs scikit-learn's bundled digits: pip install scikit-learn"
        ) from e
    digits = load_digits()
    n = len(digits.target)
    order = np.random.default_rng(_SPLIT_PERMUTATION_SEED).permutation(n)
    lo, hi = _SPLITS[split]
    keep = order[int(round(lo * n)) : int(round(hi * n))]
    images = torch.as_tensor(digits.images[keep] / 16.0, dtype=torch.float32)  # (M, 8, 8)
    return images, torch.as_tensor(digits.target[keep], dtype=torch.long)


def sample_motions(
    labels: np.ndarray,
    *,
    num_images: int,
    min_len: int,
    max_len: int,
    size: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Draw one trajectory per video for the motion classes ``labels``.

    A frame's state is ``s = (c_x, c_y, log scale, angle)``; video ``i`` has

        s_i(t) = mid_i + tau_t * delta_i,   tau_t = (2t - (T_i - 1)) / (2 (T_i - 1)) in [-1/2, 1/2]

    with ``delta_i = amplitude_i * MOTIONS[label_i]`` (elementwise). Every random draw (length,
    digit image, base scale, amplitudes, mid-point) uses only ``|MOTIONS[label]|``, which a class
    shares with its time-reversal; the reversal only negates ``delta``. So with the same ``rng``
    state, ``labels`` and ``labels ^ 1`` give identical draws with ``delta`` negated, and since
    ``tau_{T-1-t} = -tau_t`` exactly, the video of class ``k ^ 1`` is exactly the time-reversal of
    the video of class ``k``.

    The digit (8 x 8 image pixels, ``scale`` canvas pixels each) stays inside the
    ``size x size`` canvas for the whole video.

    Returns:
        ``image (N,)`` int64 index into the split's digit images, ``length (N,)`` int64,
        ``mid (N, 4)`` and ``delta (N, 4)`` float64.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    v = _MOTION_TABLE[labels]  # (N, 4)
    a = np.abs(v)
    length = rng.integers(min_len, max_len + 1, size=n)
    image = rng.integers(0, num_images, size=n)
    scale = size / 32.0 * rng.uniform(1.25, 1.75, size=n)  # canvas pixels per digit pixel
    zoom = rng.uniform(math.log(1.6), math.log(2.4), size=n)  # total log-scale change (grow/shrink)
    turn = rng.uniform(math.pi / 2, math.pi, size=n)  # total rotation (rotate_*)
    tilt = rng.uniform(-math.pi / 8, math.pi / 8, size=n)  # mid angle (rotate_* only)
    travel = rng.uniform(0.5, 0.9, size=n)  # path length as a fraction of the free room
    where = rng.uniform(0.0, 1.0, size=(n, 2))  # mid-point within its feasible interval

    # Largest half-extent of the digit over the video: 4 digit pixels at the largest scale,
    # times sqrt(2) if it rotates (the corners of the 8 x 8 square sweep a circle).
    half = 4.0 * scale * np.exp(zoom * a[:, 2] / 2) * np.where(a[:, 3] > 0, math.sqrt(2.0), 1.0)
    path = travel * (size - 2.0 * half)  # (N,) > 0
    lo = half[:, None] + path[:, None] * a[:, :2] / 2  # (N, 2) feasible mid-point interval
    centre = lo + where * (size - 2.0 * lo)
    mid = np.stack([centre[:, 0], centre[:, 1], np.log(scale), tilt * a[:, 3]], axis=1)
    delta = np.stack([path, path, zoom, turn], axis=1) * v
    return {"image": image.astype(np.int64), "length": length.astype(np.int64), "mid": mid, "delta": delta}


def render_moving_digits(
    images: Tensor,
    image: Tensor,
    length: Tensor,
    mid: Tensor,
    delta: Tensor,
    *,
    size: int,
    chunk: int = 4096,
) -> Tensor:
    """Render trajectories from :func:`sample_motions` as frames; one batched ``grid_sample``.

    Frame ``t`` of video ``i`` shows digit image ``images[image[i]]`` with centre ``(c_x, c_y)``,
    scale ``exp(log_scale)`` and angle ``a`` (positive = clockwise on screen) taken from
    ``mid[i] + tau_t * delta[i]``. A canvas point ``P`` (pixel units) samples the digit at

        Q = 4 + R(-a) (P - c) / scale   (digit pixel units, 8 x 8 image),

    bilinearly, with zeros outside the digit.

    Args:
        images: ``(M, 8, 8)`` digit images. image: ``(N,)`` indices into ``images``.
        length: ``(N,)`` frames per video (>= 2). mid, delta: ``(N, 4)``.
        size: canvas side. chunk: frames rendered per ``grid_sample`` call (bounds memory).

    Returns:
        ``Tensor[sum(length), 1, size, size]``, the videos' frames concatenated in order.
    """
    length = torch.as_tensor(length, dtype=torch.long)
    n = length.shape[0]
    video = torch.repeat_interleave(torch.arange(n), length)  # (F,) video of each frame
    start = torch.cumsum(length, 0) - length
    t = torch.arange(video.shape[0]) - start[video]  # (F,) frame index within its video
    # Exactly antisymmetric in time: tau(T-1-t) = -tau(t) in floating point.
    tau = (2 * t - (length[video] - 1)).double() / (2 * (length[video] - 1)).double()  # (F,)
    mid = torch.as_tensor(mid, dtype=torch.float64)
    delta = torch.as_tensor(delta, dtype=torch.float64)
    state = mid[video] + tau[:, None] * delta[video]  # (F, 4)
    cx, cy, log_scale, angle = state.unbind(-1)
    scale = log_scale.exp()
    cos, sin = angle.cos(), angle.sin()
    # affine_grid maps output coords y in [-1, 1] (P = (y + 1) size / 2) to input coords
    # x = (Q - 4) / 4, so x = R(-a) [size / (8 s)] y + R(-a) (size / 2 - c) / (4 s).
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (F, 2, 2)
    offset = torch.stack([size / 2 - cx, size / 2 - cy], -1)  # (F, 2)
    theta = torch.cat(
        [
            rot * (size / (8 * scale))[:, None, None],
            (rot @ offset[:, :, None]) / (4 * scale)[:, None, None],
        ],
        dim=2,
    ).to(torch.float32)  # (F, 2, 3)
    src = torch.as_tensor(images, dtype=torch.float32)[torch.as_tensor(image)[video]]  # (F, 8, 8)
    out = []
    for lo in range(0, video.shape[0], chunk):
        th = theta[lo : lo + chunk]
        grid = F.affine_grid(th, [th.shape[0], 1, size, size], align_corners=False)
        out.append(
            F.grid_sample(
                src[lo : lo + chunk, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    return torch.cat(out) if out else torch.zeros(0, 1, size, size)  # (F, 1, size, size)


class MovingDigits(Dataset):
    """Embedded video data set: a digit moves across a canvas; the class is the motion.

    Digit images come from scikit-learn's bundled ``load_digits`` (1797 images, 8 x 8); the
    ``"train"``, ``"val"`` and ``"test"`` splits use disjoint images (60 / 20 / 20 %) and
    different random streams. Nothing is downloaded. All videos are rendered once, at
    construction, and kept in memory (``num_videos * mean(T) * size**2 * 4`` bytes).

    Classes come in time-reversal pairs ``(2j, 2j+1)``: ``right/left``, ``down/up``,
    ``grow/shrink``, ``rotate_cw/rotate_ccw``, ``down_right/up_left``, ``down_left/up_right``
    (the first ``num_classes`` of :data:`MOTIONS`). Within a pair every random draw has the same
    distribution and only the direction of motion flips, so the reversed video of a class-``k``
    sample is a class-``reverse_class(k)`` sample (:func:`sample_motions`), and with i.i.d. frame
    noise the multiset of frames of a video has the same distribution for ``k`` and its
    reversal. Any order-blind pooling (average, max) therefore cannot beat chance within a pair.

    Item: ``(frames: Tensor[T, 1, size, size], label: int)``, ``min_len <= T <= max_len``.
    The digit (0-9) shown in video ``i`` is :meth:`digit_of`; :class:`FrameDigits` gives the frames
    with their digits for per-frame pretraining.

    Example:
        >>> train = MovingDigits("train", num_videos=64, num_classes=4, seed=0)
        >>> frames, label = train[0]              # (T, 1, 32, 32), int
        >>> train.classes[label], train.classes[train.reverse_class(label)]
    """

    def __init__(
        self,
        split: str = "train",
        *,
        num_videos: int = 512,
        num_classes: int = 6,
        min_len: int = 8,
        max_len: int = 16,
        size: int = 32,
        seed: int = 0,
        noise: float = 0.05,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"MovingDigits: split must be one of {list(_SPLITS)}, got {split!r}")
        _check_int("num_videos", num_videos, 1)
        _check_int("num_classes", num_classes, 2)
        if num_classes % 2 or num_classes > len(MOTIONS):
            raise ValueError(
                f"MovingDigits: num_classes must be even and at most {len(MOTIONS)} "
                f"(classes come in time-reversal pairs), got {num_classes}"
            )
        _check_int("min_len", min_len, 2)
        _check_int("max_len", max_len, min_len)
        _check_int("size", size, 8)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"MovingDigits: seed must be an int >= 0, got {seed!r}")
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
            raise ValueError(f"MovingDigits: noise must be a finite float >= 0, got {noise!r}")

        self.split, self.size, self.seed, self.noise = split, size, int(seed), float(noise)
        self.min_len, self.max_len = min_len, max_len
        self.classes: list[str] = _MOTION_NAMES[:num_classes]
        self.num_classes = num_classes
        self.reversal_pairs: list[tuple[int, int]] = [(k, k + 1) for k in range(0, num_classes, 2)]

        images, image_digits = _digit_pool(split)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SPLIT_CODE[split]]))
        labels = rng.permutation(np.arange(num_videos) % num_classes)  # balanced classes
        params = sample_motions(
            labels, num_images=images.shape[0], min_len=min_len, max_len=max_len, size=size, rng=rng
        )
        frames = render_moving_digits(images, **_as_tensors(params), size=size)  # (F, 1, S, S)
        if self.noise > 0:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            frames += self.noise * torch.randn(frames.shape, generator=gen)

        self.params: dict[str, Tensor] = _as_tensors(params)  # trajectories, for inspection
        self.frames = frames  # (F, 1, S, S) all videos' frames, concatenated
        self.lengths = self.params["length"]  # (N,)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(self.lengths, 0)])
        self.labels = torch.as_tensor(labels, dtype=torch.long)  # (N,)
        self.digits = image_digits[self.params["image"]]  # (N,) digit shown in each video

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = _check_index(index, len(self))
        return self.frames[self.offsets[i] : self.offsets[i + 1]], int(self.labels[i])

    def reverse_class(self, k: int) -> int:
        """The class whose videos are the time-reversals of class ``k``'s (``k ^ 1``)."""
        if not isinstance(k, (int, np.integer)) or not 0 <= k < self.num_classes:
            raise ValueError(f"reverse_class: k must be an int in [0, {self.num_classes}), got {k!r}")
        return int(k) ^ 1

    def digit_of(self, index: int) -> int:
        """The digit (0-9) shown in video ``index``."""
        return int(self.digits[_check_index(index, len(self))])

    def __repr__(self) -> str:
        return (
            f"MovingDigits(split={self.split!r}, num_videos={len(self)}, num_classes={self.num_classes}, "
            f"min_len={self.min_len}, max_len={self.max_len}, size={self.size}, seed={self.seed}, "
            f"noise={self.noise})"
        )


class FrameDigits(Dataset):
    """Frames of a :class:`MovingDigits` split, each labelled with its digit: ``(Tensor[1, S, S], int)``.

    For per-frame pretraining of a CNN on digit identity (0-9). ``frames_per_video`` keeps that
    many evenly spaced frames of each video (``floor((j + 1/2) T / m)``, ``m = min(k, T)``);
    ``None`` keeps all of them.
    """

    def __init__(self, videos: MovingDigits, *, frames_per_video: int | None = None) -> None:
        if not isinstance(videos, MovingDigits):
            raise TypeError(f"FrameDigits: videos must be a MovingDigits, got {type(videos).__name__}")
        lengths = videos.lengths  # (N,)
        if frames_per_video is None:
            index = torch.arange(videos.frames.shape[0])
            digits = torch.repeat_interleave(videos.digits, lengths)
        else:
            _check_int("frames_per_video", frames_per_video, 1)
            m = lengths.clamp(max=frames_per_video)  # (N,)
            j = torch.arange(frames_per_video)[None, :]  # (1, k)
            keep = j < m[:, None]  # (N, k)
            t = ((2 * j + 1) * lengths[:, None]) // (2 * m[:, None])  # (N, k)
            index = (videos.offsets[:-1, None] + t)[keep]
            digits = videos.digits[:, None].expand_as(keep)[keep]
        self.videos = videos
        self.index = index  # (M,) rows of videos.frames
        self.digits = digits  # (M,)
        self.classes: list[str] = [str(d) for d in range(10)]
        self.num_classes = 10

    def __len__(self) -> int:
        return self.index.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = _check_index(index, len(self))
        return self.videos.frames[self.index[i]], int(self.digits[i])


# --------------------------------------------------------------------------------------------
# Video folders (PyAV)
# --------------------------------------------------------------------------------------------

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv", ".3gp")


class UnreadableVideoWarning(UserWarning):
    """A video file could not be opened or decoded and was skipped."""


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding video files needs PyAV (it bundles FFmpeg): pip install av") from e
    return av


def sample_frame_indices(
    num_available: int, num_frames: int | None, sample: str = "uniform", generator: torch.Generator | None = None
) -> Tensor:
    """Which of ``num_available`` frames to keep, in temporal order.

    ``num_frames=None`` keeps all. Otherwise ``m = min(num_frames, num_available)`` frames (a video
    is never padded with repeated frames): ``"uniform"`` takes the centres of ``m`` equal
    segments, ``floor((j + 1/2) n / m)``; ``"random"`` takes a sorted random subset.
    """
    if sample not in ("uniform", "random"):
        raise ValueError(f"sample must be 'uniform' or 'random', got {sample!r}")
    if num_frames is None or num_frames >= num_available:
        return torch.arange(num_available)
    if sample == "uniform":
        return (2 * torch.arange(num_frames) + 1) * num_available // (2 * num_frames)
    return torch.randperm(num_available, generator=generator)[:num_frames].sort().values


def decode_video(
    path: str | os.PathLike,
    *,
    num_frames: int | None = None,
    frame_size: int | tuple[int, int] | None = (112, 112),
    sample: str = "uniform",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Decode a video file with PyAV into RGB frames ``Tensor[T, 3, H, W]`` in [0, 1].

    The first video stream is decoded in full (inter-coded streams need every frame); only the
    frames chosen by :func:`sample_frame_indices` are converted, resized by FFmpeg's scaler to
    ``frame_size = (H, W)`` or ``(S, S)`` for an int ``S`` (aspect ratio not kept; ``None`` keeps
    the native size).

    Raises:
        ValueError: no video stream or no decodable frame. Errors of PyAV/FFmpeg pass through.
    """
    frame_size = _frame_size(frame_size, "decode_video")
    av = _import_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = list(container.decode(stream))
    if not decoded:
        raise ValueError(f"{path}: no decodable video frame")
    keep = sample_frame_indices(len(decoded), num_frames, sample, generator)
    size = {} if frame_size is None else {"height": frame_size[0], "width": frame_size[1]}
    rgb = np.stack([decoded[i].to_ndarray(format="rgb24", **size) for i in keep.tolist()])  # (T, H, W, 3)
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # (T, 3, H, W)


class VideoFolder(Dataset):
    """Videos in ``root/<class>/**/<file>``, one sub-folder per class, decoded with PyAV.

    Classes are the sub-folder names, sorted. Files are matched by extension (case-insensitive)
    anywhere below the class folder. ``subset`` keeps only the listed paths relative to ``root``
    (``"Class/file.avi"``, as :func:`ucf101_files` / :func:`hmdb51_files` return them).

    Item: ``(frames: Tensor[T, 3, H, W] in [0, 1], label: int)``, ``(H, W) = frame_size`` (an int
    ``S`` means ``(S, S)``; ``None`` keeps each file's size). ``num_frames=None`` keeps every
    frame; an int keeps ``min(num_frames, T)`` frames chosen by ``sample`` (``"uniform"``:
    centres of equal segments; ``"random"``: a sorted random subset, new at each access, from
    torch's global generator). ``transform`` is applied to the frames last.

    Unreadable files never stop training:

    - ``probe="header"`` (default) opens every file at construction and requires a video stream
      (cheap: the container header only); ``"decode"`` also decodes the first frame;
      ``"none"`` skips probing.
    - A file that fails the probe is dropped from the data set with an
      :class:`UnreadableVideoWarning`.
    - A file that fails later, in ``__getitem__``, is warned about and the next readable
      item is returned instead.

    Either way ``skipped`` counts the bad files and ``bad_paths`` lists them (in a
    ``DataLoader`` worker process, failures found there are counted in that process only).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        num_frames: int | None = None,
        frame_size: int | tuple[int, int] | None = (112, 112),
        sample: str = "uniform",
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        probe: str = "header",
        subset: Collection[str] | None = None,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"VideoFolder: root {str(root)!r} is not a directory")
        if num_frames is not None:
            _check_int("num_frames", num_frames, 1)
        frame_size = _frame_size(frame_size, "VideoFolder")
        if sample not in ("uniform", "random"):
            raise ValueError(f"VideoFolder: sample must be 'uniform' or 'random', got {sample!r}")
        if probe not in ("header", "decode", "none"):
            raise ValueError(f"VideoFolder: probe must be 'header', 'decode' or 'none', got {probe!r}")
        if isinstance(extensions, str):
            raise TypeError("VideoFolder: extensions must be a sequence of suffixes, not a single string")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)

        self.root, self.num_frames, self.frame_size = root, num_frames, frame_size
        self.sample, self.transform = sample, transform
        self.classes: list[str] = sorted(
            d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not self.classes:
            raise ValueError(f"VideoFolder: root {str(root)!r} has no class sub-folders")
        self.num_classes = len(self.classes)

        wanted = None if subset is None else {Path(s).as_posix() for s in subset}
        samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for path in sorted((root / name).rglob("*")):
                rel = path.relative_to(root).as_posix()
                if path.is_file() and path.suffix.lower() in exts and (wanted is None or rel in wanted):
                    samples.append((str(path), label))
        if wanted is not None and len(samples) < len(wanted):
            warnings.warn(
                f"VideoFolder: {len(wanted) - len(samples)} of {len(wanted)} subset files were not found "
                f"under {str(root)!r}",
                stacklevel=2,
            )

        self.bad_paths: list[str] = []
        if probe != "none":
            samples = [(p, y) for p, y in samples if self._probe_ok(p, probe)]
        if not samples:
            raise ValueError(f"VideoFolder: no readable video files under {str(root)!r} (extensions {exts})")
        self.samples = samples

    @property
    def skipped(self) -> int:
        """Number of unreadable files found so far."""
        return len(self.bad_paths)

    def _mark_bad(self, path: str, err: BaseException) -> None:
        if path not in self.bad_paths:
            self.bad_paths.append(path)
        warnings.warn(
            f"VideoFolder: skipping unreadable video {path} ({type(err).__name__}: {err})",
            UnreadableVideoWarning,
            stacklevel=3,
        )

    def _probe_ok(self, path: str, level: str) -> bool:
        av = _import_av()
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
                if level == "decode" and next(container.decode(video=0), None) is None:
                    raise ValueError("no decodable video frame")
        except Exception as err:  # any failure marks the file bad; it must not stop training
            self._mark_bad(path, err)
            return False
        return True

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = _check_index(index, len(self))
        for k in range(len(self)):
            path, label = self.samples[(i + k) % len(self)]
            if path in self.bad_paths:
                continue
            try:
                frames = decode_video(
                    path, num_frames=self.num_frames, frame_size=self.frame_size, sample=self.sample
                )
            except Exception as err:  # a bad file is skipped, never fatal
                self._mark_bad(path, err)
                continue
            return (self.transform(frames) if self.transform else frames), label
        raise RuntimeError(f"VideoFolder: none of the {len(self)} files under {str(self.root)!r} is readable")


# --------------------------------------------------------------------------------------------
# UCF101 / HMDB51
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Pre-extracted features
# --------------------------------------------------------------------------------------------

FEATURE_EXTENSIONS = (".pt", ".npy")


def _load_feature_file(path: str | os.PathLike) -> Tensor:
    path = Path(path)
    if path.suffix == ".npy":
        x = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".pt":
        x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, Tensor):
            raise ValueError(f"feature file {str(path)!r} holds a {type(x).__name__}, expected a Tensor[T, p]")
    else:
        raise ValueError(f"feature file {str(path)!r}: suffix must be one of {FEATURE_EXTENSIONS}")
    return x


class FeatureDataset(Dataset):
    """Pre-extracted per-frame features: item ``(features: float32 Tensor[T, p], label)``.

    Args:
        features: one entry per video, each a ``Tensor[T, p]`` / ndarray (kept in memory) or a
            path to a ``.pt`` / ``.npy`` file holding one (loaded at each access). A single
            directory path instead reads that directory: ``FeatureDataset(root, labels_file)``
            is ``FeatureDataset.from_dir(root, labels_file=labels_file)``.
        labels: ``N`` class indices, or a ``(N, K)`` array of 0/1 for multi-label data.
        classes: class names; default ``["0", ..., "K-1"]``.

    In-memory features are checked at construction (2-D, ``T >= 1``, the same ``p``); files are
    checked when loaded. ``feature_dim`` is ``p``.
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
        self.items, self.labels = items, y
        self.classes, self.num_classes = classes, len(classes)
        self.multi_label = y.ndim == 2

    @staticmethod
    def _check_item(x: Tensor, what: str) -> Tensor:
        if x.ndim != 2 or x.shape[0] == 0 or not x.is_floating_point():
            raise ValueError(f"FeatureDataset: {what} must be a float Tensor[T, p] with T >= 1, got "
                             f"{x.dtype} {tuple(x.shape)}")
        return x.to(torch.float32)

    @property
    def feature_dim(self) -> int:
        """Feature dimension ``p`` (loads the first file if the features are on disk)."""
        return self[0][0].shape[1]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor]:
        i = _check_index(index, len(self))
        x = self.items[i]
        if not isinstance(x, Tensor):
            x = self._check_item(_load_feature_file(x), f"file {x!r}")
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
        """Feature files (one ``(T, p)`` array per video), loaded lazily.

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
    mode is restored afterwards) under ``torch.no_grad``.

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
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_videos,
                            num_workers=num_workers)
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
        raise ValueError("extract_features: dataset is empty")
    base = getattr(dataset, "dataset", dataset)  # a Subset's underlying data set
    return FeatureDataset(features, torch.cat(labels), classes=getattr(base, "classes", None))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


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


def _as_tensors(params: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {k: torch.as_tensor(v) for k, v in params.items()}

"""The embedded data set: a digit moves across a canvas, and the class is the motion.

Nothing is downloaded: the digit images are scikit-learn's bundled ``load_digits``. Classes come
in time-reversal pairs, so average and max pooling cannot beat chance within a pair (see
:class:`MovingDigits`). :func:`sample_motions` and :func:`render_moving_digits` are the
functional core; :class:`FrameDigits` gives single frames with their digit for pretraining.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ._common import _check_index, _check_int


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
            "MovingDigits needs scikit-learn's bundled digits: pip install scikit-learn", name="sklearn"
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
        if isinstance(min_len, (int, np.integer)) and not isinstance(min_len, bool) and min_len < 2:
            raise ValueError(f"min_len must be an int >= 2 (a moving digit needs two frames to move), got {min_len!r}")
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

    @property
    def targets(self) -> list[int]:
        """Each video's label."""
        return self.labels.tolist()

    @property
    def frame_counts(self) -> list[int]:
        """Each video's number of frames."""
        return self.lengths.tolist()

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




def _as_tensors(params: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {k: torch.as_tensor(v) for k, v in params.items()}

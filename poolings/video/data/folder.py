"""Folders of video files, one sub-folder per class, decoded with PyAV (which bundles FFmpeg).

Unreadable files are left out, never replaced by another video:

- at construction, a cheap probe (``probe="header"``: the container header must open and hold a
  video stream) drops what it can see is bad: non-video bytes, empty files, audio-only files,
  MP4s cut before their index;
- a file that passes the probe but fails to decode (no frame, corrupt data) raises
  :class:`~._common.UnreadableItemError` from ``__getitem__``; the loaders of :mod:`.batching`
  drop it from its batch and the training loop excludes it from every later epoch.

With ``cache=DIR`` the decoded frames (uint8, at the chosen frame size, every frame) are kept in
``DIR``, so that only the first read of a video decodes it. A folder that cannot be written is
refused at construction; a write that fails later (a full disk) is not a fault of the video: it
warns once per process and cache folder (:class:`CacheWriteWarning`; a failure in a ``DataLoader``
worker travels back with its batch and is reported by the main process) and the item is read on
without its cache entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ._common import UnreadableFileWarning, UnreadableItemError, _check_index, _check_int, _frame_size, error_text

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv", ".3gp")


class UnreadableVideoWarning(UnreadableFileWarning):
    """Video files could not be opened or decoded and were left out."""


class CacheWriteWarning(UserWarning):
    """Decoded frames could not be written to the frame cache; the videos are read on without it."""


_CACHE_WARNED: set[str] = set()   # cache folders warned about in this process


def warn_cache_write(root: str, path: str, reason: str, stacklevel: int = 2) -> None:
    """Warn once per process and cache folder that decoded frames could not be written there."""
    if root in _CACHE_WARNED:
        return
    _CACHE_WARNED.add(root)
    warnings.warn(
        f"cache: could not write the decoded frames of {path} to {root} ({reason}); reading on without caching "
        "the items whose entries cannot be written (they are decoded at every read): free space in --cache, "
        "or leave --cache out",
        CacheWriteWarning,
        stacklevel=stacklevel + 1,
    )


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding video files needs PyAV (it bundles FFmpeg): pip install av", name="av") from e
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


def _decoded_frames(path: str | os.PathLike) -> list:
    """Every frame of the first video stream, decoded (inter-coded streams need them all)."""
    av = _import_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = list(container.decode(stream))
    if not decoded:
        raise ValueError("no decodable video frame")
    return decoded


def _rgb(decoded: list, keep: Sequence[int], frame_size: tuple[int, int] | None) -> np.ndarray:
    """uint8 ``(T, H, W, 3)``: frames ``keep`` converted to RGB and resized by FFmpeg's scaler.

    The scaler runs on one thread: its own slice threads (``threads=0``, FFmpeg's default) once
    left a ``DataLoader`` worker waiting for ever in ``avpriv_slicethread_free``, and the workers
    are the parallelism here anyway.
    """
    size = {} if frame_size is None else {"height": frame_size[0], "width": frame_size[1]}
    return np.stack([decoded[i].to_ndarray(format="rgb24", threads=1, **size) for i in keep])


def _as_float(rgb: np.ndarray) -> Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``Tensor[T, 3, H, W]`` in [0, 1]."""
    rgb = np.ascontiguousarray(rgb) if rgb.flags.writeable else np.array(rgb)  # a cache entry is read-only
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


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
    try:
        decoded = _decoded_frames(path)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    keep = sample_frame_indices(len(decoded), num_frames, sample, generator)
    return _as_float(_rgb(decoded, keep.tolist(), frame_size))


def probe_video(path: str | os.PathLike, level: str = "header") -> int | None:
    """Check that ``path`` is a video; return its frame count from the header (``None`` if unknown).

    ``"header"`` opens the container and requires a video stream (reads the header only);
    ``"decode"`` also decodes the first frame. Raises on a bad file.
    """
    av = _import_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        if level == "decode" and next(container.decode(stream), None) is None:
            raise ValueError("no decodable video frame")
        return int(stream.frames) or None


class FrameCache:
    """Decoded frames of video files, uint8 ``(T, H, W, 3)`` at one frame size, one ``.npy`` each.

    An entry is keyed by the file's absolute path, size, modification time, the frame size and
    which frames it keeps (every frame, for random sampling; the uniform sample's, which is the
    same at every read), so an edited video is decoded again. Entries are written to a temporary file and renamed,
    so concurrent ``DataLoader`` workers never read half an entry. Cost: ``T·H·W·3`` bytes per
    video on disk (48 kB for 16 frames of 32×32).

    The folder is created if needed and must be writable: otherwise the constructor raises
    (``NotADirectoryError`` for a file, ``ValueError`` naming the folder and why), before
    anything is decoded.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"cache: {self.root} is a file, not a folder; give --cache a folder path")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-check-", suffix=".tmp"):
                pass
        except OSError as err:
            raise ValueError(f"cache: cannot write to {self.root} ({error_text(err)}); give --cache a writable "
                             "folder, or leave --cache out") from err

    def entry(self, path: str, frame_size: tuple[int, int] | None, frames: str = "all") -> Path:
        """The file of ``path`` at ``frame_size``; ``frames`` names the frames kept (``"all"``, ``"uniform16"``)."""
        st = os.stat(path)
        size = "native" if frame_size is None else f"{frame_size[0]}x{frame_size[1]}"
        key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{size}|{frames}"
        return self.root / f"{hashlib.sha1(key.encode()).hexdigest()}_{size}_{frames}.npy"

    def load(self, path: str, frame_size: tuple[int, int] | None, frames: str = "all") -> np.ndarray | None:
        entry = self.entry(path, frame_size, frames)
        if not entry.is_file():
            return None
        try:
            return np.load(entry, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):  # a damaged entry: decode again
            return None

    def store(self, path: str, frame_size: tuple[int, int] | None, rgb: np.ndarray, frames: str = "all") -> None:
        entry = self.entry(path, frame_size, frames)
        tmp = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp.npy")
        try:
            np.save(tmp, np.ascontiguousarray(rgb, dtype=np.uint8), allow_pickle=False)
            os.replace(tmp, entry)
        except BaseException:
            tmp.unlink(missing_ok=True)   # no half-written entry left behind (a full disk)
            raise


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

    Unreadable files are left out, never replaced (see the module docstring):

    - ``probe="header"`` (default) opens every file at construction and requires a video stream
      (cheap: the container header only); ``"decode"`` also decodes the first frame;
      ``"none"`` skips probing. Files that fail are not numbered at all; one
      :class:`UnreadableVideoWarning` lists them.
    - A file that fails later raises :class:`~._common.UnreadableItemError` (naming the file)
      from ``__getitem__``, at every access. The numbering never changes, so a split made from
      this data set stays the same.

    ``unreadable`` maps each bad path found in this process to the reason; ``skipped`` counts
    them; ``left_out`` holds those the probe found at construction (files that are not items).
    ``frame_counts[i]`` is item ``i``'s frame count from its header (``None`` if the container
    does not say); ``item_lengths[i]`` the number of frames the item gives (``min(num_frames,
    frame_counts[i])``). ``cache``: a folder for :class:`FrameCache` (it must be writable; a
    write that fails later warns once with :class:`CacheWriteWarning` and the item is returned
    uncached, never reported unreadable).
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
        cache: str | os.PathLike | None = None,
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
        self.cache = None if cache is None else FrameCache(cache)
        self._cache_failures: list[tuple[str, str, str]] = []
        self.classes: list[str] = sorted(
            d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not self.classes:
            raise ValueError(f"VideoFolder: root {str(root)!r} has no class sub-folders")
        self.num_classes = len(self.classes)

        wanted = None if subset is None else {Path(s).as_posix() for s in subset}
        found: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for path in sorted((root / name).rglob("*")):
                rel = path.relative_to(root).as_posix()
                if path.is_file() and path.suffix.lower() in exts and (wanted is None or rel in wanted):
                    found.append((str(path), label))
        if wanted is not None and len(found) < len(wanted):
            warnings.warn(
                f"VideoFolder: {len(wanted) - len(found)} of {len(wanted)} subset files were not found "
                f"under {str(root)!r}",
                stacklevel=2,
            )

        if probe != "none":
            _import_av()  # a missing PyAV is an installation problem, not a folder of bad files
        self.unreadable: dict[str, str] = {}
        self.samples: list[tuple[str, int]] = []
        self.frame_counts: list[int | None] = []
        for path, label in found:
            count = None
            if probe != "none":
                try:
                    count = probe_video(path, probe)
                except Exception as err:  # any failure leaves the file out; it must not stop training
                    self.unreadable[path] = error_text(err)
                    continue
            self.samples.append((path, label))
            self.frame_counts.append(count)
        self.left_out: dict[str, str] = dict(self.unreadable)   # found by the probe; never numbered
        listed = "; ".join(f"{p} ({r})" for p, r in list(self.unreadable.items())[:5])
        more = f"; and {len(self.unreadable) - 5} more" if len(self.unreadable) > 5 else ""
        if self.unreadable:
            warnings.warn(
                f"VideoFolder: {len(self.unreadable)} of {len(found)} files under {str(root)!r} are unreadable "
                f"and left out: {listed}{more}",
                UnreadableVideoWarning,
                stacklevel=2,
            )
        if not self.samples:
            raise ValueError(
                f"VideoFolder: no readable video files under {str(root)!r} (extensions {', '.join(exts)}"
                + (f"; {len(self.unreadable)} unreadable: {listed}{more}" if self.unreadable else "") + ")"
            )

    @property
    def skipped(self) -> int:
        """Number of unreadable files found so far in this process."""
        return len(self.unreadable)

    @property
    def bad_paths(self) -> list[str]:
        """The unreadable files found so far in this process."""
        return list(self.unreadable)

    @property
    def targets(self) -> list[int]:
        """Each item's label, without decoding."""
        return [y for _, y in self.samples]

    @property
    def item_lengths(self) -> list[int | None]:
        """Frames each item gives (what a model sees): ``min(num_frames, frame_counts[i])``; ``None`` if unknown."""
        if self.num_frames is None:
            return list(self.frame_counts)
        return [None if c is None else min(c, self.num_frames) for c in self.frame_counts]

    def __len__(self) -> int:
        return len(self.samples)

    def _frames(self, path: str) -> Tensor:
        fixed = self.sample == "uniform" or self.num_frames is None  # the same frames at every read
        kept = "all" if self.num_frames is None or not fixed else f"uniform{self.num_frames}"
        if self.cache is not None:
            rgb = self.cache.load(path, self.frame_size, kept)
            if rgb is not None:
                return _as_float(rgb if fixed else rgb[self._sample(rgb.shape[0]).numpy()])
        decoded = _decoded_frames(path)
        if self.cache is None or fixed:  # convert only the frames kept
            rgb = _rgb(decoded, self._sample(len(decoded)).tolist(), self.frame_size)
            if self.cache is not None:
                self._store(path, rgb, kept)
            return _as_float(rgb)
        rgb = _rgb(decoded, range(len(decoded)), self.frame_size)  # random samples: cache every frame
        self._store(path, rgb, kept)
        return _as_float(rgb[self._sample(rgb.shape[0]).numpy()])

    def _store(self, path: str, rgb: np.ndarray, kept: str) -> None:
        """Write a cache entry; a failed write (a full disk) is the cache's problem, not the video's.

        In the main process it warns (once per cache folder). In a ``DataLoader`` worker the failure
        is kept for :meth:`take_cache_failures`, so that the loader warns once in the main process
        rather than every worker of every epoch.
        """
        try:
            self.cache.store(path, self.frame_size, rgb, kept)
        except OSError as err:
            failure = (str(self.cache.root), path, error_text(err))
            if torch.utils.data.get_worker_info() is None:
                warn_cache_write(*failure, stacklevel=4)
            elif not self._cache_failures:
                self._cache_failures.append(failure)

    def take_cache_failures(self) -> list[tuple[str, str, str]]:
        """The failed cache writes ``(cache folder, video, reason)`` kept in this worker since the last call."""
        failures, self._cache_failures = self._cache_failures, []
        return failures

    def _sample(self, n: int) -> Tensor:
        return sample_frame_indices(n, self.num_frames, self.sample)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        i = _check_index(index, len(self))
        path, label = self.samples[i]
        if path in self.unreadable:
            raise UnreadableItemError(path, self.unreadable[path])
        try:
            frames = self._frames(path)
        except ImportError:
            raise
        except Exception as err:  # any decoding failure makes the file unreadable; it never stops training
            self.unreadable[path] = error_text(err)
            raise UnreadableItemError(path, self.unreadable[path]) from err
        return (self.transform(frames) if self.transform else frames), label

"""Video data sets: the embedded moving-digits set, video folders, feature files, UCF101/HMDB51.

Every video data set is a ``torch.utils.data.Dataset`` whose item is ``(frames, label)``:

- ``frames``: float32 ``Tensor[T, C, H, W]``; ``T`` varies from video to video;
- ``label``: ``int`` (single-label) or float32 ``Tensor[K]`` of 0/1 (multi-label).

Each data set has ``classes: list[str]`` and ``num_classes: int``. A feature data set has the same
item with ``frames`` replaced by ``features: Tensor[T, p]``. ``collate_videos`` batches either kind.

One module per data source:

============================  ==============================================================
``batching``                  ``collate_videos``, ``pack_padded``/``pad_packed``, ``make_loader``
``moving_digits``             ``MovingDigits``, ``FrameDigits`` (embedded, generated)
``folder``                    ``VideoFolder``, ``decode_video``, ``FrameCache`` (PyAV)
``ucf_hmdb``                  UCF101/HMDB51 split files and torchvision's clip data sets
``features``                  ``FeatureDataset``, ``extract_features``
``summary``                   the start-of-run data summary
============================  ==============================================================

A bad file is left out, never replaced by another item (``_common``): dropped at construction
where a cheap probe sees it, otherwise reported by ``__getitem__`` as an ``UnreadableItemError``
that the loaders turn into a ``Skipped`` record. Heavy optional packages (PyAV, scikit-learn,
torchvision's video data sets) are imported inside the functions that need them.
"""

from ._common import Skipped, UnreadableFileWarning, UnreadableItemError
from .batching import VideoLoader, collate_videos, make_loader, pack_padded, pad_packed, read_items
from .features import FEATURE_EXTENSIONS, FeatureDataset, extract_features, probe_feature_file
from .folder import (
    VIDEO_EXTENSIONS,
    CacheWriteWarning,
    FrameCache,
    UnreadableVideoWarning,
    VideoFolder,
    decode_video,
    probe_video,
    sample_frame_indices,
)
from .moving_digits import MOTIONS, FrameDigits, MovingDigits, render_moving_digits, sample_motions
from .summary import describe, format_summary
from .ucf_hmdb import ClipDataset, hmdb51, hmdb51_files, ucf101, ucf101_files

__all__ = [
    "MOTIONS",
    "MovingDigits",
    "FrameDigits",
    "sample_motions",
    "render_moving_digits",
    "VideoFolder",
    "FrameCache",
    "CacheWriteWarning",
    "UnreadableVideoWarning",
    "UnreadableFileWarning",
    "UnreadableItemError",
    "Skipped",
    "VIDEO_EXTENSIONS",
    "decode_video",
    "probe_video",
    "sample_frame_indices",
    "ucf101_files",
    "hmdb51_files",
    "ucf101",
    "hmdb51",
    "ClipDataset",
    "FEATURE_EXTENSIONS",
    "FeatureDataset",
    "probe_feature_file",
    "extract_features",
    "pack_padded",
    "pad_packed",
    "collate_videos",
    "make_loader",
    "read_items",
    "VideoLoader",
    "describe",
    "format_summary",
]

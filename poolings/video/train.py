"""End-to-end training of a :class:`~poolings.video.models.VideoClassifier`.

``train(TrainConfig(...))`` runs the paper's recipe by default: SGD with momentum 0.9, weight
decay 5e-4, and a learning rate decayed exponentially (log-linearly) from ``lr`` = 0.01 at the
first epoch to ``lr_final`` = 1e-4 at the last::

    lr_e = lr * (lr_final / lr) ** (e / (epochs - 1)),   e = 0 .. epochs - 1

Losses: ``"ce"`` (cross-entropy, reported with accuracy) and the one-vs-rest hinge losses
``"hinge"`` / ``"sqhinge"`` on ±1 targets (reported with mean average precision), which also
take multi-label targets ``(B, K)``::

    hinge:   mean_b sum_k max(0, 1 - y_bk s_bk)        sqhinge: the same, squared

Every epoch writes into the run folder ``out``: ``checkpoint.pt`` (model, optimiser, scheduler,
RNG states, epoch, history, unreadable items; written to a temporary file then ``os.replace``-d),
``best.pt`` (the model of the epoch with the best test metric so far), ``metrics.json``,
``log.csv`` (one row per epoch), ``curves.png`` and, when the ``tensorboard`` package is
installed, TensorBoard event files in ``tensorboard/``. A folder that already holds a run is
refused unless ``resume`` (continue it) or ``overwrite`` (replace it) is set. ``resume=True``
continues from the checkpoint; the data order depends only on ``(seed, epoch)``, so an
interrupted and resumed run ends with the same parameters as an uninterrupted one. Resuming
with a larger ``epochs`` extends a run: the learning rate keeps the schedule the run started
with and stays at ``lr_final`` after its last epoch.

Unreadable videos (or feature files) are left out, never replaced: those a probe finds when the
data set is built are listed in the start-of-run summary; one found at its first read is dropped
from its batch, reported once, and excluded from every later epoch (also when found in a
``DataLoader`` worker, and by every process under DDP). ``metrics.json`` lists them all, each
once. A training or test split with no readable item stops the run before the first epoch, naming
the files; a test split that turns unreadable later stops every process after the epoch's
checkpoint is saved, and ``resume`` evaluates that epoch first (the files are read again, not
excluded). ``overwrite`` clears the earlier run only once the data and the model are checked.

Solver non-convergence of the pooling (``argminlayers.ConvergenceWarning``) is collected per
epoch, not printed per batch: the epoch's line says how many samples did not converge and the
worst gradient norm, with the tolerance the pooling uses (``tol`` sets it).

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), training runs data-parallel:
one process group (gloo on CPU, nccl on CUDA), ``DistributedDataParallel``, a
``DistributedSampler``; only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from argminlayers import ConvergenceWarning
from poolings.runtime import load_checkpoint, prepare_run_folder, resolve_device, set_threads

from .models import POOLINGS, VideoClassifier, build_backbone, build_pooling

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "NothingToEvaluate",
    "RUN_OUTPUTS",
    "train",
    "evaluate",
    "predict",
    "build_datasets",
    "build_model",
    "video_loss",
    "mean_average_precision",
    "check_finite",
    "epoch_seed",
    "eval_loader",
    "resolve_device",
    "plot_history",
    "LOSSES",
]

LOSSES = ("ce", "hinge", "sqhinge")
DATASETS = ("moving-digits", "folder", "features")


def _h(text: str, **kw) -> Any:
    """A dataclass field default with a help text (used by the command line)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Everything one training run needs; every field is also a ``train`` command-line flag."""

    # model
    pooling: str = _h(f"temporal pooling: one of {sorted(POOLINGS)}", default="rank")
    backward: str = _h("rank-pool gradient: 'woodbury' (exact) or 'diagonal' (the paper's approximation)",
                       default="woodbury")
    C: float = _h("rank-pool regularisation C", default=1.0)
    eps: float = _h("rank-pool epsilon (insensitive zone)", default=0.1)
    tol: float | None = _h("rank-pool solver tolerance on the relative gradient norm (unset: RankPool's 1e-10)",
                           default=None)
    smoothing: bool = _h("rank-pool preprocessing: time-varying mean", default=False)
    signed_sqrt: bool = _h("rank-pool preprocessing: sign(x) sqrt|x|", default=False)
    normalize: bool = _h("rank-pool preprocessing: L2-normalise each frame", default=False)
    bidirectional: bool = _h("pool the reversed sequence too (2p outputs)", default=False)
    head_norm: str = _h("normalisation before the classifier: none, layernorm, batchnorm", default="none")
    dropout: float = _h("dropout on the pooled vector", default=0.0)
    backbone: str = _h("'smallcnn', 'identity' (feature data) or a torchvision model (resnet18, vgg16, ...)",
                       default="smallcnn")
    weights: str | None = _h("torchvision weights name, e.g. DEFAULT (needs internet once)", default=None)
    feature_dim: int = _h("smallcnn output dimension p", default=64)
    backbone_init: str | None = _h("file with a backbone state_dict to start from", default=None)
    # data
    data: str = _h(f"data set: one of {list(DATASETS)}", default="moving-digits")
    data_path: str | None = _h("folder (train/ and test/ sub-folders, or one folder per class); for features, a folder of .pt/.npy files",
                               default=None)
    num_videos: int = _h("moving-digits: training videos", default=256)
    num_test_videos: int = _h("moving-digits: test videos", default=128)
    num_classes: int = _h("moving-digits: classes", default=4)
    min_len: int = _h("moving-digits: shortest video (at least 2 frames: a motion needs two)", default=8)
    max_len: int = _h("moving-digits: longest video", default=16)
    frame_size: int = _h("frame height and width", default=32)
    num_frames: int = _h("folder data: frames sampled per video", default=16)
    cache: str | None = _h("folder data: keep decoded frames (uint8, at frame_size) in this folder, so that "
                           "epochs after the first do not decode again", default=None)
    val_fraction: float = _h("folder/feature data without a test split: held-out fraction", default=0.25)
    # optimisation
    epochs: int = _h("training epochs", default=60)
    batch_size: int = _h("videos per batch (per process under torchrun)", default=1)
    lr: float = _h("initial learning rate", default=0.01)
    lr_final: float = _h("learning rate at the last epoch (exponential decay)", default=1e-4)
    momentum: float = _h("SGD momentum", default=0.9)
    weight_decay: float = _h("SGD weight decay", default=5e-4)
    loss: str = _h(f"loss: one of {list(LOSSES)}", default="ce")
    grad_clip: float | None = _h("clip the gradient norm to this value", default=None)
    amp: bool = _h("automatic mixed precision (bfloat16 on the CPU, float16 on CUDA); the pooling solves in "
                   "float32", default=False)
    sync_bn: bool = _h("synchronise batch-norm statistics across processes under torchrun (CUDA)", default=False)
    seed: int = _h("random seed (model init and data order)", default=0)
    # running
    out: str = _h("output directory", default="runs/train")
    resume: bool = _h("continue from OUT/checkpoint.pt (with a larger --epochs: extend a finished run)",
                      default=False)
    overwrite: bool = _h("replace the run already in OUT", default=False)
    threads: int | None = _h("torch intra-op CPU threads (unset: keep the process's setting)", default=None)
    device: str = _h("'auto', 'cpu', 'cuda' or 'cuda:N'", default="auto")
    num_workers: int = _h("data loader worker processes", default=0)
    quiet: bool = _h("no progress bars or log lines", default=False)
    plot: bool = _h("write OUT/curves.png", default=True)
    tensorboard: bool = _h("write TensorBoard event files to OUT/tensorboard when tensorboard is installed",
                           default=True)

    def validate(self) -> "TrainConfig":
        """Raise a ``ValueError`` naming the first bad field."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {sorted(POOLINGS)}, got {self.pooling!r}")
        if self.backward not in ("woodbury", "diagonal", "dense", "cg", "sherman_morrison"):
            raise ValueError(f"backward: expected 'woodbury' or 'diagonal' (or dense/cg/sherman_morrison), "
                             f"got {self.backward!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {list(LOSSES)}, got {self.loss!r}")
        if self.data not in DATASETS:
            raise ValueError(f"data: expected one of {list(DATASETS)}, got {self.data!r}")
        if self.data != "moving-digits" and not self.data_path:
            raise ValueError(f"data_path: required for data={self.data!r}")
        for name in ("epochs", "batch_size", "num_videos", "num_test_videos", "num_classes", "feature_dim",
                     "frame_size", "num_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_len < 2:     # MovingDigits spreads a motion over T - 1 steps
            raise ValueError(f"min_len (--min-len): must be >= 2 (a moving digit needs two frames to move), "
                             f"got {self.min_len}")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len (--min-len {self.min_len}) must be <= max_len (--max-len {self.max_len})")
        for name in ("lr", "lr_final", "C", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0) and not (name == "eps" and value == 0):
                raise ValueError(f"{name}: must be a positive finite number, got {value}")
        if self.head_norm not in ("none", "layernorm", "batchnorm"):
            raise ValueError(f"head_norm: expected 'none', 'layernorm' or 'batchnorm', got {self.head_norm!r}")
        if self.head_norm == "batchnorm" and self.batch_size < 2:
            raise ValueError("head_norm: 'batchnorm' needs batch_size >= 2; use 'layernorm' with one video per batch")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip: must be a positive finite number (or unset), got {self.grad_clip}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum: must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: must lie in (0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.tol is not None and not (math.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"tol: must be a positive finite number (or unset), got {self.tol}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {self.threads}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or replace it")
        return self


# Fields that may differ between a run and its resumption (``epochs`` may also grow).
_RESUME_FREE = {"resume", "overwrite", "out", "device", "num_workers", "quiet", "plot", "threads", "cache",
                "tensorboard"}

#: What a training run writes into its folder (``overwrite`` removes exactly these).
RUN_OUTPUTS = ("checkpoint.pt", "best.pt", "metrics.json", "log.csv", "curves.png", "tensorboard")


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; files are written by rank 0 only)."""

    model: nn.Module
    history: list[dict]
    final: dict
    frames_per_second: float | None
    out: Path
    unreadable: list[dict] = field(default_factory=list)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`; ``epochs_done`` epochs of ``epochs`` are saved in ``out``."""

    def __init__(self, out: Path, epochs_done: int, epochs: int):
        super().__init__(f"interrupted after {epochs_done} of {epochs} epochs")
        self.out, self.epochs_done, self.epochs = out, epochs_done, epochs


# --------------------------------------------------------------------------- losses and metrics


def _targets(labels: Tensor, num_classes: int) -> Tensor:
    """{0, 1} targets ``(B, K)`` from class indices ``(B,)`` or multi-hot labels ``(B, K)``."""
    if labels.dim() == 1:
        return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float32)
    if labels.dim() == 2 and labels.shape[1] == num_classes:
        return labels.to(torch.float32)
    raise ValueError(f"labels must have shape (B,) or (B, {num_classes}), got {tuple(labels.shape)}")


def video_loss(logits: Tensor, labels: Tensor, loss: str = "ce") -> Tensor:
    """The training loss. ``logits: (B, K)``; ``labels: (B,)`` class indices or ``(B, K)`` in {0, 1}.

    ``"ce"``: cross-entropy (single-label only). ``"hinge"`` / ``"sqhinge"``: one-vs-rest
    (squared) hinge ``mean_b sum_k max(0, 1 - y_bk s_bk)[^2]`` with ``y = 2 * target - 1``.
    """
    if loss == "ce":
        if labels.dim() != 1:
            raise ValueError("loss='ce' needs single-label targets of shape (B,); use loss='hinge' for multi-label")
        return nn.functional.cross_entropy(logits, labels.long())
    if loss in ("hinge", "sqhinge"):
        y = 2.0 * _targets(labels, logits.shape[1]).to(logits.dtype) - 1.0     # (B, K) in {-1, +1}
        margin = torch.clamp(1.0 - y * logits, min=0.0)
        if loss == "sqhinge":
            margin = margin * margin
        return margin.sum(1).mean()
    raise ValueError(f"loss: expected one of {list(LOSSES)}, got {loss!r}")


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes (with at least one positive) of sklearn's average precision."""
    try:
        from sklearn.metrics import average_precision_score
    except ImportError as exc:  # pragma: no cover
        raise ImportError("mAP needs scikit-learn: pip install scikit-learn") from exc
    aps = [average_precision_score(targets[:, k], scores[:, k])
           for k in range(targets.shape[1]) if targets[:, k].any()]
    return float(np.mean(aps)) if aps else float("nan")


def _metrics(scores: Tensor, labels: Tensor, loss: str) -> dict:
    out = {}
    if labels.dim() == 1:
        out["accuracy"] = float((scores.argmax(1) == labels).double().mean())
    if loss != "ce" or labels.dim() == 2:
        out["map"] = mean_average_precision(scores.double().numpy(), _targets(labels, scores.shape[1]).numpy())
    return out


def check_finite(loss: Tensor, *, epoch: int, batch: int, distributed: bool = False) -> None:
    """Raise ``FloatingPointError`` naming the epoch and batch when the loss is NaN or infinite."""
    bad = torch.logical_not(torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bool(bad.item()):
        raise FloatingPointError(
            f"non-finite training loss ({float(loss.detach())}) at epoch {epoch + 1}, batch {batch}; "
            "lower the learning rate, set grad_clip, or check the inputs"
        )


# --------------------------------------------------------------------------- data and model


def build_datasets(cfg: TrainConfig):
    """``(train_set, test_set, num_classes, frame_shape)`` for ``cfg.data``."""
    from . import data as vdata

    if cfg.data == "moving-digits":
        common = dict(num_classes=cfg.num_classes, min_len=cfg.min_len, max_len=cfg.max_len,
                      size=cfg.frame_size, seed=cfg.seed)
        train_set = vdata.MovingDigits("train", num_videos=cfg.num_videos, **common)
        test_set = vdata.MovingDigits("test", num_videos=cfg.num_test_videos, **common)
    else:
        if cfg.data == "folder":
            def make(path):
                return vdata.VideoFolder(path, num_frames=cfg.num_frames, frame_size=cfg.frame_size, cache=cfg.cache)
        else:
            make = vdata.FeatureDataset
        root = Path(cfg.data_path)
        if not root.is_dir():
            raise ValueError(f"data_path: {root} is not a directory")
        make = _quietly(make)
        # root/train + root/test (or root/val) when present, else a seeded split of root
        test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
        if (root / "train").is_dir() and test_dir is not None:
            train_set, test_set = make(root / "train"), make(test_dir)
            if list(train_set.classes) != list(test_set.classes):
                # each split numbers its own sorted class folders: different sets would shift labels
                raise ValueError(
                    f"data_path: {root / 'train'} and {test_dir} must hold the same classes, got "
                    f"{list(train_set.classes)} and {list(test_set.classes)}"
                )
        elif (root / "train").is_dir() or test_dir is not None:
            raise ValueError(
                f"data_path: {root} has a train/ folder without test/ or val/ (or the reverse); give both, "
                "or one folder per class to split at random"
            )
        else:
            train_set, test_set = _split(make(root), cfg.val_fraction, cfg.seed)
    num_classes = _num_classes(train_set)
    return train_set, test_set, num_classes, item_shape(train_set)


def _quietly(make: Callable) -> Callable:
    """``make`` without its warnings about unreadable files: the start-of-run summary lists them."""
    from .data import UnreadableFileWarning

    def wrapped(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableFileWarning)
            return make(*args, **kwargs)

    return wrapped


def item_shape(dataset, split: str = "training") -> tuple[int, ...]:
    """The per-step shape of the first readable item (``(C, H, W)`` or ``(p,)``).

    Raises a ``ValueError`` naming the ``split`` and every item's file and why it is unreadable
    (the first five, then a count) when none can be read.
    """
    from .data import UnreadableItemError

    errors: list[UnreadableItemError] = []
    for i in range(len(dataset)):
        try:
            return tuple(dataset[i][0].shape[1:])
        except UnreadableItemError as err:
            errors.append(err)
    raise ValueError(f"data: {_none_readable(dataset, split, [(e.path, e.reason) for e in errors])}")


def _none_readable(dataset, split: str, bad: list[tuple[str, str]], earlier: int = 0) -> str:
    """``"none of the N items of the test split (under ROOT) can be read: a.avi (reason); ..."``
    (``"the only item ... cannot be read"`` for a split of one)."""
    base = getattr(dataset, "dataset", dataset)
    while hasattr(base, "dataset") and not hasattr(base, "root"):
        base = base.dataset
    root = getattr(base, "root", None)
    where = f" (under {root})" if root is not None else ""
    if not bad:
        return f"the {split} split{where} holds no item"
    listed = "; ".join(f"{p} ({r})" for p, r in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    before = f"; and {earlier} found unreadable in earlier epochs" if earlier else ""
    scanned = len(getattr(base, "left_out", {}) or {})
    also = (f"; {scanned} more file{'s were' if scanned != 1 else ' was'} left out when the folder was scanned"
            if scanned else "")
    which, verb = (f"none of the {len(dataset)} items", "can") if len(dataset) != 1 else ("the only item", "cannot")
    return (f"{which} of the {split} split{where} {verb} be read: {listed}{more}{before}{also}; "
            "fix or remove these files")


def _num_classes(dataset) -> int:
    base = getattr(dataset, "dataset", dataset)        # a Subset's underlying data set
    if hasattr(base, "num_classes"):
        return int(base.num_classes)
    if hasattr(base, "classes"):
        return len(base.classes)
    raise ValueError(f"cannot tell the number of classes of {type(base).__name__}: give it `num_classes`")


def _split(dataset, fraction: float, seed: int):
    from torch.utils.data import Subset

    n = len(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, int(round(fraction * n)))
    return Subset(dataset, sorted(perm[k:])), Subset(dataset, sorted(perm[:k]))


def build_model(cfg: TrainConfig, num_classes: int, frame_shape: tuple[int, ...]) -> VideoClassifier:
    """The :class:`VideoClassifier` described by ``cfg`` for frames of shape ``frame_shape``."""
    if len(frame_shape) == 1:                           # feature data: (T, p) per video
        if cfg.backbone not in ("identity", "smallcnn"):
            raise ValueError(f"backbone: feature data takes no image backbone, got {cfg.backbone!r}")
        backbone, p = build_backbone("identity", feature_dim=frame_shape[0])
    else:
        backbone, p = build_backbone(cfg.backbone, weights=cfg.weights, in_channels=frame_shape[0],
                                     feature_dim=cfg.feature_dim, frame_size=frame_shape[-1])
        if cfg.backbone not in ("smallcnn", "identity"):
            _check_frame_size(backbone, cfg.backbone, frame_shape)
    if cfg.backbone_init:
        state = load_checkpoint(cfg.backbone_init, what="backbone_init", weights_only=True, require=None,
                                hint="give a file written by torch.save(backbone.state_dict())")
        backbone.load_state_dict(state)
    pooling = build_pooling(cfg.pooling, C=cfg.C, eps=cfg.eps, backward=cfg.backward, smoothing=cfg.smoothing,
                            signed_sqrt=cfg.signed_sqrt, normalize=cfg.normalize, bidirectional=cfg.bidirectional,
                            tol=cfg.tol)
    return VideoClassifier(backbone, pooling, num_classes, p, head_norm=cfg.head_norm, dropout=cfg.dropout)


@torch.no_grad()
def _check_frame_size(backbone: nn.Module, name: str, frame_shape: tuple[int, ...]) -> None:
    """One frame through a torchvision backbone, so that frames too small for it fail here, in one line."""
    was = backbone.training
    backbone.eval()
    try:
        backbone(torch.zeros(1, *frame_shape))
    except RuntimeError as exc:
        raise ValueError(f"backbone: {name} cannot take frames of {frame_shape[-2]}×{frame_shape[-1]} pixels "
                         f"({' '.join(str(exc).split())[:120]}); use a larger --frame-size, e.g. 112 or 224") from exc
    finally:
        backbone.train(was)


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: the data order depends only on ``(seed, epoch)``."""
    return seed * 100_003 + epoch


def _train_loader(dataset, cfg: "TrainConfig", epoch: int, distributed: bool, exclude=()):
    from .data import make_loader

    # BatchNorm cannot train on a last batch of one video: drop an incomplete last batch then
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=epoch_seed(cfg.seed, epoch),
                         distributed=distributed, num_workers=cfg.num_workers,
                         drop_last=cfg.head_norm == "batchnorm", exclude=exclude)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    return loader


def eval_loader(dataset, batch_size: int, num_workers: int = 0, exclude=()):
    """Every readable item of ``dataset`` not in ``exclude``, in order (also under ``torch.distributed``),
    batched by ``collate_videos``; unreadable items land in ``loader.skipped``."""
    from .data import make_loader

    return make_loader(dataset, batch_size, shuffle=False, distributed=False, num_workers=num_workers,
                       exclude=exclude)


# --------------------------------------------------------------------------- running


def _dist_init(cfg: TrainConfig):
    """``(rank, world_size, device, created_group)``; a process group only under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(cfg.device), False
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local)
    created = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return rank, world, device, created


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _progress(iterable, *, desc: str, disable: bool, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True)


def _autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on the CPU, float16 on CUDA; a no-op context when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


class NothingToEvaluate(ValueError):
    """:func:`predict` found no readable item; the message names the files and why."""


@torch.no_grad()
def predict(model: nn.Module, loader, *, device: torch.device | str = "cpu", amp: bool = False,
            score: Callable | None = None, split: str = "evaluated") -> tuple[Tensor, Tensor]:
    """Scores ``(N, K)`` (float32, CPU) and labels of every batch of ``loader``, the model in eval mode.

    ``score(model, frames, lengths)`` replaces ``model(frames, lengths)`` (e.g. per-frame scoring).
    Raises :class:`NothingToEvaluate`, naming the ``split``, the files and why each is unreadable,
    when no item can be read.
    """
    model.eval()
    device = torch.device(device)
    scores, labels_all = [], []
    for batch in loader:
        if batch is None:                   # every item of the batch was unreadable
            continue
        frames, lengths, labels = (t.to(device) for t in batch)
        with _autocast(device, amp):
            logits = model(frames, lengths) if score is None else score(model, frames, lengths)
        scores.append(logits.float().cpu())
        labels_all.append(labels.cpu())
    if not scores:
        skipped = [(s.path, s.reason) for s in getattr(loader, "skipped", [])]
        view = getattr(loader, "dataset", None)
        if view is None or not skipped:
            raise NothingToEvaluate(f"evaluate: no readable item in the {split} split to evaluate")
        dataset = getattr(view, "dataset", view)             # the data set under make_loader's view
        earlier = len(dataset) - len(view)                    # excluded before this pass
        raise NothingToEvaluate(f"evaluate: {_none_readable(dataset, split, skipped, earlier)}")
    return torch.cat(scores), torch.cat(labels_all)


def evaluate(model: nn.Module, loader, *, loss: str = "ce", device: torch.device | str = "cpu",
             amp: bool = False, split: str = "evaluated") -> dict:
    """Loss and metrics (``accuracy`` for single-label data, ``map`` for hinge or multi-label), and
    ``items``, the number of videos evaluated (a loader of :func:`eval_loader` leaves unreadable ones out)."""
    scores, labels = predict(model, loader, device=device, amp=amp, split=split)
    out = {"loss": float(video_loss(scores, labels, loss))}
    out.update(_metrics(scores, labels, loss))
    out["items"] = len(labels)
    return out


# --------------------------------------------------------------------------- convergence reporting

_SAMPLES = re.compile(r"samples \[([^\]]*)\]( \.\.\.)?")
_NORMS = re.compile(r"‖∇f‖ = \[([^\]]*)\]")


class ConvergenceLog:
    """Collects ``argminlayers.ConvergenceWarning`` raised inside ``with log:`` instead of printing it.

    Per :meth:`reset` period (an epoch) it counts the solves that did not converge, the samples
    they name (a lower bound where a warning lists only the first few) and the largest gradient
    norm they quote. Other warnings are shown, each distinct one once.
    """

    def __init__(self):
        self._shown: set = set()
        self.reset()

    def reset(self) -> None:
        self.solves, self.samples, self.at_least, self.worst = 0, 0, False, None

    def __enter__(self) -> "ConvergenceLog":
        self._cm = warnings.catch_warnings(record=True)
        self._records = self._cm.__enter__()
        warnings.simplefilter("always", ConvergenceWarning)
        return self

    def __exit__(self, *exc) -> bool:
        self._cm.__exit__(*exc)
        for w in self._records:
            if issubclass(w.category, ConvergenceWarning):
                self._add(w.message)
            elif (w.category, str(w.message)) not in self._shown:
                self._shown.add((w.category, str(w.message)))
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        return False

    def _add(self, warning: Warning) -> None:
        self.solves += 1
        samples, norms = getattr(warning, "samples", None), getattr(warning, "grad_norms", None)
        if samples:  # the layer's own report: every sample and norm, not only the first few
            self.samples += len(samples)
            values = [x for x in (norms or []) if x == x]
            if values:
                self.worst = max(values + ([self.worst] if self.worst is not None else []))
            return
        text = str(warning)
        m = _SAMPLES.search(text)
        named = [x for x in m.group(1).split(",") if x.strip()] if m else []
        self.samples += max(len(named), 1)
        self.at_least |= m is None or bool(m.group(2))
        n = _NORMS.search(text)
        values = [float(v.strip(" '\"")) for v in n.group(1).split(",") if v.strip(" '\"")] if n else []
        if values:
            self.worst = max(values + ([self.worst] if self.worst is not None else []))

    def restore(self, entry: dict) -> None:
        """Continue the counts of a history ``entry`` (an epoch evaluated again on resume)."""
        self.solves, self.samples = entry.get("nonconverged_solves", 0), entry.get("nonconverged_samples", 0)
        self.at_least, self.worst = entry.get("nonconverged_samples_lower_bound", False), entry.get("worst_grad_norm")

    def entry(self) -> dict:
        return {"nonconverged_solves": self.solves, "nonconverged_samples": self.samples,
                "nonconverged_samples_lower_bound": self.at_least, "worst_grad_norm": self.worst}


def solver_tolerances(model: nn.Module) -> str:
    """The tolerances of the argmin layers in ``model``, e.g. ``"RankPoolObjective tol 1e-10, check_tol 1e-06"``."""
    found = []
    for module in model.modules():
        objective = getattr(module, "objective", None)
        if objective is not None and hasattr(objective, "tol"):
            parts = [f"tol {objective.tol:g}"] + ([f"check_tol {objective.check_tol:g}"]
                                                  if hasattr(objective, "check_tol") else [])
            text = f"{type(objective).__name__} {', '.join(parts)}"
            if text not in found:
                found.append(text)
    return "; ".join(found) or "the solver's default tolerance"


def _convergence_line(entry: dict, model: nn.Module) -> str:
    worst = "" if entry["worst_grad_norm"] is None else f", worst ‖∇f‖ {entry['worst_grad_norm']:.2e}"
    count = ("at least " if entry["nonconverged_samples_lower_bound"] else "") + str(entry["nonconverged_samples"])
    return (f"epoch {entry['epoch']}: the pooling's solver did not converge for {count} samples in "
            f"{entry['nonconverged_solves']} solves{worst} ({solver_tolerances(model)}; --tol sets it)")


# --------------------------------------------------------------------------- unreadable items


def _gather_skipped(skipped: list, distributed: bool) -> list:
    """The skipped records of every process (each process sees its own shard's)."""
    records = [tuple(s) for s in skipped]
    if distributed:
        import torch.distributed as dist

        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, records)
        records = [r for part in every for r in part]
    return records


def _note_skipped(bad: dict, records: list, split: str, epoch: int) -> list[dict]:
    """Add new records to ``bad[split]`` (index -> record); returns the new ones."""
    new = []
    for index, path, reason in records:
        if int(index) not in bad[split]:
            bad[split][int(index)] = {"path": path, "reason": reason, "split": split, "found": f"epoch {epoch + 1}"}
            new.append(bad[split][int(index)])
    return new


def _unreadable_records(data_info: dict, bad: dict) -> list[dict]:
    scanned = {**data_info["train"]["unreadable"], **data_info["test"]["unreadable"]}
    records = [{"path": p, "reason": r, "split": None, "found": "scan"} for p, r in scanned.items()]
    return records + [r for split in ("train", "test") for r in bad[split].values()]


# --------------------------------------------------------------------------- the loop


def _check_resumable(ckpt: dict, cfg: TrainConfig) -> int:
    """Refuse a checkpoint of another configuration; returns the epochs of its learning-rate schedule."""
    saved, now, defaults = ckpt["config"], dataclasses.asdict(cfg), dataclasses.asdict(TrainConfig())
    diff = sorted(k for k in now if k not in _RESUME_FREE and k != "epochs" and saved.get(k, defaults[k]) != now[k])
    if diff:
        details = ", ".join(f"{k}: {saved.get(k, defaults[k])!r} -> {now[k]!r}" for k in diff)
        raise ValueError(f"resume: the checkpoint in {cfg.out} was written with another configuration ({details}); "
                         "resume with the run's own settings, or pass --overwrite to start afresh")
    done = int(ckpt["epoch"])
    if cfg.epochs < done:
        raise ValueError(f"epochs: the run in {cfg.out} has already done {done} epochs; give --epochs {done} or more")
    return int(ckpt.get("schedule_epochs", saved.get("epochs", done)))


def _primary_metric(entry: dict) -> str | None:
    return next((k for k in ("test_accuracy", "test_map") if entry.get(k) is not None), None)


def train(
    config: TrainConfig,
    *,
    datasets: tuple | None = None,
    model: nn.Module | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    summary: bool = True,
) -> TrainResult:
    """Train one configuration; see the module docstring.

    Args:
        config: the run's :class:`TrainConfig`.
        datasets: optional ``(train_set, test_set)`` to use instead of building them from
            ``config.data`` (items ``(frames[T, ...], label)``).
        model: optional model to train instead of :func:`build_model`'s.
        on_epoch_end: called as ``on_epoch_end(epoch_index, history_entry)`` after each epoch's
            checkpoint is written.
        summary: print the start-of-run data summary (unless ``quiet``).

    Returns:
        a :class:`TrainResult`: the trained model (unwrapped), the per-epoch history, the final
        evaluation, the training frames per second and the unreadable files left out.

    Raises:
        FileExistsError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        TrainingInterrupted: on Ctrl-C; the finished epochs are in ``out/checkpoint.pt``.
    """
    cfg = config.validate()
    set_threads(cfg.threads)
    rank, world, device, created_group = _dist_init(cfg)
    distributed = world > 1
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    history: list[dict] = []
    try:
        prepare_run_folder(out, RUN_OUTPUTS, resume=cfg.resume, overwrite=cfg.overwrite, check_only=True)
        ckpt = None
        if cfg.resume and ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path, hint="remove it, or pass --overwrite instead of --resume to start afresh")
        schedule_epochs = _check_resumable(ckpt, cfg) if ckpt is not None else cfg.epochs
        show = not cfg.quiet and rank == 0

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        if datasets is None:
            train_set, test_set, num_classes, frame_shape = build_datasets(cfg)
        else:
            train_set, test_set = datasets
            num_classes = _num_classes(train_set)
            frame_shape = item_shape(train_set)
        with torch.random.fork_rng(devices=[]):   # reading an item must not move the seeded model init
            item_shape(test_set, "test")          # a test split with nothing readable fails before training
        from .data import describe, format_summary

        data_info = {"train": describe(train_set), "test": describe(test_set)}
        if rank == 0 and summary:
            source = cfg.data if datasets is None else "(given)"
            for line in format_summary(data_info, frame_shape=frame_shape, source=source):
                if show:
                    print(line, file=sys.stderr, flush=True)
                elif line.startswith("warning:"):
                    warnings.warn(line[len("warning: "):], UserWarning, stacklevel=2)

        if model is None:
            model = build_model(cfg, num_classes, frame_shape)
        model = model.to(device)
        if cfg.sync_bn and distributed:
            if device.type != "cuda":
                raise ValueError("sync_bn: torch's SyncBatchNorm runs on CUDA devices only; leave --sync-bn out "
                                 "on the CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif cfg.sync_bn and show:
            print("note: --sync-bn acts only under torchrun (several processes); ignored here", file=sys.stderr)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: no trainable parameters")
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        gamma = (cfg.lr_final / cfg.lr) ** (1.0 / (schedule_epochs - 1)) if schedule_epochs > 1 else 1.0
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")

        bad: dict = {"train": {}, "test": {}}      # index in the split -> record of an item found unreadable
        best = None
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
            history = list(ckpt["history"])
            bad = {k: {int(i): r for i, r in v.items()} for k, v in ckpt.get("unreadable_items", bad).items()}
            best = ckpt.get("best")
            _set_rng_state(ckpt["rng"])
            if show and len(history) >= cfg.epochs:
                print(f"resume: the run in {out} already has {len(history)} epochs; nothing to train "
                      "(a larger --epochs extends it)", file=sys.stderr)
        elif cfg.resume and show:
            print(f"resume: no checkpoint at {ckpt_path}; starting from scratch", file=sys.stderr)

        # every check is done: only now does --overwrite clear the earlier run
        if distributed:
            import torch.distributed as dist

            dist.barrier()
        if rank == 0:
            prepare_run_folder(out, RUN_OUTPUTS, resume=cfg.resume, overwrite=cfg.overwrite)
        net: nn.Module = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        bars = show and sys.stderr.isatty()
        conv = ConvergenceLog()
        board = _tensorboard(out, cfg) if rank == 0 else None
        start_epoch = len(history)

        def finish_epoch(entry: dict, epoch: int, new: list) -> str | None:
            """Rank 0: evaluate a trained epoch, save it and report it; returns why the run must stop."""
            nonlocal best
            test_loader = eval_loader(test_set, max(cfg.batch_size, 8), cfg.num_workers, exclude=bad["test"])
            stop = None
            try:
                with conv:
                    metrics = evaluate(model, test_loader, loss=cfg.loss, device=device, amp=cfg.amp, split="test")
            except NothingToEvaluate as exc:   # save the trained epoch first, then stop
                # the items unreadable now are not excluded for good: --resume reads them again
                metrics, entry["evaluation_pending"] = {}, True
                stop = (f"{exc}; epoch {epoch + 1} is trained and saved in {ckpt_path}: rerun with --resume once "
                        "the files are fixed (it evaluates that epoch first)")
            else:
                entry.pop("evaluation_pending", None)
                new += _note_skipped(bad, [tuple(s) for s in test_loader.skipped], "test", epoch)
            entry.update({f"test_{k}": v for k, v in metrics.items()})
            entry.update(conv.entry())
            entry["unreadable_found"] = entry.get("unreadable_found", 0) + len(new)   # + training's, on resume
            key = _primary_metric(entry)
            if key is not None and (best is None or entry[key] > best["value"]):
                best = {"epoch": entry["epoch"], "metric": key, "value": entry[key]}
                _atomic_save({"model": model.state_dict(), "epoch": epoch + 1, "best": best,
                              "config": dataclasses.asdict(cfg)}, out / "best.pt")
            _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                          "rng": _rng_state(), "epoch": epoch + 1, "history": history,
                          "schedule_epochs": schedule_epochs, "unreadable_items": bad, "best": best,
                          "config": dataclasses.asdict(cfg)}, ckpt_path)
            _write_metrics(out, cfg, history, data_info, bad, best)
            _write_csv(out / "log.csv", history)
            if board is not None:
                _board_epoch(board, entry)
            if show:
                print(_format_entry(entry, cfg.epochs), file=sys.stderr, flush=True)
                if new:
                    listed = "; ".join(f"{r['path']} ({r['reason']})" for r in new)
                    print(f"epoch {epoch + 1}: {len(new)} unreadable file{'s' if len(new) != 1 else ''} "
                          f"left out from now on: {listed}", file=sys.stderr, flush=True)
                if entry["nonconverged_solves"]:
                    print(_convergence_line(entry, model), file=sys.stderr, flush=True)
            return stop

        def settle(stop: str | None, epoch: int) -> None:
            """Every process stops when rank 0 must: none is left waiting on the others."""
            if distributed:
                import torch.distributed as dist

                flag = torch.tensor([0.0 if stop is None else 1.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() > 0 and stop is None:
                    stop = (f"the test split of epoch {epoch + 1} could not be evaluated (rank 0 reports which "
                            f"files); the epoch is saved in {ckpt_path}: rerun with --resume once they are fixed")
            if stop is not None:
                raise ValueError(stop)

        try:
            if history and history[-1].get("evaluation_pending"):   # the last run stopped before evaluating its epoch
                stop = None
                if rank == 0:
                    conv.restore(history[-1])
                    with torch.random.fork_rng(devices=[]):   # evaluating must not move the saved training stream
                        stop = finish_epoch(history[-1], len(history) - 1, [])
                settle(stop, len(history) - 1)
            for epoch in range(start_epoch, cfg.epochs):
                train_loader = _train_loader(train_set, cfg, epoch, distributed, exclude=bad["train"])
                conv.reset()
                with conv:
                    entry = _train_epoch(net, train_loader, optimizer, scaler, cfg, epoch, device, distributed, bars)
                new = _note_skipped(bad, _gather_skipped(train_loader.skipped, distributed), "train", epoch)
                entry["lr"] = optimizer.param_groups[0]["lr"]
                if epoch + 1 < schedule_epochs:    # after the schedule's last epoch the rate stays at lr_final
                    scheduler.step()
                history.append(entry)
                settle(finish_epoch(entry, epoch, new) if rank == 0 else None, epoch)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, entry)
        except KeyboardInterrupt as exc:
            raise TrainingInterrupted(out, len(history), cfg.epochs) from exc
        finally:
            if board is not None:
                board.close()

        final = {k[len("test_"):]: v for k, v in history[-1].items() if k.startswith("test_")} if history else {}
        fps = _overall_fps(history)
        if rank == 0:
            _write_metrics(out, cfg, history, data_info, bad, best, final=final)
            if cfg.plot:
                plot_history(history, out / "curves.png", title=f"{cfg.pooling} ({cfg.loss})")
        return TrainResult(model=model, history=history, final=final, frames_per_second=fps, out=out,
                           unreadable=_unreadable_records(data_info, bad))
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train_epoch(net, loader, optimizer, scaler, cfg, epoch, device, distributed, bars) -> dict:
    net.train()
    loss_sum, correct, count, frames_done, step_time, dropped = 0.0, 0.0, 0, 0, 0.0, 0
    single_label = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for batch_index, batch in enumerate(_progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not bars)):
        if distributed:                     # every process skips a step where one has nothing left to train on
            import torch.distributed as dist

            empty = torch.tensor([float(batch is None)], device=device)
            dist.all_reduce(empty, op=dist.ReduceOp.MAX)
            if empty.item() > 0:
                dropped += 0 if batch is None else len(batch[2])
                continue
        start = time.perf_counter()
        frames, lengths, labels = (t.to(device) for t in batch)
        with _autocast(device, cfg.amp):
            logits = net(frames, lengths)
        loss = video_loss(logits.float(), labels, cfg.loss)
        check_finite(loss, epoch=epoch, batch=batch_index, distributed=distributed)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        sync()
        step_time += time.perf_counter() - start
        frames_done += int(lengths.sum())
        n = len(labels)
        loss_sum += float(loss.detach()) * n
        count += n
        if labels.dim() == 1:
            correct += float((logits.detach().argmax(1) == labels).sum())
        else:
            single_label = False
    totals = torch.tensor([loss_sum, correct, count, frames_done, dropped], dtype=torch.float64)
    wall = torch.tensor([step_time], dtype=torch.float64)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(totals)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    loss_sum, correct, count, frames_done, dropped = totals.tolist()
    entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1)}
    if single_label:
        entry["train_accuracy"] = correct / max(count, 1)
    entry.update({"train_items": int(count), "train_frames": int(frames_done), "train_step_seconds": float(wall.item()),
                  "frames_per_second": frames_done / float(wall.item()) if wall.item() > 0 else None})
    if dropped:
        entry["train_items_sat_out"] = int(dropped)   # readable items of a step another process had to skip
    return entry


def _overall_fps(history: list[dict]) -> float | None:
    frames = sum(e.get("train_frames", 0) for e in history)
    seconds = sum(e.get("train_step_seconds", 0.0) for e in history)
    return frames / seconds if seconds > 0 else None


def _format_entry(entry: dict, epochs: int) -> str:
    parts = [f"epoch {entry['epoch']}/{epochs}", f"lr {entry['lr']:.2e}", f"loss {entry['train_loss']:.4f}"]
    for key in ("train_accuracy", "test_loss", "test_accuracy", "test_map"):
        if key in entry:
            parts.append(f"{key} {entry[key]:.4f}")
    if entry.get("frames_per_second"):
        parts.append(f"{entry['frames_per_second']:.0f} frames/s")
    return "  ".join(parts)


def _write_metrics(out: Path, cfg: TrainConfig, history: list[dict], data_info: dict, bad: dict,
                   best: dict | None, final: dict | None = None) -> None:
    unreadable = _unreadable_records(data_info, bad)
    data = {"train": {k: v for k, v in data_info["train"].items() if k != "unreadable"},
            "test": {k: v for k, v in data_info["test"].items() if k != "unreadable"},
            "skipped": len(unreadable), "unreadable": unreadable}
    _atomic_json({"config": dataclasses.asdict(cfg), "history": history, "final": final, "best": best,
                  "frames_per_second": _overall_fps(history), "data": data}, out / "metrics.json")


def _write_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch, one column per history key (in order of first appearance)."""
    keys: list[str] = []
    for entry in history:
        keys += [k for k in entry if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def _tensorboard(out: Path, cfg: TrainConfig):
    """A ``SummaryWriter`` on ``out/tensorboard``, or ``None`` (turned off, or tensorboard not installed)."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _board_epoch(board, entry: dict) -> None:
    for key, value in entry.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            board.add_scalar(key, value, entry["epoch"])
    board.flush()


def plot_history(history: list[dict], path: Path, *, title: str = "") -> None:
    """Training curves (loss; accuracy or mAP) against the epoch, as a PNG."""
    if not history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise ImportError("plots need matplotlib: pip install matplotlib (or set plot=False)") from exc
    from matplotlib.ticker import MaxNLocator

    epochs = [e["epoch"] for e in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    nan = float("nan")                  # an epoch without a value (not evaluated) leaves a gap
    for key in ("train_loss", "test_loss"):
        if any(key in e for e in history):
            axes[0].plot(epochs, [e.get(key, nan) for e in history], marker="o", label=key.replace("_", " "))
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    shown = [k for k in ("train_accuracy", "test_accuracy", "test_map") if any(k in e for e in history)]
    for key in shown:
        axes[1].plot(epochs, [e.get(key, nan) for e in history], marker="o", label=key.replace("_", " "))
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel(" / ".join(dict.fromkeys("mAP" if k.endswith("map") else "accuracy" for k in shown)))
    axes[1].set_ylim(0, 1.02)
    axes[1].legend()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)

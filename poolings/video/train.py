"""End-to-end training of a :class:`~poolings.video.models.VideoClassifier`.

``train(TrainConfig(...))`` runs the paper's recipe by default: SGD with momentum 0.9, weight
decay 5e-4, and a learning rate decayed exponentially (log-linearly) from ``lr`` = 0.01 at the
first epoch to ``lr_final`` = 1e-4 at the last::

    lr_e = lr * (lr_final / lr) ** (e / (epochs - 1)),   e = 0 .. epochs - 1

Losses: ``"ce"`` (cross-entropy, reported with accuracy) and the one-vs-rest hinge losses
``"hinge"`` / ``"sqhinge"`` on ±1 targets (reported with mean average precision), which also
take multi-label targets ``(B, K)``::

    hinge:   mean_b sum_k max(0, 1 - y_bk s_bk)        sqhinge: the same, squared

Every epoch writes ``out/checkpoint.pt`` (model, optimiser, scheduler, RNG states, epoch,
history; written to a temporary file then ``os.replace``-d), ``out/metrics.json`` and
``out/curves.png``. ``resume=True`` continues from the checkpoint; the data order depends only
on ``(seed, epoch)``, so an interrupted and resumed run ends with the same parameters as an
uninterrupted one.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), training runs data-parallel:
one process group (gloo on CPU, nccl on CUDA), ``DistributedDataParallel``, a
``DistributedSampler``; only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .models import POOLINGS, VideoClassifier, build_backbone, build_pooling

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
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
    min_len: int = _h("moving-digits: shortest video", default=8)
    max_len: int = _h("moving-digits: longest video", default=16)
    frame_size: int = _h("frame height and width", default=32)
    num_frames: int = _h("folder data: frames sampled per video", default=16)
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
    seed: int = _h("random seed (model init and data order)", default=0)
    # running
    out: str = _h("output directory", default="runs/train")
    resume: bool = _h("continue from OUT/checkpoint.pt", default=False)
    device: str = _h("'auto', 'cpu', 'cuda' or 'cuda:N'", default="auto")
    num_workers: int = _h("data loader worker processes", default=0)
    quiet: bool = _h("no progress bars or log lines", default=False)
    plot: bool = _h("write OUT/curves.png", default=True)

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
                     "frame_size", "num_frames", "min_len", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be <= max_len ({self.max_len})")
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
        return self


# Fields that may differ between a run and its resumption.
_RESUME_FREE = {"resume", "out", "device", "num_workers", "quiet", "plot"}


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; files are written by rank 0 only)."""

    model: nn.Module
    history: list[dict]
    final: dict
    frames_per_second: float | None
    out: Path


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
                return vdata.VideoFolder(path, num_frames=cfg.num_frames, frame_size=cfg.frame_size)
        else:
            make = vdata.FeatureDataset
        root = Path(cfg.data_path)
        if not root.is_dir():
            raise ValueError(f"data_path: {root} is not a directory")
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
    frames, _ = train_set[0]
    return train_set, test_set, num_classes, tuple(frames.shape[1:])


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
    if cfg.backbone_init:
        state = torch.load(cfg.backbone_init, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state)
    pooling = build_pooling(cfg.pooling, C=cfg.C, eps=cfg.eps, backward=cfg.backward, smoothing=cfg.smoothing,
                            signed_sqrt=cfg.signed_sqrt, normalize=cfg.normalize, bidirectional=cfg.bidirectional)
    return VideoClassifier(backbone, pooling, num_classes, p, head_norm=cfg.head_norm, dropout=cfg.dropout)


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: the data order depends only on ``(seed, epoch)``."""
    return seed * 100_003 + epoch


def _train_loader(dataset, cfg: "TrainConfig", epoch: int, distributed: bool):
    from .data import make_loader

    # BatchNorm cannot train on a last batch of one video: drop an incomplete last batch then
    loader = make_loader(dataset, cfg.batch_size, shuffle=True, seed=epoch_seed(cfg.seed, epoch),
                         distributed=distributed, num_workers=cfg.num_workers,
                         drop_last=cfg.head_norm == "batchnorm")
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    return loader


def eval_loader(dataset, batch_size: int, num_workers: int = 0):
    """Every item of ``dataset`` in order (also under ``torch.distributed``), batched by ``collate_videos``."""
    from torch.utils.data import DataLoader

    from .data import collate_videos

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_videos,
                      num_workers=num_workers)


# --------------------------------------------------------------------------- running


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``'auto'`` → ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


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


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, loss: str = "ce", device: torch.device | str = "cpu") -> dict:
    """Loss and metrics (``accuracy`` for single-label data, ``map`` for hinge or multi-label)."""
    model.eval()
    scores, labels_all, total, count = [], [], 0.0, 0
    for frames, lengths, labels in loader:
        frames, lengths, labels = frames.to(device), lengths.to(device), labels.to(device)
        logits = model(frames, lengths)
        total += float(video_loss(logits, labels, loss)) * len(labels)
        count += len(labels)
        scores.append(logits.float().cpu())
        labels_all.append(labels.cpu())
    if count == 0:
        raise ValueError("evaluate: the loader is empty")
    out = {"loss": total / count}
    out.update(_metrics(torch.cat(scores), torch.cat(labels_all), loss))
    return out


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    now = dataclasses.asdict(cfg)
    diff = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise ValueError(f"resume: the checkpoint was written with a different configuration ({details})")


def train(
    config: TrainConfig,
    *,
    datasets: tuple | None = None,
    model: nn.Module | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train one configuration; see the module docstring.

    Args:
        config: the run's :class:`TrainConfig`.
        datasets: optional ``(train_set, test_set)`` to use instead of building them from
            ``config.data`` (items ``(frames[T, ...], label)``).
        model: optional model to train instead of :func:`build_model`'s.
        on_epoch_end: called as ``on_epoch_end(epoch_index, history_entry)`` after each epoch's
            checkpoint is written.

    Returns:
        a :class:`TrainResult`: the trained model (unwrapped), the per-epoch history, the final
        evaluation and the training frames per second.
    """
    cfg = config.validate()
    rank, world, device, created_group = _dist_init(cfg)
    distributed = world > 1
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    try:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        if datasets is None:
            train_set, test_set, num_classes, frame_shape = build_datasets(cfg)
        else:
            train_set, test_set = datasets
            num_classes = _num_classes(train_set)
            frame_shape = tuple(train_set[0][0].shape[1:])
        if model is None:
            model = build_model(cfg, num_classes, frame_shape)
        model = model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model: no trainable parameters")
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        gamma = (cfg.lr_final / cfg.lr) ** (1.0 / (cfg.epochs - 1)) if cfg.epochs > 1 else 1.0
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)

        history: list[dict] = []
        start_epoch = 0
        if cfg.resume and ckpt_path.exists():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            _check_resumable(ckpt["config"], cfg)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            history = list(ckpt["history"])
            start_epoch = int(ckpt["epoch"])
            _set_rng_state(ckpt["rng"])
        elif cfg.resume and not cfg.quiet and rank == 0:
            print(f"resume: no checkpoint at {ckpt_path}; starting from scratch", file=sys.stderr)

        net: nn.Module = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        test_loader = eval_loader(test_set, max(cfg.batch_size, 8), cfg.num_workers)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        show = not cfg.quiet and rank == 0
        bars = show and sys.stderr.isatty()

        for epoch in range(start_epoch, cfg.epochs):
            train_loader = _train_loader(train_set, cfg, epoch, distributed)
            entry = _train_epoch(net, train_loader, optimizer, cfg, epoch, device, distributed, bars)
            entry["lr"] = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if rank == 0:
                entry.update({f"test_{k}": v for k, v in evaluate(model, test_loader, loss=cfg.loss,
                                                                   device=device).items()})
                history.append(entry)
                _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "rng": _rng_state(), "epoch": epoch + 1,
                              "history": history, "config": dataclasses.asdict(cfg)}, ckpt_path)
                _write_metrics(out, cfg, history)
                if show:
                    print(_format_entry(entry, cfg.epochs), file=sys.stderr, flush=True)
            else:
                history.append(entry)
            if distributed:
                import torch.distributed as dist

                dist.barrier()
            if on_epoch_end is not None:
                on_epoch_end(epoch, entry)

        final = {k[len("test_"):]: v for k, v in history[-1].items() if k.startswith("test_")} if history else {}
        fps = _overall_fps(history)
        if rank == 0:
            _write_metrics(out, cfg, history, final=final)
            if cfg.plot:
                plot_history(history, out / "curves.png", title=f"{cfg.pooling} ({cfg.loss})")
        return TrainResult(model=model, history=history, final=final, frames_per_second=fps, out=out)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train_epoch(net, loader, optimizer, cfg, epoch, device, distributed, bars) -> dict:
    net.train()
    loss_sum, correct, count, frames_done, step_time = 0.0, 0.0, 0, 0, 0.0
    single_label = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for batch, (frames, lengths, labels) in enumerate(
        _progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not bars)
    ):
        start = time.perf_counter()
        frames, lengths, labels = frames.to(device), lengths.to(device), labels.to(device)
        logits = net(frames, lengths)
        loss = video_loss(logits, labels, cfg.loss)
        check_finite(loss, epoch=epoch, batch=batch, distributed=distributed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
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
    totals = torch.tensor([loss_sum, correct, count, frames_done], dtype=torch.float64)
    wall = torch.tensor([step_time], dtype=torch.float64)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(totals)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    loss_sum, correct, count, frames_done = totals.tolist()
    entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1)}
    if single_label:
        entry["train_accuracy"] = correct / max(count, 1)
    entry.update({"train_frames": int(frames_done), "train_step_seconds": float(wall.item()),
                  "frames_per_second": frames_done / float(wall.item()) if wall.item() > 0 else None})
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


def _write_metrics(out: Path, cfg: TrainConfig, history: list[dict], final: dict | None = None) -> None:
    _atomic_json({"config": dataclasses.asdict(cfg), "history": history, "final": final,
                  "frames_per_second": _overall_fps(history)}, out / "metrics.json")


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
    epochs = [e["epoch"] for e in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "test_loss"):
        if key in history[0]:
            axes[0].plot(epochs, [e[key] for e in history], marker="o", label=key.replace("_", " "))
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    for key in ("train_accuracy", "test_accuracy", "test_map"):
        if key in history[0]:
            axes[1].plot(epochs, [e[key] for e in history], marker="o", label=key.replace("_", " "))
    axes[1].set_xlabel("epoch")
    axes[1].set_ylim(0, 1.02)
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)

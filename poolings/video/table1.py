"""The nine methods of Table 1 of Fernando & Gould (ICML 2016), run on one data set.

============  =================  ============================================================
 #            key                what is trained / pooled
============  =================  ============================================================
 1            ``avg+svm``        frozen pretrained CNN features, average-pooled, linear SVM
 2            ``max+svm``        the same, max-pooled
 3            ``rank+svm``       the same, rank-pooled
 4            ``frame-ft``       CNN fine-tuned per frame on the video label; a video's
                                 prediction is the mean of its frames' class probabilities
 5            ``frame-ft+rank``  features of the frame-fine-tuned CNN, rank-pooled, linear SVM
 6            ``avg-e2e``        CNN + average pooling + classifier trained end to end
 7            ``max-e2e``        the same with max pooling
 8            ``rank-e2e-diag``  the same with rank pooling, the paper's diagonal gradient
 9            ``rank-e2e-full``  the same with rank pooling, the exact gradient
============  =================  ============================================================

Every CNN starts from the same "pretrained" backbone: on the embedded MovingDigits data the
small CNN is first trained per frame to recognise the digit in the frame (the stand-in for
ImageNet pretraining); a torchvision backbone with ``weights=`` uses those weights; otherwise the
backbone starts from one random initialisation shared by all methods.

:func:`run_table1` writes ``DIR/results.json`` (one object per method: ``method``,
``accuracy`` or ``map``, ``frames_per_second`` — training frames per second, ``null`` where
nothing is trained — and more), ``DIR/results.md``, ``DIR/results.png`` and ``DIR/run.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .models import VideoClassifier, average_frame_scores, build_pooling
from .train import (
    TrainConfig,
    _atomic_json,
    _metrics,
    build_datasets,
    build_model,
    eval_loader,
    predict,
    resolve_device,
    train,
)
from poolings.runtime import prepare_run_folder, set_threads

__all__ = ["METHODS", "PAPER_UCF_SPORTS", "TABLE1_OUTPUTS", "Table1Config", "run_table1", "demo_config",
           "format_table"]

METHODS = (
    "avg+svm",
    "max+svm",
    "rank+svm",
    "frame-ft",
    "frame-ft+rank",
    "avg-e2e",
    "max-e2e",
    "rank-e2e-diag",
    "rank-e2e-full",
)

# What the design notes record of the paper's Table 1 on UCF-sports (accuracy, %), and the
# training speeds it reports on a Titan-X GPU. Per-row numbers for rows 1-7 are not recorded
# there: only their range.
PAPER_UCF_SPORTS = {
    "baselines_range": (66.0, 73.0),       # rows 1-7
    "rank-e2e-diag": 87.0,
    "rank-e2e-full": 87.0,
    "frames_per_second": {"rank-e2e-diag": 50.0, "rank-e2e-full": 5.0},
}

_E2E_POOLING = {"avg-e2e": "avg", "max-e2e": "max", "rank-e2e-diag": "rank-diag", "rank-e2e-full": "rank-full"}

#: What a Table 1 run writes into its folder (``base.overwrite`` removes exactly these).
TABLE1_OUTPUTS = ("results.json", "results.md", "results.png", "run.json", "backbone_init.pt", "pretrain",
                  "frame-ft", *_E2E_POOLING)


@dataclass
class Table1Config:
    """Settings of the Table 1 protocol.

    ``base`` describes the data, the backbone, the rank-pool options and the end-to-end training
    (methods 6-9); its ``pooling``, ``out`` and ``resume`` fields are set per method.
    """

    base: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/table1"
    methods: tuple[str, ...] = METHODS
    pretrain_epochs: int = 2          # per-frame digit-identity pretraining of the small CNN
    pretrain_lr: float = 0.05
    frame_epochs: int = 2             # method 4: per-frame fine-tuning on the video label
    frame_lr: float = 0.01
    frame_batch_size: int = 64
    svm_C: float = 1.0                # LinearSVC's C (methods 1, 2, 3, 5)
    quiet: bool = False

    def validate(self) -> "Table1Config":
        self.base.validate()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: expected a non-empty subset of {list(METHODS)}, got {list(self.methods)}")
        for name in ("pretrain_epochs", "frame_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.frame_batch_size < 1:
            raise ValueError(f"frame_batch_size: must be >= 1, got {self.frame_batch_size}")
        for name in ("pretrain_lr", "frame_lr", "svm_C"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        return self


def demo_config(out: str = "runs/demo", *, device: str = "auto", quiet: bool = False, seed: int = 0,
                quick: bool = False, threads: int | None = None, overwrite: bool = False) -> Table1Config:
    """The quick Table 1 run on the embedded MovingDigits data (about 1-4 minutes on a 2-core CPU).

    Six motion classes in three time-reversal pairs (right/left, down/up, grow/shrink), 288
    training and 192 test videos of 8-16 frames of 32x32 pixels; a small CNN (p = 32) pretrained
    for 3 epochs per frame on digit identity; 6 end-to-end epochs of SGD, batches of 8 videos,
    learning rate 0.01 -> 0.001, gradient norm clipped at 1, LayerNorm before the classifier
    (the same for every end-to-end method); rank pooling with C = 1, eps = 0.1.

    ``quick``: the smallest run that goes through every method (4 classes, 24 + 12 videos of
    4-6 frames of 16x16, one epoch each), a smoke test of a few seconds; its figures mean nothing.
    """
    sizes = dict(num_videos=288, num_test_videos=192, num_classes=6, min_len=8, max_len=16, frame_size=32,
                 feature_dim=32, epochs=6)
    if quick:
        sizes = dict(num_videos=24, num_test_videos=12, num_classes=4, min_len=4, max_len=6, frame_size=16,
                     feature_dim=8, epochs=1)
    base = TrainConfig(
        data="moving-digits", backbone="smallcnn", **sizes,
        C=1.0, eps=0.1, head_norm="layernorm",
        batch_size=8, lr=0.01, lr_final=0.001, grad_clip=1.0, loss="ce", seed=seed, device=device,
        quiet=quiet, threads=threads, overwrite=overwrite,
    )
    epochs = dict(pretrain_epochs=1, frame_epochs=1) if quick else dict(pretrain_epochs=3, frame_epochs=2)
    return Table1Config(base=base, out=out, quiet=quiet, **epochs)


# --------------------------------------------------------------------------- data helpers


class _InMemory(torch.utils.data.Dataset):
    """The readable items of a data set, read once; keeps ``num_classes``, ``classes``,
    ``reversal_pairs``; ``skipped`` lists the unreadable items left out."""

    def __init__(self, dataset):
        from .data import read_items

        _, self.items, self.skipped = read_items(dataset)
        base = getattr(dataset, "dataset", dataset)
        for name in ("num_classes", "classes", "reversal_pairs"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))
        if not hasattr(self, "num_classes") and hasattr(self, "classes"):
            self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _FramesAsVideos(torch.utils.data.Dataset):
    """Single frames ``(N, *frame_shape)`` with labels ``(N,)`` seen as videos of length 1."""

    def __init__(self, frames: Tensor, labels: Tensor, num_classes: int):
        if len(frames) != len(labels):
            raise ValueError(f"frames ({len(frames)}) and labels ({len(labels)}) differ in length")
        self.frames, self.labels, self.num_classes = frames, labels, num_classes

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i):
        return self.frames[i][None], self.labels[i]


def _frames_with_video_labels(videos) -> tuple[Tensor, Tensor]:
    """All frames of all videos ``(N, *frame_shape)`` and each frame's video label ``(N, ...)``."""
    frames = torch.cat([f for f, _ in videos.items])
    labels = torch.cat([torch.as_tensor(y).expand(len(f), *torch.as_tensor(y).shape) for f, y in videos.items])
    return frames, labels


def _digit_frames(raw_videos):
    """Per-frame digit labels of MovingDigits, or ``None`` when the data set has none."""
    from . import data as vdata

    view_cls = getattr(vdata, "FrameDigits", None)
    if view_cls is None:
        return None
    try:
        view = view_cls(raw_videos)
    except (TypeError, ValueError, AttributeError):
        return None
    xs, ys = zip(*(view[i] for i in range(len(view))))
    num_classes = int(getattr(view, "num_classes", 10))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long), num_classes


def _frozen_features(backbone: nn.Module, videos, device) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen per-frame features of every video: ``(N, Tmax, p)`` zero-padded, lengths, labels."""
    from .data import collate_videos, extract_features

    feats = extract_features(backbone.to(device), videos, batch_size=32, device=device)
    return collate_videos([feats[i] for i in range(len(feats))])


@torch.no_grad()
def _pool(pooling: nn.Module, V: Tensor, lengths: Tensor, batch_size: int = 64) -> np.ndarray:
    out = [pooling(V[i:i + batch_size], lengths[i:i + batch_size]) for i in range(0, len(V), batch_size)]
    pooled = torch.cat(out)
    if not torch.isfinite(pooled).all():
        raise FloatingPointError(f"{type(pooling).__name__} returned non-finite pooled features")
    return pooled.double().numpy()


def _svm_scores(X_train: np.ndarray, y_train: Tensor, X_test: np.ndarray, num_classes: int, C: float,
                seed: int) -> Tensor:
    """Standardise, fit one-vs-rest linear SVMs, return test decision values ``(n_test, K)``."""
    try:
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the SVM methods need scikit-learn: pip install scikit-learn") from exc
    y = y_train.numpy()                                 # (n,) class indices or (n, K) 0/1
    svm = LinearSVC(C=C, max_iter=20000, random_state=seed)
    clf = make_pipeline(StandardScaler(), OneVsRestClassifier(svm)).fit(X_train, y)
    classes = clf.classes_ if y.ndim == 1 else np.arange(num_classes)
    scores = np.full((len(X_test), num_classes), -1e9)  # classes absent from training never win
    dec = clf.decision_function(X_test)
    if dec.ndim == 1:                                   # two classes: one decision value
        dec = np.stack([-dec, dec], 1)
    scores[:, classes] = dec
    return torch.from_numpy(scores)


def _reversal_confusion(pred: Tensor, labels: Tensor, pairs) -> float | None:
    """Fraction of test videos of a paired class predicted as its time reversal."""
    if not pairs or labels.dim() != 1:
        return None
    partner = {}
    for a, b in pairs:
        partner[int(a)], partner[int(b)] = int(b), int(a)
    keep = [i for i, y in enumerate(labels.tolist()) if y in partner]
    if not keep:
        return None
    return float(np.mean([pred[i].item() == partner[labels[i].item()] for i in keep]))


def _summary(method: str, scores: Tensor, labels: Tensor, loss: str, fps, seconds: float, pairs, **extra) -> dict:
    metrics = _metrics(scores.float(), labels, loss)
    row = {"method": method, **metrics, "frames_per_second": fps, "seconds": round(seconds, 2),
           "reversal_confusion": _reversal_confusion(scores.argmax(1), labels, pairs)}
    row.update(extra)
    return row


def _say(cfg: Table1Config, text: str) -> None:
    if not cfg.quiet:
        print(text, file=sys.stderr, flush=True)


def run_table1(cfg: Table1Config) -> list[dict]:
    """Run the protocol; returns the rows written to ``results.json`` (see the module docstring)."""
    cfg.validate()
    set_threads(cfg.base.threads)
    out = prepare_run_folder(cfg.out, TABLE1_OUTPUTS, overwrite=cfg.base.overwrite)
    base = dataclasses.replace(cfg.base, resume=False, overwrite=False, quiet=cfg.quiet or cfg.base.quiet)
    started = time.perf_counter()
    torch.manual_seed(base.seed)

    from .data import describe, format_summary

    train_raw, test_raw, num_classes, frame_shape = build_datasets(base)
    data_info = {"train": describe(train_raw), "test": describe(test_raw)}
    for line in format_summary(data_info, frame_shape=frame_shape, source=base.data):
        _say(cfg, line)
    train_set, test_set = _InMemory(train_raw), _InMemory(test_raw)
    unreadable = [{"path": p, "reason": r, "found": "scan"}
                  for p, r in {**data_info["train"]["unreadable"], **data_info["test"]["unreadable"]}.items()]
    unreadable += [{"path": s.path, "reason": s.reason, "found": "first read"}
                   for s in train_set.skipped + test_set.skipped]
    if train_set.skipped or test_set.skipped:
        _say(cfg, f"[table1] {len(train_set.skipped) + len(test_set.skipped)} unreadable files left out at their "
                  "first read: " + "; ".join(f"{s.path} ({s.reason})" for s in train_set.skipped + test_set.skipped))
    pairs = getattr(train_set, "reversal_pairs", None)
    device = resolve_device(base.device)
    features_only = len(frame_shape) == 1
    info: dict = {"num_classes": num_classes, "train_videos": len(train_set), "test_videos": len(test_set),
                  "frame_shape": list(frame_shape), "device": str(device),
                  "data": {"skipped": len(unreadable), "unreadable": unreadable}}

    # -- the shared starting CNN ------------------------------------------------------------
    reference = build_model(dataclasses.replace(base, pooling="avg", head_norm="none", dropout=0.0),
                            num_classes, frame_shape)
    digits = None if features_only or base.backbone != "smallcnn" or cfg.pretrain_epochs == 0 \
        else _digit_frames(train_raw)
    if digits is not None:
        frames, ys, n_digits = digits
        test_digits = _digit_frames(test_raw)
        pre_cfg = dataclasses.replace(base, pooling="avg", head_norm="none", dropout=0.0, epochs=cfg.pretrain_epochs,
                                      lr=cfg.pretrain_lr, lr_final=cfg.pretrain_lr / 10, batch_size=cfg.frame_batch_size,
                                      loss="ce", out=str(out / "pretrain"), backbone_init=None)
        _say(cfg, f"[table1] pretraining the CNN per frame on digit identity ({len(frames)} frames)")
        pre = train(pre_cfg, datasets=(_FramesAsVideos(frames, ys, n_digits),
                                       _FramesAsVideos(*test_digits[:2], n_digits)), summary=False)
        reference.backbone.load_state_dict(pre.model.backbone.state_dict())
        info["pretraining"] = {"kind": "per-frame digit identity", "epochs": cfg.pretrain_epochs,
                               "test_accuracy": pre.final.get("accuracy")}
    elif base.weights:
        info["pretraining"] = {"kind": f"torchvision weights {base.weights}"}
    else:
        info["pretraining"] = {"kind": "none (random initialisation shared by all methods)"}
    init_path = out / "backbone_init.pt"
    torch.save(reference.backbone.state_dict(), init_path)
    e2e_base = dataclasses.replace(base, backbone_init=None if features_only else str(init_path), weights=None)

    rank_options = dict(C=base.C, eps=base.eps, smoothing=base.smoothing, signed_sqrt=base.signed_sqrt,
                        normalize=base.normalize, bidirectional=base.bidirectional)
    rows: dict[str, dict] = {}
    feats: dict[str, tuple] = {}

    def features(model, key):
        if key not in feats:
            model = model.to(device)
            feats[key] = (_frozen_features(model.backbone, train_set, device),
                          _frozen_features(model.backbone, test_set, device))
        return feats[key]

    # -- 1-3: frozen features + SVM ------------------------------------------------------------
    for method, pool_name in (("avg+svm", "avg"), ("max+svm", "max"), ("rank+svm", "rank")):
        if method not in cfg.methods:
            continue
        t0 = time.perf_counter()
        (Vtr, Ltr, ytr), (Vte, Lte, yte) = features(reference, "pretrained")
        pooling = build_pooling(pool_name, **rank_options)
        scores = _svm_scores(_pool(pooling, Vtr, Ltr), ytr, _pool(pooling, Vte, Lte), num_classes, cfg.svm_C,
                             base.seed)
        rows[method] = _summary(method, scores, yte, base.loss, None, time.perf_counter() - t0, pairs)
        _say(cfg, f"[table1] {method}: {_score_text(rows[method])}")

    # -- 4-5: frame-level fine-tuning --------------------------------------------------------
    if "frame-ft+rank" in cfg.methods and features_only:
        rows["frame-ft+rank"] = {"method": "frame-ft+rank", "accuracy": None, "frames_per_second": None,
                                 "skipped": "feature data: no CNN to fine-tune (it would equal rank+svm)"}
    if "frame-ft" in cfg.methods or ("frame-ft+rank" in cfg.methods and "frame-ft+rank" not in rows):
        t0 = time.perf_counter()
        frames, ys = _frames_with_video_labels(train_set)
        test_frames, test_ys = _frames_with_video_labels(test_set)
        ft_cfg = dataclasses.replace(e2e_base, pooling="avg", head_norm="none", dropout=0.0, epochs=cfg.frame_epochs,
                                     lr=cfg.frame_lr, lr_final=cfg.frame_lr / 10, batch_size=cfg.frame_batch_size,
                                     out=str(out / "frame-ft"))
        _say(cfg, f"[table1] frame-ft: fine-tuning per frame on the video label ({len(frames)} frames)")
        frame_model, ft_fps = copy.deepcopy(reference), None
        if cfg.frame_epochs > 0:
            ft = train(ft_cfg, datasets=(_FramesAsVideos(frames, ys, num_classes),
                                         _FramesAsVideos(test_frames, test_ys, num_classes)), summary=False)
            frame_model, ft_fps = ft.model, ft.frames_per_second
        ft_seconds = time.perf_counter() - t0
        if "frame-ft" in cfg.methods:
            scores, labels = _frame_predictions(frame_model, test_set, device, probabilities=base.loss == "ce")
            rows["frame-ft"] = _summary("frame-ft", scores, labels, base.loss, ft_fps, ft_seconds, pairs)
            _say(cfg, f"[table1] frame-ft: {_score_text(rows['frame-ft'])}")
        if "frame-ft+rank" in cfg.methods and "frame-ft+rank" not in rows:
            t0 = time.perf_counter()
            (Vtr, Ltr, ytr), (Vte, Lte, yte) = features(frame_model, "frame-ft")
            pooling = build_pooling("rank", **rank_options)
            scores = _svm_scores(_pool(pooling, Vtr, Ltr), ytr, _pool(pooling, Vte, Lte), num_classes,
                                 cfg.svm_C, base.seed)
            rows["frame-ft+rank"] = _summary("frame-ft+rank", scores, yte, base.loss, None,
                                             time.perf_counter() - t0, pairs)
            _say(cfg, f"[table1] frame-ft+rank: {_score_text(rows['frame-ft+rank'])}")

    # -- 6-9: end to end -------------------------------------------------------------------------
    for method, pool_name in _E2E_POOLING.items():
        if method not in cfg.methods:
            continue
        t0 = time.perf_counter()
        run_cfg = dataclasses.replace(e2e_base, pooling=pool_name, out=str(out / method))
        _say(cfg, f"[table1] {method}: training end to end ({run_cfg.epochs} epochs)")
        result = train(run_cfg, datasets=(train_set, test_set), summary=False)
        scores, labels = _video_predictions(result.model, test_set, device)
        rows[method] = _summary(method, scores, labels, base.loss, result.frames_per_second,
                                time.perf_counter() - t0, pairs)
        _say(cfg, f"[table1] {method}: {_score_text(rows[method])}")

    ordered = [rows[m] for m in METHODS if m in rows]
    for row in ordered:
        row["paper_ucf_sports"] = _paper_value(row["method"])
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["config"] = _config_dict(cfg)
    _atomic_json(ordered, out / "results.json")
    _atomic_json(info, out / "run.json")
    table = format_table(ordered, base.loss)
    (out / "results.md").write_text(table + "\n")
    _plot(ordered, out / "results.png", base.loss, num_classes)
    if not cfg.quiet:
        print(table)
        print(f"\nwrote {out / 'results.json'}, results.md, results.png ({info['seconds']} s in all)")
    return ordered


def _video_predictions(model: VideoClassifier, videos, device) -> tuple[Tensor, Tensor]:
    return predict(model, eval_loader(videos, 32), device=device)


def _frame_predictions(model: VideoClassifier, videos, device, *, probabilities: bool) -> tuple[Tensor, Tensor]:
    def score(m, frames, lengths):
        return average_frame_scores(m, frames, lengths, probabilities=probabilities)

    return predict(model, eval_loader(videos, 32), device=device, score=score)


def summary_line(rows: list[dict]) -> str:
    """One sentence comparing end-to-end rank pooling with end-to-end average and max pooling."""
    acc = {r["method"]: r.get("accuracy") for r in rows}
    rank = [m for m in ("rank-e2e-full", "rank-e2e-diag") if acc.get(m) is not None]
    other = [m for m in ("avg-e2e", "max-e2e") if acc.get(m) is not None]
    if not rank or not other:
        return "end-to-end comparison: not all of rank-e2e-* and avg/max-e2e were run"
    best_rank = max(rank, key=lambda m: acc[m])
    best_other = max(other, key=lambda m: acc[m])
    gap = 100 * (acc[best_rank] - acc[best_other])
    verdict = "beats" if gap > 0 else "does not beat"
    return (f"end to end: {best_rank} {100 * acc[best_rank]:.1f} % {verdict} the best order-blind pooling "
            f"({best_other} {100 * acc[best_other]:.1f} %) by {gap:+.1f} points")


def _paper_value(method: str) -> str:
    if method in ("rank-e2e-diag", "rank-e2e-full"):
        return f"{PAPER_UCF_SPORTS[method]:.0f}"
    lo, hi = PAPER_UCF_SPORTS["baselines_range"]
    return f"{lo:.0f}-{hi:.0f} (range of rows 1-7)"


def _score_text(row: dict) -> str:
    parts = []
    if row.get("accuracy") is not None:
        parts.append(f"accuracy {100 * row['accuracy']:.1f} %")
    if row.get("map") is not None:
        parts.append(f"mAP {100 * row['map']:.1f} %")
    if row.get("frames_per_second"):
        parts.append(f"{row['frames_per_second']:.0f} training frames/s")
    if row.get("skipped"):
        parts.append(f"skipped: {row['skipped']}")
    return ", ".join(parts)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def format_table(rows: list[dict], loss: str = "ce") -> str:
    """A markdown table of the results beside the paper's UCF-sports numbers."""
    metric = "map" if loss != "ce" else "accuracy"
    head = ("| # | method | " + ("mAP %" if metric == "map" else "accuracy %")
            + " | reversal confusion % | training frames/s | paper UCF-sports acc. % | paper frames/s |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        number = METHODS.index(row["method"]) + 1
        fps = row.get("frames_per_second")
        paper_fps = PAPER_UCF_SPORTS["frames_per_second"].get(row["method"])
        lines.append(f"| {number} | {row['method']} | {_pct(row.get(metric))} | {_pct(row.get('reversal_confusion'))} "
                     f"| {'–' if not fps else f'{fps:.0f}'} | {row.get('paper_ucf_sports', _paper_value(row['method']))} "
                     f"| {'–' if paper_fps is None else f'{paper_fps:.0f} (Titan-X)'} |")
    lines.append("")
    lines.append("Paper column: the design notes record only the range of rows 1-7 (66-73 %) and 87 % for "
                 "end-to-end rank pooling (diagonal and full gradient alike); the per-row values of rows 1-7 "
                 "are not reproduced here. Reversal confusion: share of test videos of a class that has a "
                 "time-reversed partner class predicted as that partner.")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, loss: str, num_classes: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib is not installed: results.png not written", file=sys.stderr)
        return
    metric = "map" if loss != "ce" else "accuracy"
    names = [r["method"] for r in rows]
    values = [100 * (r.get(metric) or 0.0) for r in rows]
    groups = {"frozen features + linear SVM": "#4c72b0", "frame-level fine-tuning": "#dd8452",
              "end to end": "#55a868"}
    group = ["frozen features + linear SVM" if "svm" in n or n == "frame-ft+rank" else
             "frame-level fine-tuning" if n == "frame-ft" else "end to end" for n in names]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(range(len(rows)), values, color=[groups[g] for g in group])
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=8)
    lo, hi = PAPER_UCF_SPORTS["baselines_range"]
    ax.axhspan(lo, hi, color="grey", alpha=0.15, label="paper UCF-sports, rows 1-7")
    ax.axhline(PAPER_UCF_SPORTS["rank-e2e-full"], color="grey", ls="--", lw=1, label="paper, end-to-end rank pool")
    if metric == "accuracy":
        ax.axhline(100.0 / num_classes, color="black", ls=":", lw=1, label=f"chance (1/{num_classes})")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("mAP %" if metric == "map" else "test accuracy %")
    ax.set_ylim(0, 105)
    from matplotlib.patches import Patch

    handles = [Patch(color=groups[g], label=g) for g in dict.fromkeys(group)]  # the colour groups present
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _config_dict(cfg: Table1Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["methods"] = list(cfg.methods)
    return json.loads(json.dumps(d, default=str))

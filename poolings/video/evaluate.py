"""``argminlayers eval``: a trained checkpoint on a data set.

:func:`evaluate_checkpoint` rebuilds the model from the configuration saved in a
``checkpoint.pt`` or ``best.pt`` of :func:`~poolings.video.train.train` (also those in the
method folders of ``table1`` / ``demo``), loads its weights and scores one split of the data the
run was trained on, or of ``data``. It writes into ``out``:

- ``eval.json``: ``loss``, ``accuracy``, ``top5_accuracy`` (single-label data with more than 5
  classes), ``map`` (hinge losses and multi-label data: mean over classes of the average
  precision), ``per_class_ap`` (multi-label), the number of items, the unreadable files left
  out, and the checkpoint's epoch and configuration;
- ``confusion.json`` and ``confusion.png`` (single-label data): ``matrix[i][j]`` counts the
  items of true class ``i`` predicted as class ``j``; rows are also given normalised.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poolings.runtime import load_checkpoint, prepare_run_folder, resolve_device

__all__ = ["EVAL_OUTPUTS", "evaluate_checkpoint", "confusion_matrix", "top_k_accuracy", "plot_confusion"]

EVAL_OUTPUTS = ("eval.json", "confusion.json", "confusion.png")


def top_k_accuracy(scores: Tensor, labels: Tensor, k: int) -> float:
    """Share of items whose true class is among the ``k`` highest scores. ``scores: (N, K)``, ``labels: (N,)``."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
    return float((top == labels[:, None]).any(1).double().mean())


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts: row = true class, column = predicted class (one ``bincount``)."""
    flat = labels.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, *, title: str = "") -> None:
    """The row-normalised confusion matrix as a PNG, with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    side = min(2.0 + 0.45 * k, 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(k), classes, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, label="share of the true class")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _config_from(saved: dict[str, Any], **overrides: Any):
    from .train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in names}
    values.update(overrides)
    return TrainConfig(**values).validate()


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    data: str | None = None,
    data_path: str | None = None,
    split: str = "test",
    out: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` ("test" or "train") of its data (or of ``data``); see the module docstring.

    Returns the content of ``eval.json`` plus ``summary``, a one-line report.
    """
    from .train import _metrics, build_datasets, build_model, eval_loader, predict, video_loss

    if split not in ("test", "train"):
        raise ValueError(f"split: expected 'test' or 'train', got {split!r}")
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint, hint="give a checkpoint.pt or best.pt written by argminlayers train")
    if "config" not in ckpt:
        raise ValueError(f"checkpoint: {checkpoint} has no saved configuration; it was not written by argminlayers train")
    out = Path(out) if out is not None else checkpoint.parent / f"eval-{split}"
    prepare_run_folder(out, EVAL_OUTPUTS, overwrite=overwrite, check_only=True)
    dev = resolve_device(device)
    overrides: dict[str, Any] = dict(device=str(dev), quiet=True, resume=False, overwrite=False, backbone_init=None,
                                     weights=None, num_workers=num_workers)
    if data is not None:
        overrides.update(data=data, data_path=data_path)
    cfg = _config_from(ckpt["config"], **overrides)

    import warnings

    from .data import UnreadableFileWarning, describe

    with warnings.catch_warnings():             # the unreadable files are listed in eval.json
        warnings.simplefilter("ignore", UnreadableFileWarning)
        train_set, test_set, num_classes, frame_shape = build_datasets(cfg)
    dataset = test_set if split == "test" else train_set
    model = build_model(cfg, num_classes, frame_shape)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint: the model in {checkpoint} does not fit this data ({num_classes} classes, "
                         f"items of shape {frame_shape}): {' '.join(str(exc).split())[:160]}") from exc
    model.to(dev)
    # files the probe left out of the data set (not items); an item that fails at its read is in loader.skipped
    scanned = describe(dataset)["unreadable"]
    loader = eval_loader(dataset, batch_size, num_workers)
    scores, labels = predict(model, loader, device=dev, amp=cfg.amp, split=split)

    base = getattr(dataset, "dataset", dataset)
    classes = list(getattr(base, "classes", [str(k) for k in range(num_classes)]))
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "epoch": ckpt.get("epoch"), "split": split,
                              "items": len(labels), "loss": float(video_loss(scores, labels, cfg.loss))}
    report.update(_metrics(scores, labels, cfg.loss))
    multi_label = labels.dim() == 2
    if not multi_label and num_classes > 5:
        report["top5_accuracy"] = top_k_accuracy(scores, labels, 5)
    if multi_label:
        from sklearn.metrics import average_precision_score

        targets = labels.numpy()
        report["per_class_ap"] = {c: float(average_precision_score(targets[:, k], scores[:, k].numpy()))
                                  for k, c in enumerate(classes) if targets[:, k].any()}
    unreadable = [{"path": p, "reason": r, "found": "scan"} for p, r in scanned.items()]
    unreadable += [{"path": s.path, "reason": s.reason, "found": "first read"} for s in loader.skipped]
    report["data"] = {"kind": cfg.data, "path": cfg.data_path, "skipped": len(unreadable), "unreadable": unreadable}
    report["config"] = dataclasses.asdict(cfg)

    out = prepare_run_folder(out, EVAL_OUTPUTS, overwrite=overwrite)
    written = ["eval.json"]
    if not multi_label:
        matrix = confusion_matrix(scores.argmax(1), labels, num_classes)
        rows = matrix.sum(1, keepdims=True)
        normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
        (out / "confusion.json").write_text(json.dumps(
            {"classes": classes, "rows": "true class", "columns": "predicted class", "matrix": matrix.tolist(),
             "normalised": np.round(normalised, 6).tolist()}, indent=1) + "\n")
        plot_confusion(matrix, classes, out / "confusion.png",
                       title=f"{checkpoint.parent.name}/{checkpoint.name}, {split} split ({len(labels)} items)")
        written += ["confusion.json", "confusion.png"]
    (out / "eval.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    parts = [f"{name} {100 * report[key]:.1f} %" for key, name in
             (("accuracy", "accuracy"), ("top5_accuracy", "top-5"), ("map", "mAP")) if report.get(key) is not None]
    skipped = f" ({len(unreadable)} unreadable left out)" if unreadable else ""
    report["summary"] = (f"eval: {', '.join(parts)} on {len(labels)} {split} items{skipped}; "
                         f"wrote {', '.join(written)} in {out}")
    return report

"""The video subcommands of ``argminlayers``: ``train``, ``table1``, ``demo`` and ``eval``.

``train`` takes one flag per :class:`~poolings.video.train.TrainConfig` field (``--pooling``,
``--C``, ``--epochs``, ``--batch-size``, ...); ``table1`` takes the same data, model and
optimisation flags plus the protocol's own; ``demo`` runs the quick preset of ``table1`` on the
embedded data; ``eval`` evaluates a checkpoint. All accept ``--data embedded | folder PATH |
features PATH`` and ``--threads`` (default 1: see docs/video.md for the measurement behind it).

Data-parallel training: ``torchrun --nproc_per_node N -m poolings.cli train ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any

__all__ = ["register", "add_dataclass_arguments", "dataclass_from_args"]

_DATA_KINDS = {"embedded": "moving-digits", "moving-digits": "moving-digits", "folder": "folder",
               "features": "features"}


def _field_type(tp: Any) -> tuple[type, bool]:
    """``(base type, optional)`` of a dataclass field annotation."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (),
                            defaults: dict | None = None) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (``snake_case`` → ``--snake-case``).

    Booleans become ``--flag / --no-flag``; ``X | None`` fields take an ``X`` or default to ``None``.
    The help text is the field's ``metadata["help"]``.
    """
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        tp, optional = _field_type(hints[f.name])
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=default,
                                help=f"{help_text} (default: {default})", metavar=f.name.upper())


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """An instance of ``cls`` from the parsed flags that match its fields, then ``overrides``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def _add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", default=["embedded"], metavar=("KIND", "PATH"),
                        help="'embedded' (generated MovingDigits, the default), 'folder PATH' (one sub-folder "
                             "per class, or train/ and test/ holding them) or 'features PATH' (feature files)")


#: The default of --threads: one torch thread (measured in docs/video.md, "Threads").
DEFAULT_THREADS = 1


def _add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                        help=f"torch intra-op CPU threads (default: {DEFAULT_THREADS}). Small convolutions gain "
                             "little from more threads and slow down sharply when the cores are shared; raise it "
                             "on a machine of your own")


def _parse_data(values: list[str]) -> tuple[str, str | None]:
    kind = values[0]
    if kind not in _DATA_KINDS:
        raise ValueError(f"--data: unknown kind {kind!r}; expected embedded, folder PATH or features PATH")
    kind = _DATA_KINDS[kind]
    if kind == "moving-digits":
        if len(values) != 1:
            raise ValueError("--data embedded takes no path")
        return kind, None
    if len(values) != 2:
        raise ValueError(f"--data {values[0]} needs exactly one PATH")
    return kind, values[1]


# --------------------------------------------------------------------------- train


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    data, data_path = _parse_data(args.data)
    cfg = dataclass_from_args(TrainConfig, args, data=data, data_path=data_path).validate()
    result = train(cfg)
    if not cfg.quiet and int(os.environ.get("RANK", "0")) == 0:   # under torchrun, rank 0 reports
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final.items() if isinstance(v, float))
        fps = f", {result.frames_per_second:.0f} training frames/s" if result.frames_per_second else ""
        skipped = f"; {len(result.unreadable)} unreadable files left out (listed in metrics.json)" \
            if result.unreadable else ""
        files = "checkpoint.pt, best.pt, metrics.json, log.csv" + (", curves.png" if cfg.plot else "")
        print(f"final: {metrics}{fps}; wrote {files} in {result.out}{skipped}")
    return 0


# --------------------------------------------------------------------------- table1 and demo

_TABLE1_EXCLUDE = ("pooling", "backward", "resume", "out", "data", "data_path", "plot", "tensorboard")


def _cmd_table1(args: argparse.Namespace) -> int:
    from .table1 import METHODS, Table1Config, format_table, run_table1
    from .train import TrainConfig

    data, data_path = _parse_data(args.data)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else METHODS
    base = dataclass_from_args(TrainConfig, args, data=data, data_path=data_path, out=args.out)
    cfg = Table1Config(base=base, out=args.out, methods=methods, pretrain_epochs=args.pretrain_epochs,
                       pretrain_lr=args.pretrain_lr, frame_epochs=args.frame_epochs, frame_lr=args.frame_lr,
                       frame_batch_size=args.frame_batch_size, svm_C=args.svm_C, quiet=args.quiet).validate()
    rows = run_table1(cfg)
    if cfg.quiet:                                     # run_table1 printed nothing
        print(format_table(rows, cfg.base.loss))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from poolings.runtime import resolve_device

    from .table1 import demo_config, format_table, run_table1, summary_line

    resolve_device(args.device)                       # a bad device fails before any work
    cfg = demo_config(args.out, device=args.device, quiet=args.quiet, seed=args.seed, quick=args.quick,
                      threads=args.threads, overwrite=args.overwrite)
    rows = run_table1(cfg)
    if args.quiet:                                    # run_table1 printed nothing
        print(format_table(rows, cfg.base.loss))
    print(summary_line(rows))
    return 0


# --------------------------------------------------------------------------- eval


def _cmd_eval(args: argparse.Namespace) -> int:
    from poolings.runtime import set_threads

    from .evaluate import evaluate_checkpoint

    set_threads(args.threads)
    data, data_path = _parse_data(args.data) if args.data else (None, None)
    report = evaluate_checkpoint(args.checkpoint, data=data, data_path=data_path, split=args.split, out=args.out,
                                 device=args.device, batch_size=args.batch_size, num_workers=args.num_workers,
                                 overwrite=args.overwrite)
    print(report["summary"])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``table1``, ``demo`` and ``eval`` subcommands."""
    from .table1 import METHODS, Table1Config
    from .train import TrainConfig

    p = subparsers.add_parser(
        "train", help="train one video classifier (backbone + pooling + linear) end to end",
        description="Train one configuration; writes OUT/checkpoint.pt, best.pt, metrics.json, log.csv and "
                    "curves.png. Under torchrun it runs data-parallel (DDP).",
    )
    _add_data_argument(p)
    add_dataclass_arguments(p, TrainConfig, exclude=("data", "data_path"), defaults={"threads": DEFAULT_THREADS})
    p.set_defaults(func=_cmd_train)

    t1 = Table1Config()
    p = subparsers.add_parser(
        "table1", help="run the nine methods of the paper's Table 1 on one data set",
        description="Runs avg/max/rank + SVM, frame-level fine-tuning (+ rank), and avg/max/rank (diagonal and "
                    "full gradient) end to end. Writes OUT/results.json, results.md, results.png.",
    )
    _add_data_argument(p)
    p.add_argument("--out", default="runs/table1", help="output directory (default: runs/table1)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all nine)")
    p.add_argument("--pretrain-epochs", type=int, default=t1.pretrain_epochs,
                   help="epochs of per-frame digit-identity pretraining of the small CNN (embedded data)")
    p.add_argument("--pretrain-lr", type=float, default=t1.pretrain_lr, help="its learning rate")
    p.add_argument("--frame-epochs", type=int, default=t1.frame_epochs, help="epochs of frame-level fine-tuning")
    p.add_argument("--frame-lr", type=float, default=t1.frame_lr, help="its learning rate")
    p.add_argument("--frame-batch-size", type=int, default=t1.frame_batch_size,
                   help="frames per batch for pretraining and frame-level fine-tuning")
    p.add_argument("--svm-C", dest="svm_C", type=float, default=t1.svm_C, help="LinearSVC's C")
    add_dataclass_arguments(p, TrainConfig, exclude=_TABLE1_EXCLUDE, defaults={"threads": DEFAULT_THREADS})
    p.set_defaults(func=_cmd_table1)

    p = subparsers.add_parser(
        "demo", help="a quick Table 1 on the embedded moving-digits data (a few minutes on a CPU)",
        description="Table 1 at a small size on generated videos whose class is a direction of motion; "
                    "average and max pooling cannot tell a class from its time reversal, rank pooling can.",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quick", action="store_true", help="the smallest run through every method (seconds; a smoke "
                                                         "test, its figures mean nothing)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in OUT")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    _add_threads_argument(p)
    p.set_defaults(func=_cmd_demo)

    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: accuracy, top-5, mAP, confusion matrix",
        description="Evaluate OUT/checkpoint.pt or OUT/best.pt of `train` (or of a table1/demo method folder) on a "
                    "data set; writes eval.json, confusion.json and confusion.png.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt or best.pt written by train")
    p.add_argument("--data", nargs="+", default=None, metavar=("KIND", "PATH"),
                   help="the data to evaluate on (default: the data the run was trained on): embedded, "
                        "folder PATH or features PATH")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split (default: test)")
    p.add_argument("--out", default=None, help="output folder (default: eval-SPLIT beside the checkpoint)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--batch-size", type=int, default=32, help="videos per batch (default: 32)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in OUT")
    _add_threads_argument(p)
    p.set_defaults(func=_cmd_eval)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m poolings.video.cli`
    parser = argparse.ArgumentParser(prog="python -m poolings.video.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The video subcommands of ``argminlayers``: ``train``, ``table1`` and ``demo``.

``train`` takes one flag per :class:`~poolings.video.train.TrainConfig` field (``--pooling``,
``--C``, ``--epochs``, ``--batch-size``, ...); ``table1`` takes the same data, model and
optimisation flags plus the protocol's own; ``demo`` runs the quick preset of ``table1`` on the
embedded data. All three accept ``--data embedded | folder PATH | features PATH``.

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


def _add_threads_argument(parser: argparse.ArgumentParser, default: int | None) -> None:
    parser.add_argument("--threads", type=int, default=default, metavar="N",
                        help="torch intra-op CPU threads (default: "
                             + ("torch's choice" if default is None else str(default)) + "). Small convolutions "
                             "gain little from more threads and slow down sharply when the cores are shared.")


def _set_threads(args: argparse.Namespace) -> None:
    n = getattr(args, "threads", None)
    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


def _parse_data(values: list[str]) -> tuple[str, str | None]:
    kind = values[0]
    if kind not in _DATA_KINDS:
        raise SystemExit(f"--data: unknown kind {kind!r}; expected embedded, folder PATH or features PATH")
    kind = _DATA_KINDS[kind]
    if kind == "moving-digits":
        if len(values) != 1:
            raise SystemExit("--data embedded takes no path")
        return kind, None
    if len(values) != 2:
        raise SystemExit(f"--data {values[0]} needs exactly one PATH")
    return kind, values[1]


# --------------------------------------------------------------------------- train


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    _set_threads(args)
    data, data_path = _parse_data(args.data)
    try:
        cfg = dataclass_from_args(TrainConfig, args, data=data, data_path=data_path).validate()
    except ValueError as exc:
        raise SystemExit(f"argminlayers train: {exc}") from exc
    try:
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:  # bad data or sizes found while building the run
        raise SystemExit(f"argminlayers train: {exc}") from exc
    if not cfg.quiet and int(os.environ.get("RANK", "0")) == 0:   # under torchrun, rank 0 reports
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final.items())
        fps = f", {result.frames_per_second:.0f} training frames/s" if result.frames_per_second else ""
        files = "metrics.json, checkpoint.pt" + (", curves.png" if cfg.plot else "")
        print(f"final: {metrics}{fps}; wrote {files} in {result.out}")
    return 0


# --------------------------------------------------------------------------- table1 and demo

_TABLE1_EXCLUDE = ("pooling", "backward", "resume", "out", "data", "data_path", "plot")


def _cmd_table1(args: argparse.Namespace) -> int:
    from .table1 import METHODS, Table1Config, format_table, run_table1
    from .train import TrainConfig

    _set_threads(args)
    data, data_path = _parse_data(args.data)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else METHODS
    try:
        base = dataclass_from_args(TrainConfig, args, data=data, data_path=data_path, out=args.out)
        cfg = Table1Config(base=base, out=args.out, methods=methods, pretrain_epochs=args.pretrain_epochs,
                           pretrain_lr=args.pretrain_lr, frame_epochs=args.frame_epochs, frame_lr=args.frame_lr,
                           frame_batch_size=args.frame_batch_size, svm_C=args.svm_C, quiet=args.quiet).validate()
    except ValueError as exc:
        raise SystemExit(f"argminlayers table1: {exc}") from exc
    rows = run_table1(cfg)
    if cfg.quiet:                                     # run_table1 printed nothing
        print(format_table(rows, cfg.base.loss))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .table1 import demo_config, format_table, run_table1, summary_line

    _set_threads(args)
    cfg = demo_config(args.out, device=args.device, quiet=args.quiet, seed=args.seed)
    rows = run_table1(cfg)
    if args.quiet:                                    # run_table1 printed nothing
        print(format_table(rows, cfg.base.loss))
    print(summary_line(rows))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``table1`` and ``demo`` subcommands."""
    from .table1 import METHODS, Table1Config
    from .train import TrainConfig

    p = subparsers.add_parser(
        "train", help="train one video classifier (backbone + pooling + linear) end to end",
        description="Train one configuration; writes OUT/checkpoint.pt, OUT/metrics.json and OUT/curves.png. "
                    "Under torchrun it runs data-parallel (DDP).",
    )
    _add_data_argument(p)
    add_dataclass_arguments(p, TrainConfig, exclude=("data", "data_path"))
    _add_threads_argument(p, None)
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
    add_dataclass_arguments(p, TrainConfig, exclude=_TABLE1_EXCLUDE)
    _add_threads_argument(p, None)
    p.set_defaults(func=_cmd_table1)

    p = subparsers.add_parser(
        "demo", help="a quick Table 1 on the embedded moving-digits data (a few minutes on a CPU)",
        description="Table 1 at a small size on generated videos whose class is a direction of motion; "
                    "average and max pooling cannot tell a class from its time reversal, rank pooling can.",
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    _add_threads_argument(p, 1)
    p.set_defaults(func=_cmd_demo)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m poolings.video.cli`
    parser = argparse.ArgumentParser(prog="python -m poolings.video.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

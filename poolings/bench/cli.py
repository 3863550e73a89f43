"""``argminlayers bench``: run the benchmarks into a run folder, or publish them into docs/.

::

    argminlayers bench strategies|references|limit|throughput|generic|all [--quick] [--device cpu|cuda]
                       [--dtype float32|float64] [--out runs/bench | --publish] [--overwrite]
                       [--repeats N] [--threads N]

Each benchmark writes ``OUT/NAME.json``, ``OUT/NAME.md`` and ``OUT/NAME_*.png``, and the index
``OUT/benchmarks.md`` is rewritten from the sections present; nothing is written outside OUT.
``--publish`` (or ``--out docs/benchmarks``) writes into the repository's ``docs/benchmarks`` and
regenerates ``docs/benchmarks.md``. Results of the same benchmark already in OUT are replaced
only with ``--overwrite`` (or when publishing).

``--dtype`` defaults to float32, except for ``generic``, which runs both dtypes unless one is
named. A benchmark module may add options of its own (``add_arguments(parser)``) and read
them back (``run_from_args(cfg, args)``).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from .common import add_common_args, config_from_args
from .report import BENCHMARKS, is_published, write_index


def register(subparsers: "argparse._SubParsersAction") -> None:
    """Add the ``bench`` subcommand."""
    parser = subparsers.add_parser(
        "bench",
        help="run the benchmarks (timings, memory, gradient errors) into runs/bench, or --publish them",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("benchmark", choices=(*BENCHMARKS, "all"), help="which benchmark to run")
    add_common_args(parser)
    parser.set_defaults(func=run_command, dtype=None)  # None: the benchmark's own default
    add_specific_arguments(parser)


def add_specific_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options that benchmark modules define (``add_arguments``); :func:`_check_options`
    refuses each one given to a benchmark that does not read it."""
    for name in BENCHMARKS:
        extra = getattr(importlib.import_module(f"{__package__}.{name}"), "add_arguments", None)
        if extra is not None:
            extra(parser)


def run_benchmarks(cfg, names: Sequence[str], *, overwrite: bool = False, args: argparse.Namespace | None = None) -> int:
    """Run ``names`` with ``cfg``, refusing to replace earlier results without ``overwrite``; write the index."""
    from pathlib import Path

    from poolings.runtime import check_out_dir

    out = check_out_dir(cfg.out)
    if is_published(out):
        from .common import check_compiled_for_publishing

        check_compiled_for_publishing()
    if not (overwrite or is_published(out)):
        present = [f"{name}.json" for name in names if (out / f"{name}.json").exists()]
        if present:
            raise FileExistsError(f"out: {out} already holds results of {', '.join(present)}; pass --overwrite to "
                                  "replace them, or choose another --out")
    for name in names:
        module = importlib.import_module(f"{__package__}.{name}")
        if args is not None and hasattr(module, "run_from_args"):
            module.run_from_args(cfg, args)
        else:
            module.run(cfg)
        print(f"{name}: wrote {Path(cfg.out) / name}.json, {name}.md and charts", flush=True)
    print(f"wrote {write_index(cfg.out)}")
    return 0


def _check_options(options: dict, args: argparse.Namespace, names: Sequence[str]) -> None:
    """A benchmark-specific option given to a benchmark that does not read it is refused, not ignored."""
    for name in names:
        takes = getattr(importlib.import_module(f"{__package__}.{name}"), "OPTIONS", ())
        for dest, (flag, default) in options.items():
            if dest not in takes and getattr(args, dest, default) != default:
                raise ValueError(f"{flag} is not an option of {name!r}"
                                 + (" (with 'all', run the benchmarks that take it one by one)"
                                    if len(names) > 1 else ""))


def _specific_options() -> dict:
    """``{dest: (flag, default)}`` of the options that benchmark modules add (``add_arguments``)."""
    probe = argparse.ArgumentParser()
    add_specific_arguments(probe)
    return {a.dest: (a.option_strings[-1], a.default) for a in probe._actions if a.dest != "help"}


def run_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "dtype": args.dtype or "float32"}))
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    _check_options(_specific_options(), args, names)
    return run_benchmarks(cfg, names, overwrite=args.overwrite, args=args)


def main(argv: list[str] | None = None) -> int:
    """``python -m poolings.bench.cli NAME ...`` (the same as ``argminlayers bench NAME ...``)."""
    parser = argparse.ArgumentParser(prog="argminlayers")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["bench", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

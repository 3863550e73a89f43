"""The ``argminlayers`` command.

Each subcommand lives in its own module, which exposes ``register(subparsers)``;
modules are imported lazily so that ``argminlayers --help`` stays fast and a
missing optional dependency only affects the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that registers it
_SUBCOMMANDS = {
    "check": "poolings.crosscheck",
    "train": "poolings.video.cli",
    "table1": "poolings.video.cli",
    "demo": "poolings.video.cli",
    "bench": "poolings.bench.cli",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="argminlayers",
        description="Differentiable argmin layers: cross-checks, video training and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = None
    if argv:
        first = next((a for a in argv if not a.startswith("-")), None)
        if first in _SUBCOMMANDS:
            wanted = _SUBCOMMANDS[first]
    registered = set()
    for name, module in _SUBCOMMANDS.items():
        if module in registered or (wanted is not None and module != wanted):
            continue
        mod = importlib.import_module(module)
        mod.register(sub)
        registered.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

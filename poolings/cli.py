"""The ``argminlayers`` command.

Each subcommand lives in its own module, which exposes ``register(subparsers)``;
modules are imported lazily so that ``argminlayers --help`` stays fast and a
missing optional dependency only affects the subcommand that needs it.

A user's mistake (a bad argument, a folder that holds a run, a missing file or package,
an unreadable checkpoint, a device that is not there) ends the command with one line on
stderr that says what was wrong and what to do, and exit status 2; ``--debug`` shows the
traceback instead. Ctrl-C ends it with a line that says how to continue, and exit status 130
(the shell's convention for an interrupt).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# subcommand name -> module that registers it
_SUBCOMMANDS = {
    "check": "poolings.crosscheck",
    "train": "poolings.video.cli",
    "table1": "poolings.video.cli",
    "demo": "poolings.video.cli",
    "eval": "poolings.video.cli",
    "bench": "poolings.bench.cli",
}

# importable module -> (what pip installs, the extra of this package that brings it)
_EXTRAS = {
    "sklearn": ("scikit-learn", "video"),
    "matplotlib": ("matplotlib", "video"),
    "av": ("av", "video"),
    "torchvision": ("torchvision", "video"),
    "cvxpy": ("cvxpy", "cvxpylayers"),
    "cvxpylayers": ("cvxpylayers", "cvxpylayers"),
    "diffcp": ("diffcp", "cvxpylayers"),
    "tensorboard": ("tensorboard", "tensorboard"),
}

# modules each subcommand needs before it can start (others are checked where they are used)
_NEEDS = {
    "train": ("sklearn", "matplotlib"),
    "table1": ("sklearn", "matplotlib"),
    "demo": ("sklearn", "matplotlib"),
    "eval": ("sklearn", "matplotlib"),
    "bench": ("matplotlib", "sklearn"),
}
_EXTRA_OF_COMMAND = {"bench": "bench"}

# exceptions that report a user's mistake: printed as one line, exit status 2
_USER_ERRORS = (ValueError, OSError, FloatingPointError)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="argminlayers",
        description="Differentiable argmin layers: cross-checks, video training and benchmarks.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
    for name, command in sub.choices.items():  # --debug after the command name too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def missing_extra_message(module: str, command: str) -> str:
    """One line: which package is missing and the pip command that installs it."""
    top = module.split(".")[0]
    package, extra = _EXTRAS.get(top, (top, None))
    extra = _EXTRA_OF_COMMAND.get(command, extra)
    install = f"pip install 'argminlayers[{extra}]'" if extra else f"pip install {package}"
    return f"argminlayers {command}: error: {package} is not installed, and `{command}` needs it: {install}"


def _require(command: str) -> None:
    for module in _NEEDS.get(command, ()):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and exc.strerror:  # "[Errno 2] ..." -> "No such file: path"
        text = f"{exc.strerror}: {exc.filename}"
    return text or type(exc).__name__


def _interrupted(command: str, exc: BaseException) -> str:
    from poolings.video.train import TrainingInterrupted

    if command in ("demo", "table1"):
        return (f"argminlayers {command}: interrupted; {command} does not resume: rerun the same command with "
                "--overwrite to start it again")
    if isinstance(exc, TrainingInterrupted):
        if exc.epochs_done == 0:
            return f"argminlayers {command}: interrupted before the first epoch ended; nothing was saved: rerun the command"
        return (f"argminlayers {command}: interrupted after epoch {exc.epochs_done} of {exc.epochs}, saved in "
                f"{exc.out}/checkpoint.pt: rerun the same command with --resume to continue")
    return f"argminlayers {command}: interrupted"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = next((a for a in argv if not a.startswith("-")), "argminlayers")
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        command = args.command
        _require(command)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(_interrupted(command, exc), file=sys.stderr)
        return 130
    except ImportError as exc:
        if debug:
            raise
        if exc.name and exc.name.split(".")[0] in _EXTRAS:
            print(missing_extra_message(exc.name, command), file=sys.stderr)
        else:
            print(f"argminlayers {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except _USER_ERRORS as exc:
        if debug:
            raise
        print(f"argminlayers {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
